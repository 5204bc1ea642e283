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

import warnings
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch import Tensor

__all__ = ["batch_way", "batched_grad", "remember_graph", "vmap_cannot_run", "vmap_first"]


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


# NOTE [slow batching rules]: for an op without a batching rule (``to_dense_backward``) functorch
# loops over the probes inside the pass and says so with a ``UserWarning`` asking the reader to
# file an issue with PyTorch; the rows are right, and the user can do nothing about it, so the
# batched passes of ``batched_grad`` do not pass it on (no torch warning reaches the user through
# torchjac's internal calls).
_SLOW_RULE = "There is a performance drop because we have not yet implemented the batching rule"
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
    outs: list[Tensor],
    ins: list[Tensor],
    cotangents: list[Tensor],
    retain: bool,
    create: bool,
    prefer: str = "functorch",
) -> tuple[Tensor | None, ...]:
    """``autograd.grad`` vmapped over the cotangents' leading dimension (NOTE [vmap over the
    graph] in ``graph_probes``); ``None`` for an input the outputs do not reach. ``prefer``: the
    vmap to take (``"functorch"`` or ``"legacy"``) unless the graph holds an op whose batching
    rule it gets wrong (NOTE [wrong batching rules])."""
    how = batch_way(outs, prefer)
    if how == "legacy":
        return torch.autograd.grad(
            outs, ins, cotangents, retain, create, allow_unused=True, is_grads_batched=True
        )
    if how == "loop":
        n = cotangents[0].shape[0]
        rows = [
            torch.autograd.grad(
                outs,
                ins,
                [c[i] for c in cotangents],
                retain_graph=retain or i < n - 1,
                create_graph=create,
                allow_unused=True,
            )
            for i in range(n)
        ]
        return tuple(None if g[0] is None else torch.stack(g) for g in zip(*rows))
    unused: list[bool] = []  # torch.func.vmap wants tensors out: zeros stand in for None

    def one(*cots: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(outs, ins, list(cots), retain, create, allow_unused=True)
        unused[:] = [g is None for g in grads]
        return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, ins))

    with warnings.catch_warnings():  # NOTE [slow batching rules]
        warnings.filterwarnings("ignore", _SLOW_RULE, UserWarning)
        batched = vmap_first(one)(*cotangents)
    return tuple(None if u else g for g, u in zip(batched, unused))


# NOTE [wrong batching rules]: torch's two vmaps over a backward pass are each wrong for an op the
# other gets right (torch 2.13, float64, against one cotangent at a time): functorch's batching
# rule of ``_cdist_backward`` (cotangents batched, points not, as in every Jacobian by rows)
# returned rows off by 0.97 for ``torch.cdist(x, y)`` (``torch.func.jacrev`` too), where the
# legacy vmap of ``is_grads_batched`` loops over that op; the legacy one returned rows off by
# 0.18 through ``native_group_norm``'s backward in the graph of a function that differentiates
# it itself (``torch.func.grad`` of an energy), where functorch's is right. A batched pass takes
# the vmap it prefers (functorch's, the legacy one for ``layer_deltas``) unless the graph holds an
# op of that vmap's ``_WRONG``: then the other, or a loop where the graph holds one of each. The
# general per-sample path (``sample_vmap``) is functorch's vmap over samples of ``vjp``s: a
# model whose graph makes functorch's vmap wrong runs it one sample at a time, its probes
# batched by ``batched_grad`` (``param_jacobian`` and ``ntk`` through ``torch.cdist`` were off by
# 0.35 and 0.14). The walk that tells is made once per graph (the last graph's verdict is kept,
# by the identity and sequence number of its output nodes), and costs about a microsecond a
# node; the planner's count of a graph (``kernels.graph_products``, the validation walk of
# ``jac`` and ``gramian``) gives the names it saw instead.
_WRONG = {
    "functorch": frozenset({"CdistBackward0"}),
    "legacy": frozenset({"NativeGroupNormBackward0"}),
}
_last: list[Any] = [None, frozenset()]  # a graph's key, and the vmaps its ops make wrong


def batch_way(outs: Sequence[Tensor], prefer: str = "functorch") -> str:
    """``"functorch"``, ``"legacy"`` or ``"loop"`` for a batched pass from ``outs``: ``prefer``
    unless the graph makes it wrong (NOTE [wrong batching rules])."""
    roots = [y.grad_fn for y in outs if y.grad_fn is not None]
    if _last[0] == _key(roots):
        return _way(_last[1], prefer)
    names: set[str] = set()
    seen: set[Any] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(c for c, _ in node.next_functions if c is not None)
    return remember_graph(roots, names, prefer)


def remember_graph(roots: Sequence[Any], names: AbstractSet[str], prefer: str = "functorch") -> str:
    """The way for the graph behind the output nodes ``roots`` (the outputs' ``grad_fn``) from
    the names of all its nodes (a caller's own complete walk: NOTE [wrong batching rules]), kept
    for its batched passes."""
    wrong = frozenset(way for way, ops in _WRONG.items() if names & ops)
    _last[:] = [_key(roots), wrong]
    return _way(wrong, prefer)


def _way(wrong: frozenset[str], prefer: str) -> str:
    for way in (prefer, "legacy" if prefer == "functorch" else "functorch"):
        if way not in wrong:
            return way
    return "loop"


def vmap_cannot_run(node: Any) -> bool:
    """A node of torch's whose backward functorch's vmap raises on: ``group_norm`` on a
    channels-last input (torch 2.13: ``NYI: querying is_contiguous inside of vmap``), so a graph
    with one is not taken as safe for the one freeing pass (NOTE [one pass frees]); beside the
    ops of NOTE [wrong batching rules], which it runs wrong."""
    if not type(node).__name__.startswith("NativeGroupNormBackward"):
        return False
    saved = getattr(node, "_saved_input", None)
    return isinstance(saved, Tensor) and not saved.is_contiguous()


def _key(roots: Sequence[Any]) -> frozenset[tuple[int, int]]:
    return frozenset((id(node), node._sequence_nr()) for node in roots)
