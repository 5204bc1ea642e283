"""``torch.func.vmap`` over the leading dimension, entered through functorch's own primitives.

NOTE [lean vmap]: ``torch.func.vmap`` validates and flattens its arguments and outputs as
pytrees on every call; the engine vmaps small, known calls many times per user call (every
reshape, sum or slice of a Taylor-mode pass, every chunk of graph probes), and there that
wrapper is a large share of the time: 0.33-0.38 ms of W4's 2.6 ms call (64 columns by double
backward), and 25-30% of a PINN's per-sample Hessian, Laplacian or Jacobian whose function slices
and concatenates (1.51 against 1.13 ms for the Hessian of a 2→64→64→3 tanh MLP on 256 points,
measured). ``vmap_first`` does what ``torch.func.vmap`` does for these calls, with the same
primitives (``_vmap_increment_nesting``, ``_add_batch_dim``, ``_remove_batch_dim``, randomness
``"error"``) and none of the pytree handling: tensor arguments, all batched along dimension 0
with the same size, and a tensor, or a list or tuple of tensors (``None`` passes through), out.
Where the primitives are missing, ``torch.func.vmap`` runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["batched_grad", "vmap_first"]


def _primitives() -> Any:
    functorch = getattr(torch._C, "_functorch", None)
    names = ("_vmap_increment_nesting", "_vmap_decrement_nesting", "_add_batch_dim")
    if functorch is None or not all(hasattr(functorch, n) for n in (*names, "_remove_batch_dim")):
        return None
    return functorch


def _loader() -> Any:
    try:
        from torch._functorch.vmap import lazy_load_decompositions
    except ImportError:  # pragma: no cover - other torch versions
        return None
    return lazy_load_decompositions


_F = _primitives()
_LOAD = _loader()  # the batching rules torch.func.vmap registers on first use


def vmap_first(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.func.vmap(fn)`` for the calls of NOTE [lean vmap]."""
    if _F is None:
        return torch.func.vmap(fn)

    def run(*args: Tensor) -> Any:
        if _LOAD is not None:
            _LOAD()
        n = args[0].shape[0]
        level = _F._vmap_increment_nesting(n, "error")
        try:
            out = fn(*[_F._add_batch_dim(a, 0, level) for a in args])
            if isinstance(out, Tensor):
                return _F._remove_batch_dim(out, level, n, 0)
            items = [None if o is None else _F._remove_batch_dim(o, level, n, 0) for o in out]
            return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
        finally:
            _F._vmap_decrement_nesting()

    return run


def batched_grad(
    outs: list[Tensor], ins: list[Tensor], cotangents: list[Tensor], retain: bool, create: bool
) -> tuple[Tensor | None, ...]:
    """``autograd.grad`` vmapped over the cotangents' leading dimension (NOTE [vmap over the
    graph] in ``graph_probes``); ``None`` for an input the outputs do not reach."""
    unused: list[bool] = []  # torch.func.vmap wants tensors out: zeros stand in for None

    def one(*cots: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(outs, ins, list(cots), retain, create, allow_unused=True)
        unused[:] = [g is None for g in grads]
        return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, ins))

    batched = vmap_first(one)(*cotangents)
    return tuple(None if u else g for g, u in zip(batched, unused))
