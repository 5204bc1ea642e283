"""``ntk``: the empirical neural tangent kernel of a module, without its parameter Jacobian."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchjac._checks import check_chunk_size, describe
from torchjac._distributed_ntk import split_ntk
from torchjac._engine.core.blocked import symmetrize_
from torchjac._engine.core.plan import memory_budget
from torchjac._engine.modules.layers import model_state, no_side_effects
from torchjac._engine.modules.ntk_kernel import kernel_of, run_side
from torchjac._errors import fallback_scope
from torchjac._modules import _check_batchnorm, _select

__all__ = ["ntk"]


def ntk(
    model: nn.Module,
    x1: Tensor | Sequence[Tensor],
    x2: Tensor | Sequence[Tensor] | None = None,
    *,
    params: Iterable[str | nn.Parameter] | None = None,
    batch_dim: int = 0,
    chunk_size: int | None = None,
    max_memory: float | str | None = None,
    process_group: Any = None,
    gather: str | bool = "all",
) -> Any:
    r"""Empirical neural tangent kernel :math:`K = J_1 J_2^\top` of ``model``'s parameters.

    Math: :math:`K[i, a, j, b] = \sum_\theta \partial f(x_1)_{i,a} / \partial\theta \;
    \partial f(x_2)_{j,b} / \partial\theta` over the parameters ``θ`` (sample ``i`` of ``x1``,
    output element ``a``; sample ``j`` of ``x2``, element ``b``). ``J`` (``N·C·P`` numbers) is
    never formed: a Linear layer contributes ``(δ₁δ₂ᵀ) ⊙ (a₁a₂ᵀ + 1)`` from its inputs ``a`` and
    output sensitivities ``δ`` (one backward pass per output element, for the whole batch);
    convolutions, embeddings and LayerNorm contribute by ghost products or their per-sample
    Jacobians, one parameter at a time; any other parameter by ``vmap`` over samples.

    Shapes: ``x1`` ``[N1, ...]`` and ``x2`` ``[N2, ...]`` (batch at ``batch_dim``); the model
    maps them to ``[N, *o]``; the result is ``[N1, *o, N2, *o]``. With ``x2=None`` it is
    ``K(x1, x1)``, symmetric and positive semi-definite. A model of several inputs takes a tuple
    of Tensors, called as ``model(*x1)``, each with the batch at ``batch_dim``.

    The model is never changed: parameters, ``.grad``, buffers, hooks, train/eval mode and the
    global RNG state are as before the call. A model that draws random numbers (dropout in train
    mode) draws once per call, from the RNG state the call finds: ``x1`` and ``x2`` see the
    same draw (the kernel of one realisation).

    Args:
        model: an ``nn.Module`` called as ``model(x)`` (or ``model(*x)``), returning a Tensor.
        x1: the first batch of inputs: a Tensor or a tuple of Tensors.
        x2: the second batch, like ``x1`` (default: ``x1``).
        params: parameter names (as in ``named_parameters()``) or ``nn.Parameter`` objects;
            default: every parameter that requires grad (tied parameters once).
        batch_dim: the batch dimension of the inputs and of the output. Samples must be
            independent (``BatchCouplingError`` otherwise, e.g. BatchNorm in train mode).
        chunk_size: output elements per vectorised backward pass (for ``δ``, and on the
            general path); ``1`` is a plain loop. Default: chosen from ``max_memory``.
        max_memory: bytes (int) or a string like ``"512MiB"``; default: a quarter of the free
            memory of the device. Per-sample Jacobians that must be formed (general path,
            materialised closed forms) are built in chunks of output elements under it; the
            ``δ`` of every layer for all output elements and the result are held whole.
        process_group: a ``torch.distributed`` process group to split the kernel over (every
            rank calls with the same arguments): the ranks form a ``p x q`` grid (``p >= q``,
            as square as the number of ranks allows; 2 ranks: ``2 x 1``) and rank ``(i, j)``
            computes the tile of ``x1``'s ``i``-th balanced range of samples against ``x2``'s
            ``j``-th. ``K(x1, x1)`` gathered needs only the tiles on and above the diagonal:
            they are dealt to the ranks by area (2 ranks: 5/16 of the kernel each) and
            mirrored. The model runs once on the whole batch to check that no sample reaches
            another and that it draws no random numbers. An error on any rank raises on every
            rank. Default ``None``: this process alone.
        gather: ``"all"`` (default, the whole kernel on every rank), ``"rank0"`` (``None`` on
            the other ranks) or ``False``: ``(tile, index)`` with ``K[index]`` this rank's tile
            (a slice of the ``N1`` and the ``N2`` axes, on the grid; for ``K(x1, x1)`` too,
            not made symmetric).

    Example:
        >>> import torch, torchjac as tj
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> x = torch.randn(5, 3)
        >>> k = tj.ntk(model, x)
        >>> k.shape
        torch.Size([5, 2, 5, 2])
        >>> bool(torch.allclose(k, k.permute(2, 3, 0, 1)))
        True
        >>> tj.ntk(model, x, torch.randn(4, 3)).shape
        torch.Size([5, 2, 4, 2])
    """
    if process_group is not None or gather != "all":  # NOTE [split and gather]
        return split_ntk(ntk, "ntk", locals())
    fn = "ntk"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: `model` must be a torch.nn.Module, got {describe(model)}.")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise TypeError(f"{fn}: `batch_dim` must be an int, got {describe(batch_dim)}.")
    xs1 = _check_x(fn, "x1", x1, batch_dim)
    xs2 = None if x2 is None else _check_x(fn, "x2", x2, batch_dim)
    if xs2 is not None and (len(xs2) != len(xs1) or xs2[0].device != xs1[0].device):
        raise ValueError(
            f"{fn}: x2 must be like x1: {len(xs1)} Tensor(s) on {xs1[0].device}; got "
            f"{len(xs2)} on {xs2[0].device}."
        )
    chunk_size = check_chunk_size(fn, chunk_size)
    names = _select(fn, model, params)
    _check_batchnorm(fn, model, batch_dim)
    device = xs1[0].device
    budget = memory_budget(fn, max_memory, device)
    with torch.inference_mode(False), no_side_effects(device) as reset_rng, fallback_scope():
        state = model_state(model, names)  # NOTE [inference tensors]
        xs1 = tuple(x.clone() if x.is_inference() else x for x in xs1)
        if xs2 is not None:
            xs2 = tuple(x.clone() if x.is_inference() else x for x in xs2)
        side1 = run_side(fn, "x1", model, state, xs1, batch_dim, chunk_size, budget)
        side2 = side1
        if xs2 is not None:  # NOTE [one draw per call]: x2 sees the random numbers x1 saw
            reset_rng()
            side2 = run_side(fn, "x2", model, state, xs2, batch_dim, chunk_size, budget)
        if side2.out_rest != side1.out_rest:
            raise ValueError(
                f"{fn}: the model maps x1 to per-sample outputs of shape {list(side1.out_rest)} "
                f"but x2 to {list(side2.out_rest)}; the kernel needs one output shape."
            )
        kernel = kernel_of(fn, model, state, side1, side2, batch_dim, chunk_size, budget)
    if xs2 is None:
        kernel = symmetrize_(kernel)  # exactly symmetric
    o = tuple(side1.out_rest)
    return kernel.reshape((side1.n, *o, side2.n, *o))


def _check_x(fn: str, arg: str, x: object, batch_dim: int) -> tuple[Tensor, ...]:
    """A Tensor or a non-empty tuple/list of Tensors, all with one batch size at ``batch_dim``."""
    if isinstance(x, Tensor):
        xs: tuple[object, ...] = (x,)
    elif isinstance(x, (tuple, list)) and x:
        xs = tuple(x)
    else:
        raise TypeError(
            f"{fn}: `{arg}` must be a torch.Tensor or a tuple of Tensors, got {describe(x)}."
        )
    for i, t in enumerate(xs):
        name = arg if isinstance(x, Tensor) else f"{arg}[{i}]"
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: `{name}` must be a torch.Tensor, got {describe(t)}.")
        if not -t.dim() <= batch_dim < t.dim():
            raise ValueError(
                f"{fn}: `batch_dim={batch_dim}` is out of range for {name} with shape "
                f"{list(t.shape)}: the input needs a batch dimension there (samples along "
                f"`batch_dim`). For one sample, pass {name}.unsqueeze({batch_dim})."
            )
        first = xs[0]
        assert isinstance(first, Tensor)
        if t.shape[batch_dim] != first.shape[batch_dim] or t.device != first.device:
            raise ValueError(
                f"{fn}: every Tensor of `{arg}` needs the same batch size at `batch_dim="
                f"{batch_dim}` and one device; {name} has shape {list(t.shape)} on {t.device}, "
                f"{arg}[0] has {list(first.shape)} on {first.device}."
            )
    return tuple(t for t in xs if isinstance(t, Tensor))
