"""``ntk``: the empirical neural tangent kernel of a module, without its parameter Jacobian."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from torchjac._checks import check_chunk_size, describe
from torchjac._engine.func_call import one_fallback_warning
from torchjac._engine.layers import model_state, no_side_effects
from torchjac._engine.ntk_kernel import kernel_of, run_side
from torchjac._engine.plan import memory_budget
from torchjac._modules import _check_batchnorm, _select

__all__ = ["ntk"]


def ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    params: Iterable[str | nn.Parameter] | None = None,
    batch_dim: int = 0,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
) -> Tensor:
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
    ``K(x1, x1)``, symmetric and positive semi-definite.

    The model is never changed: parameters, ``.grad``, buffers, hooks, train/eval mode and the
    global RNG state are as before the call.

    Args:
        model: an ``nn.Module`` called as ``model(x)``, returning a Tensor.
        x1: the first batch of inputs.
        x2: the second batch (default: ``x1``).
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
    fn = "ntk"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: `model` must be a torch.nn.Module, got {describe(model)}.")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise TypeError(f"{fn}: `batch_dim` must be an int, got {describe(batch_dim)}.")
    _check_x(fn, "x1", x1, batch_dim)
    if x2 is not None:
        _check_x(fn, "x2", x2, batch_dim)
        if x2.device != x1.device:
            raise ValueError(f"{fn}: x1 is on {x1.device} but x2 is on {x2.device}.")
    chunk_size = check_chunk_size(fn, chunk_size)
    names = _select(fn, model, params)
    _check_batchnorm(fn, model, batch_dim)
    budget = memory_budget(fn, max_memory, x1.device)
    state = model_state(model, names)
    with no_side_effects(x1.device), one_fallback_warning(fn):
        side1 = run_side(fn, "x1", model, state, x1, batch_dim, chunk_size, budget)
        side2 = (
            side1
            if x2 is None
            else run_side(fn, "x2", model, state, x2, batch_dim, chunk_size, budget)
        )
        if side2.out_rest != side1.out_rest:
            raise ValueError(
                f"{fn}: the model maps x1 to per-sample outputs of shape {list(side1.out_rest)} "
                f"but x2 to {list(side2.out_rest)}; the kernel needs one output shape."
            )
        kernel = kernel_of(fn, model, state, side1, side2, x1, x2, batch_dim, chunk_size, budget)
    if x2 is None:
        kernel = (kernel + kernel.T) / 2  # exactly symmetric
    o = tuple(side1.out_rest)
    return kernel.reshape((side1.n, *o, side2.n, *o))


def _check_x(fn: str, arg: str, x: object, batch_dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: `{arg}` must be a torch.Tensor, got {describe(x)}.")
    if not -x.dim() <= batch_dim < x.dim():
        raise ValueError(
            f"{fn}: `batch_dim={batch_dim}` is out of range for {arg} with shape {list(x.shape)}."
        )
