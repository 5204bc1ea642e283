"""``param_jacobian``: Jacobians of an ``nn.Module``'s output with respect to its parameters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from torchjac._checks import check_batch_dim, check_chunk_size, describe
from torchjac._distributed_doors import split_param_jacobian
from torchjac._engine.core.plan import memory_budget
from torchjac._engine.modules.layers import model_state, no_side_effects
from torchjac._engine.modules.param_probes import full_jacobian, per_sample_jacobian
from torchjac._errors import BatchCouplingError, coupling_fix

__all__ = ["param_jacobian"]


def param_jacobian(
    model: nn.Module,
    *args: Any,
    params: Iterable[str | Tensor] | str | Tensor | None = None,
    batch_dim: int | None = None,
    chunk_size: int | None = None,
    max_memory: float | str | None = None,
    process_group: Any = None,
    gather: str | bool = "all",
    **kwargs: Any,
) -> Any:
    r"""Jacobian of ``model(*args, **kwargs)`` with respect to the model's parameters.

    Math: for the output :math:`y = f_\theta(x)` and each parameter :math:`p \subset \theta`,
    :math:`J_p = \partial y / \partial p`, of shape ``y.shape + p.shape``. For a ``[N, C]``
    output that is ``[N, C, *p.shape]`` (the batched Jacobian of BackPACK's examples).

    The result is a dict in ``named_parameters()`` order: tied parameters appear once (under
    their first name, every use accumulated), parameters with ``requires_grad=False`` are
    skipped unless named in ``params``. The model is never changed: it runs through
    ``torch.func.functional_call`` on detached aliases of its parameters and clones of its
    buffers, so parameters, ``.grad``, buffers (BatchNorm statistics), ``requires_grad`` flags,
    train/eval mode and the global RNG state are as before, and no hook outlives the call.

    Args:
        model: any ``nn.Module`` returning a Tensor.
        *args, **kwargs: the model's arguments, passed as given.
        params: names (as in ``named_parameters()``) or ``nn.Parameter`` objects to
            differentiate; default: every parameter with ``requires_grad=True``.
        batch_dim: the batch dimension of the output and of the batched arguments; declares that
            output sample ``n`` depends only on sample ``n`` (checked: ``BatchCouplingError``
            otherwise, e.g. BatchNorm in train mode). Unlocks the per-sample fast path: closed
            forms for Linear, Conv1d/2d, Embedding, LayerNorm/RMSNorm and PReLU, and ``vmap``
            over samples for every other parameter; the layout stays ``out.shape + p.shape``.
            Default ``None``: every output element against every parameter, through the autograd
            graph (right for every model).
        chunk_size: output probes per vectorised pass; ``1`` is a plain loop. Default: chosen
            from ``max_memory``.
        max_memory: bytes (int) or a string like ``"512MiB"``; default: a quarter of the free
            memory of the device.
        process_group: a ``torch.distributed`` process group to split the work over (every
            rank calls with the same arguments): with ``batch_dim``, balanced ranges of samples
            (the tensor arguments with the first one's batch size at ``batch_dim`` are cut; the
            model runs once on the whole batch to check that no sample reaches another and that
            it draws no random numbers); without, ranges of the rows of the flattened output.
            An error on any rank raises on every rank. Default ``None``: this process alone.
        gather: ``"all"`` (default, the whole dict on every rank), ``"rank0"`` (``None`` on the
            other ranks) or ``False``: ``(shard, index)``, this rank's dict and the slice it
            covers: ``full[name][index]`` with ``batch_dim``, ``full[name].reshape(m,
            *p.shape)[index]`` for the ``m`` output elements without.

    Returns:
        ``{name: Tensor of shape out.shape + p.shape}``.

    Example:
        >>> import torch, torchjac as tj
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> jac = tj.param_jacobian(model, x, batch_dim=0)
        >>> for name, j in jac.items():
        ...     print(name, tuple(j.shape))
        0.weight (5, 2, 4, 3)
        0.bias (5, 2, 4)
        2.weight (5, 2, 2, 4)
        2.bias (5, 2, 2)
        >>> full = tj.param_jacobian(model, x)
        >>> torch.allclose(jac["0.weight"], full["0.weight"], atol=1e-6)
        True
    """
    if process_group is not None or gather != "all":  # NOTE [split and gather]
        return split_param_jacobian(param_jacobian, "param_jacobian", locals())
    fn = "param_jacobian"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: `model` must be a torch.nn.Module, got {describe(model)}.")
    chunk_size = check_chunk_size(fn, chunk_size)
    if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int)):
        raise TypeError(f"{fn}: `batch_dim` must be an int or None, got {describe(batch_dim)}.")
    names = _select(fn, model, params)
    device = _device(model, args, kwargs)
    budget = memory_budget(fn, max_memory, device)
    if batch_dim is not None:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if first is not None:  # the first tensor argument carries the batch
            check_batch_dim(fn, batch_dim, [("the first tensor argument", first)])
        _check_batchnorm(fn, model, batch_dim)
    # Derivatives need autograd even under torch.inference_mode(); inference tensors are copied.
    with torch.inference_mode(False):
        args = tuple(_usable(a) for a in args)
        kwargs = {k: _usable(v) for k, v in kwargs.items()}
        return _run(fn, model, names, args, kwargs, batch_dim, chunk_size, budget, device)


def _usable(a: Any) -> Any:
    return a.clone() if isinstance(a, Tensor) and a.is_inference() else a


def _run(
    fn: str,
    model: nn.Module,
    names: list[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch_dim: int | None,
    chunk_size: int | None,
    budget: int,
    device: torch.device,
) -> dict[str, Tensor]:
    with no_side_effects(device):
        state = model_state(model, names)
        if batch_dim is None:
            return full_jacobian(fn, model, state, args, kwargs, chunk_size, budget)
        return per_sample_jacobian(fn, model, state, args, kwargs, batch_dim, chunk_size, budget)


def _select(fn: str, model: nn.Module, params: Any) -> list[str]:
    """Canonical names of the parameters to differentiate, in ``named_parameters()`` order."""
    named = list(model.named_parameters())
    canonical = {id(p): n for n, p in named}
    if params is None:
        names = [n for n, p in named if p.requires_grad]
        if not names:
            raise ValueError(
                f"{fn}: no parameter of the model requires grad; name the ones to differentiate "
                "with `params=[...]`."
            )
        return names
    items = [params] if isinstance(params, (str, Tensor)) else params
    if not isinstance(items, Iterable):
        raise TypeError(
            f"{fn}: `params` must be parameter names or nn.Parameter objects, got "
            f"{describe(params)}."
        )
    alias = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    chosen = set()
    for item in items:
        if isinstance(item, str):
            if item not in alias:
                known = ", ".join(repr(n) for n, _ in named[:8])
                raise ValueError(
                    f"{fn}: `params` names {item!r}, which is not a parameter of the model; "
                    f"known names: {known}{', ...' if len(named) > 8 else ''}."
                )
            chosen.add(alias[item])
        elif isinstance(item, Tensor):
            if id(item) not in canonical:
                raise ValueError(
                    f"{fn}: `params` holds {describe(item)}, which is not a parameter of the "
                    "model; pass names or objects from model.named_parameters()."
                )
            chosen.add(canonical[id(item)])
        else:
            raise TypeError(
                f"{fn}: each entry of `params` must be a name or an nn.Parameter, got "
                f"{describe(item)}."
            )
    if not chosen:
        raise ValueError(f"{fn}: `params` is empty; name at least one parameter.")
    return [n for n, _ in named if n in chosen]


def _device(model: nn.Module, args: tuple, kwargs: dict) -> torch.device:
    for p in model.parameters():
        return p.device
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return a.device
    return torch.device("cpu")


def _check_batchnorm(fn: str, model: nn.Module, batch_dim: int) -> None:
    """BatchNorm in train mode normalises with batch statistics: samples are coupled."""
    coupled = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    for name, m in model.named_modules() if coupled else ():
        if m is coupled[0]:
            where = f"module {name!r}" if name else "the model"
            raise BatchCouplingError(
                f"{fn}: `batch_dim={batch_dim}` declares the samples independent, but "
                f"{where} ({type(m).__name__}) is in train mode, where it normalises with "
                f"statistics of the whole batch. Call model.eval() first. {coupling_fix(fn)}"
            )
