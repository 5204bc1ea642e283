"""Hessian diagonals with second order in reverse: the Taylor tape.

NOTE [taylor tape]: a forward diagonal carries ``D`` second-order coefficients through every
later layer. But second-order terms are born only at nonlinear ops (``φ''(v)·(∂_a v)²`` at an
activation, ``2 ∂_a u ∂_a v`` at a product, ``H_op[∂_a, ∂_a]`` through the general rule) and then
travel linearly to the outputs, so their sum at output ``o`` is ``Σ_e <g_e, s_e[a]>`` with
``g_e = ∂f_o/∂h_e`` the reverse-mode gradient at op ``e``. The pass carries first order only
(``K = 1 + D``) and records each source ``s_e`` on a tape; one reverse sweep per output row gives
every ``g_e``. The sweep needs no autograd graph of the values: each op of the pass leaves a
``Node`` with its vector-Jacobian product, in closed form from what its rule already computed
(``φ'`` of an activation, a Linear's weight), or, for ops without one, by recomputing that op
alone on its values under autograd when the sweep reaches it. Only ops between a source and the
outputs get a node (``Jet.wants``). Per sample, the inner product runs over each sample's own
elements, so the batch dimension of every taped tensor must be known: rules that keep it say
where it is, any other op forgets it, and a forgotten one makes the call rerun the forward
diagonal (``NeedForward``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchjac._engine.taylor import Jet

__all__ = ["NeedForward", "Tape", "contract", "link", "link_generic", "record", "reduce_to"]

# A node's vector-Jacobian product: one cotangent ``[R, *shape]`` (or ``None``) per output in,
# one per parent out, for ``R`` output rows at once.
Back = Callable[[list[Tensor | None]], Sequence[Tensor | None]]


class NeedForward(Exception):
    """A taped tensor's batch dimension is unknown (see NOTE [taylor tape])."""


@dataclass
class Node:
    """One op of the pass, for the reverse sweep of NOTE [taylor tape]."""

    parents: tuple[Jet, ...]
    outs: tuple[Jet, ...]
    back: Back


@dataclass
class Tape:
    """Sources of second order: (op output, ``[D, *shape]`` source, scale) triples; the source
    is ``source * scale`` (``scale`` of the op's output shape, ``None`` for 1), kept apart so
    that a source broadcast over the samples (NOTE [lazy first order]) is never written out.
    ``nodes``: the ops between the sources and the outputs, in the order they ran."""

    entries: list[tuple[Jet, Tensor, Tensor | None]] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)


def record(out: Jet, source: Tensor, scale: Tensor | None = None) -> None:
    """Put a second-order source on the tape of ``out``'s pass, if it keeps one."""
    tape = out.spec.tape
    if tape is not None:
        tape.entries.append((out, source, scale))
        out.wants = True


def link(
    out: Jet, parents: tuple[Jet, ...], back: Callable[[Tensor], Sequence[Tensor | None]]
) -> None:
    """Give ``out`` its node, with a closed-form ``back``: ``g [R, *out]`` to one cotangent per
    parent (a no-op without a tape, or when no source lies at or before ``out``)."""
    tape = out.spec.tape
    if tape is None or out.node is not None:
        return
    out.wants = out.wants or any(p.wants for p in parents)
    out.node = Node(parents, (out,), lambda gs: back(gs[0]))  # type: ignore[arg-type]
    if out.wants:
        tape.nodes.append(out.node)


def link_generic(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], jets: list[Jet], out: Any
) -> None:
    """A node for the Jets ``func`` returned without one: its vector-Jacobian product comes
    from recomputing ``func`` on the values under autograd, when the sweep needs it."""
    parents = tuple({id(j): j for j in jets}.values())
    outs = tuple(
        y
        for y in tree_flatten(out)[0]
        if isinstance(y, Jet) and y.node is None and all(y is not p for p in parents)
    )
    if not outs:
        return
    wants = any(p.wants for p in parents)
    for y in outs:
        y.wants = y.wants or wants
    node = Node(parents, outs, lambda gs: _recompute(func, args, kwargs, out, parents, outs, gs))
    for y in outs:
        y.node = node
    if any(y.wants for y in outs):
        outs[0].spec.tape.nodes.append(node)


def _recompute(
    func: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: Any,
    parents: tuple[Jet, ...],
    outs: tuple[Jet, ...],
    gs: list[Tensor | None],
) -> Sequence[Tensor | None]:
    values = {}
    for p in parents:
        v = p._stack[0]
        values[id(p)] = v if v.requires_grad else v.detach().requires_grad_(True)
    flat, tree = tree_flatten((args, kwargs))
    flat = [values[id(a)] if isinstance(a, Jet) else a for a in flat]
    a, k = tree_unflatten(flat, tree)
    with torch.enable_grad():
        res = tree_flatten(func(*a, **k))[0]
    where = {id(y): i for i, y in enumerate(tree_flatten(out)[0])}
    pairs = [(res[where[id(y)]], g) for y, g in zip(outs, gs) if g is not None]
    pairs = [(y, g) for y, g in pairs if isinstance(y, Tensor) and y.requires_grad]
    if not pairs:
        return [None] * len(parents)
    rows = pairs[0][1].shape[0]
    grads = torch.autograd.grad(
        [y for y, _ in pairs],
        [values[id(p)] for p in parents],
        [g[0] if rows == 1 else g for _, g in pairs],
        retain_graph=torch.is_grad_enabled(),
        create_graph=torch.is_grad_enabled(),
        allow_unused=True,
        is_grads_batched=rows != 1,
    )
    if rows != 1:
        return grads
    return [None if g is None else g.unsqueeze(0) for g in grads]


def reduce_to(g: Tensor, shape: Sequence[int]) -> Tensor:
    """``g [R, *broadcast shape]`` summed back to ``[R, *shape]`` (the sum of a broadcast)."""
    extra = g.dim() - 1 - len(shape)
    if extra > 0:
        g = g.sum(dim=tuple(range(1, 1 + extra)))
    dims = tuple(i + 1 for i, s in enumerate(shape) if s == 1 and g.shape[i + 1] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def _sweep(outs: list[Jet], out_cots: list[Tensor], tape: Tape) -> dict[int, Tensor]:
    """The reverse sweep of NOTE [taylor tape]: ``g [R, *shape]`` at every entry reached."""
    keep = {id(e) for e, _, _ in tape.entries}
    g: dict[int, Tensor] = {}

    def add(jet: Jet, c: Tensor) -> None:
        old = g.get(id(jet))
        g[id(jet)] = c if old is None else old + c

    for y, c in zip(outs, out_cots):
        add(y, c)
    for node in reversed(tape.nodes):
        gs = [g.get(id(y)) for y in node.outs]
        for y in node.outs:
            if id(y) not in keep:
                g.pop(id(y), None)
        if all(c is None for c in gs) or not any(p.wants for p in node.parents):
            continue
        for p, cot in zip(node.parents, node.back(gs)):
            if cot is not None and p.wants:
                add(p, cot)
    return g


def contract(
    outs: list[Jet],
    out_cots: list[Tensor],
    tape: Tape,
    shape: tuple[int, int, int],
    batched: bool,
    like: Tensor,
) -> Tensor:
    """``[B, R, D]``: ``Σ_e <g_e, s_e[a]>`` per sample, output row and direction (``B = 1``
    when unbatched). ``out_cots``: ``[R, *shape]`` per output."""
    with torch._C.DisableTorchFunctionSubclass():  # Jets read as their values here
        return _contract(outs, out_cots, tape, shape, batched, like)


def _contract(
    outs: list[Jet],
    out_cots: list[Tensor],
    tape: Tape,
    shape: tuple[int, int, int],
    batched: bool,
    like: Tensor,
) -> Tensor:
    bsz, n_rows, d = shape
    res = like.new_zeros(bsz, n_rows, d)
    if not tape.entries or not outs or bsz == 0:
        return res
    for e, _, _ in tape.entries:
        if batched and (e.bdim is None or e.shape[e.bdim] != bsz):
            raise NeedForward
    grads = _sweep(outs, out_cots, tape)
    for e, s, c in tape.entries:
        g = grads.get(id(e))
        if g is None:
            continue
        if c is None:
            w = g  # [R, *out]
        else:  # g·φ'' meets no small factor first: in float64, it would overflow float32
            wide = torch.promote_types(g.dtype, torch.float64)
            w = g.to(wide) * c.to(wide)
        s = s.to(w.dtype)
        bd = 1 + e.bdim if batched else 1  # type: ignore[operator]
        if batched and s.shape[bd] == 1 and bsz > 1:  # the same source for every sample
            rest = list(w.shape[1:])
            rest[bd - 1] = 1
            s1 = s.expand(d, *rest).movedim(bd, 1).reshape(d, -1)  # [D, n]
            w2 = w.movedim(bd, 1).reshape(n_rows, bsz, -1)
            res = res + (w2 @ s1.T).transpose(0, 1).to(res.dtype)
            continue
        if batched:
            w2 = w.movedim(bd, 1).reshape(n_rows, bsz, -1)
            s2 = s.expand(d, *w.shape[1:]).movedim(bd, 1).reshape(d, bsz, -1)
        else:
            w2, s2 = w.reshape(n_rows, 1, -1), s.expand(d, *w.shape[1:]).reshape(d, 1, -1)
        res = res + torch.einsum("rbn,dbn->brd", w2, s2).to(res.dtype)
    return res
