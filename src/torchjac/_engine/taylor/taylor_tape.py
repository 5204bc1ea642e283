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

from torchjac._engine.core.lean_vmap import batched_grad
from torchjac._engine.taylor.taylor import Jet

__all__ = [
    "Entry",
    "NeedForward",
    "Tape",
    "contract",
    "link",
    "link_generic",
    "record",
    "reduce_to",
]

# A node's vector-Jacobian product: one cotangent ``[R, *shape]`` (or ``None``) per output in,
# one per parent out, for ``R`` output rows at once.
Back = Callable[[list[Tensor | None]], Sequence[Tensor | None]]


class NeedForward(Exception):
    """A taped tensor's batch dimension is unknown (see NOTE [taylor tape])."""


@dataclass
class Node:
    """One op of the pass, for the reverse sweep of NOTE [taylor tape]. Jets are named by their
    ``key``, never held: a node must not keep a Jet's whole stack alive until the sweep."""

    parents: tuple[int, ...]
    wanted: tuple[bool, ...]  # which parents need a cotangent
    outs: tuple[int, ...]
    back: Back
    # the op's other tensors (a weight, a constant factor) and their versions: ``back`` reads
    # them after the pass, so one written in place since makes the call take the forward diagonal
    guards: tuple[tuple[Tensor, int], ...] = ()

    def check(self) -> None:
        if any(t._version != v for t, v in self.guards):
            raise NeedForward


@dataclass
class Entry:
    """A second-order source at the output ``key`` of an op: ``source * scale``."""

    key: int
    bdim: int | None
    shape: tuple[int, ...]
    source: Tensor  # [D, *shape], or broadcast over the samples
    scale: Tensor | None  # of the op's output shape, None for 1


@dataclass
class Tape:
    """Sources of second order (``entries``, ``scale`` kept apart so that a source broadcast
    over the samples, NOTE [lazy first order], is never written out) and the ops between the
    sources and the outputs (``nodes``, in the order they ran)."""

    entries: list[Entry] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    count: int = 0

    def key(self, jet: Jet) -> int:
        if jet.key is None:
            self.count += 1
            jet.key = self.count
        return jet.key

    def record(self, out: Jet, source: Tensor, scale: Tensor | None = None) -> None:
        self.entries.append(Entry(self.key(out), out.bdim, tuple(out.shape), source, scale))
        out.wants = True

    def found_bdim(self, out: Jet) -> None:
        """``out.bdim`` was found after its sources were recorded (the general rule)."""
        for e in reversed(self.entries):
            if e.key != out.key:
                break
            e.bdim = out.bdim


def record(out: Jet, source: Tensor, scale: Tensor | None = None) -> None:
    """Put a second-order source on the tape of ``out``'s pass, if it keeps one."""
    if out.spec.tape is not None:
        out.spec.tape.record(out, source, scale)


def link(
    out: Jet,
    parents: tuple[Jet, ...],
    back: Callable[[Tensor], Sequence[Tensor | None]],
    consts: tuple[Tensor, ...] = (),
) -> None:
    """Give ``out`` its node, with a closed-form ``back``: ``g [R, *out]`` to one cotangent per
    parent (a no-op without a tape, or when no source lies at or before ``out``); ``consts``:
    the tensors of the user's that ``back`` reads."""
    tape = out.spec.tape
    if tape is None or out.linked:
        return
    out.linked = True
    out.wants = out.wants or any(p.wants for p in parents)
    if out.wants:
        keys = tuple(tape.key(p) for p in parents)
        wanted = tuple(p.wants for p in parents)
        guards = tuple((t, t._version) for t in consts)
        node = Node(keys, wanted, (tape.key(out),), lambda gs: back(gs[0]), guards)  # type: ignore[arg-type]
        tape.nodes.append(node)


class _Slot:
    """Where a Jet argument was, in the arguments a node keeps for recomputing its op."""

    def __init__(self, key: int) -> None:
        self.key = key


def link_generic(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], jets: list[Jet], out: Any
) -> None:
    """A node for the Jets ``func`` returned without one: its vector-Jacobian product comes
    from recomputing ``func`` on the values under autograd, when the sweep needs it."""
    tape = jets[0].spec.tape
    parents = tuple({id(j): j for j in jets}.values())
    leaves = tree_flatten(out)[0]
    where = [
        i
        for i, y in enumerate(leaves)
        if isinstance(y, Jet) and not y.linked and all(y is not p for p in parents)
    ]
    if not where:
        return
    wants = any(p.wants for p in parents)
    for i in where:
        leaves[i].linked = True
        leaves[i].wants = leaves[i].wants or wants
    if not any(leaves[i].wants for i in where):
        return
    keys = tuple(tape.key(p) for p in parents)
    # the values alone, copied: a view would keep the whole stack alive
    values = {tape.key(p): p._stack[0].clone() for p in parents}
    flat, tree = tree_flatten((args, kwargs))
    flat = [_Slot(tape.key(a)) if isinstance(a, Jet) else a for a in flat]

    def back(gs: list[Tensor | None]) -> Sequence[Tensor | None]:
        return _recompute(func, flat, tree, values, keys, where, gs)

    outs = tuple(tape.key(leaves[i]) for i in where)
    guards = tuple((t, t._version) for t in flat if isinstance(t, Tensor))
    tape.nodes.append(Node(keys, tuple(p.wants for p in parents), outs, back, guards))


def _recompute(
    func: Any,
    flat: list[Any],
    tree: Any,
    values: dict[int, Tensor],
    keys: tuple[int, ...],
    where: list[int],
    gs: list[Tensor | None],
) -> Sequence[Tensor | None]:
    live = {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in values.items()}
    a, k = tree_unflatten([live[x.key] if isinstance(x, _Slot) else x for x in flat], tree)
    with torch.enable_grad():
        res = tree_flatten(func(*a, **k))[0]
    pairs = [(res[i], g) for i, g in zip(where, gs) if g is not None]
    pairs = [(y, g) for y, g in pairs if isinstance(y, Tensor) and y.requires_grad]
    if not pairs:
        return [None] * len(keys)
    ys, ins, create = [y for y, _ in pairs], [live[k] for k in keys], torch.is_grad_enabled()
    if pairs[0][1].shape[0] != 1:  # several output rows at once
        return batched_grad(ys, ins, [g for _, g in pairs], create, create)
    grads = torch.autograd.grad(
        ys, ins, [g[0] for _, g in pairs], create, create, allow_unused=True
    )
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
    keep = {e.key for e in tape.entries}
    g: dict[int, Tensor] = {}

    def add(key: int, c: Tensor) -> None:
        old = g.get(key)
        g[key] = c if old is None else old + c

    for y, c in zip(outs, out_cots):
        if y.key is not None:
            add(y.key, c)
    for node in reversed(tape.nodes):
        gs = [g.get(k) for k in node.outs]
        for k in node.outs:
            if k not in keep:
                g.pop(k, None)
        if all(c is None for c in gs):
            continue
        node.check()
        for k, wanted, cot in zip(node.parents, node.wanted, node.back(gs)):
            if cot is not None and wanted:
                add(k, cot)
    return g


def contract(
    outs: list[Jet],
    out_cots: list[Tensor],
    tape: Tape,
    shape: tuple[int, int, int],
    batched: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``[B, R, D]`` in ``dtype``: ``Σ_e <g_e, s_e[a]>`` per sample, output row and direction
    (``B = 1`` when unbatched). ``out_cots``: ``[R, *shape]`` per output."""
    with torch._C.DisableTorchFunctionSubclass():  # Jets read as their values here
        bsz, n_rows, d = shape
        res = torch.zeros(bsz, n_rows, d, dtype=dtype, device=device)
        if not tape.entries or not outs or bsz == 0 or d == 0:
            return res
        for e in tape.entries:
            if batched and (e.bdim is None or e.shape[e.bdim] != bsz):
                raise NeedForward
        try:
            grads = _sweep(outs, out_cots, tape)
        except NeedForward:
            raise
        except Exception as err:  # a recomputed op that cannot run batched over the rows
            raise NeedForward from err
        for e in tape.entries:
            g, s, c = grads.get(e.key), e.source, e.scale
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
