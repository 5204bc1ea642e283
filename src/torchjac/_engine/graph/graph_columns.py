"""Columns of a Jacobian on an existing graph, by double backward (NOTE [double backward] in
``graph_probes``), and the check that the backward they differentiate is differentiable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torchjac._engine.core.run import FinalError, run_chunks
from torchjac._engine.core.structure import reachable

if TYPE_CHECKING:
    from torchjac._engine.graph.graph_probes import GraphProblem

__all__ = ["DifferentiableCheck", "columns"]


def columns(p: GraphProblem, chunk_size: int) -> list[Tensor]:
    """Columns by double backward (NOTE [double backward]); storage ``[n_j, B, R]``."""
    outs, g_in, g_out = p.outputs, p.in_group, p.out_group
    live = [j for j, u in enumerate(p.used) if u]
    dummies = [torch.zeros_like(y).requires_grad_(True) for y in outs]
    # The dummies go in as they are: a view of them would put its backward on every column's path.
    g = torch.autograd.grad(
        outs, [p.inputs[j] for j in live], dummies, create_graph=True, allow_unused=True
    )
    trans = {j: gj for j, gj in zip(live, g) if gj is not None}
    for j, gj in trans.items():
        if not gj.requires_grad:
            raise FinalError(f"the backward of {p.input_names[j]} is not differentiable")
    check = DifferentiableCheck(p, trans, dummies)
    store = [
        (torch.empty if j in trans else torch.zeros)(
            (n, g_in.batch_size, p.n_rows), dtype=p.dtype, device=p.device
        )
        for j, n in enumerate(g_in.sizes)
    ]
    left = None
    if p.jac_outputs is not None:  # [k, B, m_i] per output
        left = [g_out.probe_major(i, a).to(p.dtype) for i, a in enumerate(p.jac_outputs)]

    def probe(start: int, stop: int, batched: bool) -> tuple[Tensor | None, ...]:
        basis = g_in.one_hot(start, stop, p.dtype, p.device)
        sel = [j for j in trans if basis[j] is not None]
        if not sel:
            return tuple(None for _ in outs)
        tangents = [basis[j].to(p.inputs[j].dtype) for j in sel]  # type: ignore[union-attr]
        jv = p.grad([trans[j] for j in sel], dummies, tangents, batched)
        check(jv)
        return jv

    def write(start: int, stop: int, jv: tuple[Tensor | None, ...]) -> None:
        c = stop - start
        if left is not None:  # one block of k rows: [c, B, k]
            terms = [
                torch.einsum("cbm,kbm->cbk", g_out.probe_major(i, t).to(p.dtype), left[i])
                for i, t in enumerate(jv)
                if t is not None
            ]
            blocks: list[Tensor | None] = [torch.stack(terms).sum(0) if terms else None]
            sizes: tuple[int, ...] = (p.n_rows,)
        else:
            blocks = [None if t is None else g_out.probe_major(i, t) for i, t in enumerate(jv)]
            sizes = g_out.sizes
        parts = [
            torch.zeros(c, g_in.batch_size, m, dtype=p.dtype, device=p.device) if b is None else b
            for b, m in zip(blocks, sizes)
        ]
        for j, lo, hi in g_in.touched(start, stop):
            skip = g_in.offsets[j] + lo - start
            dest = store[j][lo:hi]  # contiguous [w, B, R]
            if len(parts) > 1 and not p.create_graph:  # one pass straight into the storage
                torch.cat([t[skip : skip + hi - lo] for t in parts], dim=2, out=dest)
                continue
            for off, size, t in zip(g_out.offsets if left is None else (0,), sizes, parts):
                dest[:, :, off : off + size].copy_(t[skip : skip + hi - lo])

    run_chunks(p.fn_name, g_in.numel, chunk_size, probe, write)
    return [s.permute(1, 2, 0) for s in store]


class DifferentiableCheck:
    """Raise unless ``J^T u`` for each input is a differentiable function of the dummies.

    A backward that cannot be differentiated (``@once_differentiable``, or one computed outside
    autograd) still returns a tensor that requires grad, but its graph stops short of the dummy
    ``u_i`` of an output i that depends on the input: those columns would silently be zero. An
    ``Error`` node on the path raises by itself. With one input, the probes tell: such a column
    comes back as ``None``. With several, a probe chunk may span them and another input may
    reach ``u_i``, so each input's graph is walked once, up front. Reachability alone misses a
    cut path beside one that does reach ``u_i`` (a weight decay term beside a custom Function):
    an ``@once_differentiable`` backward leaves its mark there, an ``Error`` node whose only input
    is a detached copy of its result, never run by the double backward, so with a custom
    ``Function`` on the graph each input's graph is searched for one. (A backward computed
    outside autograd beside a second path still goes unseen.)
    """

    def __init__(self, p: GraphProblem, trans: dict[int, Tensor], dummies: list[Tensor]) -> None:
        self.p, self.inputs = p, list(trans)
        self.depends: list[list[bool]] | None = None  # [output][k] for input inputs[k]
        if not p.counted.builtin:  # only a custom Function's backward is @once_differentiable
            forward = _nodes(p.outputs)
            for j, gj in trans.items():
                if _cut_once(gj, forward):
                    raise FinalError(
                        f"the backward from outputs to {p.input_names[j]} is not "
                        "differentiable (e.g. @once_differentiable)"
                    )
        if len(trans) > 1:
            for k, gj in enumerate(trans.values()):
                self._verify(k, reachable([gj], dummies))

    def __call__(self, jv: tuple[Tensor | None, ...]) -> None:
        if len(self.inputs) == 1:
            self._verify(0, [t is not None for t in jv])

    def _verify(self, k: int, reached: list[bool]) -> None:
        if all(reached):
            return
        p = self.p
        if self.depends is None:
            ins = [p.inputs[j] for j in self.inputs]
            self.depends = [reachable([y], ins) for y in p.outputs]
        if any(row[k] and not r for row, r in zip(self.depends, reached)):
            raise FinalError(
                f"the backward from outputs to {p.input_names[self.inputs[k]]} is not "
                "differentiable (e.g. @once_differentiable)"
            )


def _nodes(outs: Sequence[Tensor]) -> set[Any]:
    """The nodes of the graph behind ``outs``: NOTE [node identity]."""
    stack = [y.grad_fn for y in outs if y.grad_fn is not None]
    seen = set(stack)
    while stack:
        for n in (n for n, _ in stack.pop().next_functions if n is not None):
            if n not in seen:
                seen.add(n)
                stack.append(n)
    return seen


def _cut_once(g: Tensor, forward: set[Any]) -> bool:
    """Whether the graph of ``g`` holds the ``Error`` node of an ``@once_differentiable``
    backward: a path to the cotangents that autograd silently drops. Only the nodes the
    backward made are searched: ``forward`` (the outputs' graph, which ``g``'s reaches through
    saved tensors) may hold one upstream of an input (``create_graph`` forces through such a
    backward), and none there is on a path from the outputs to the inputs."""
    if g.grad_fn is None or g.grad_fn in forward:
        return False
    stack, seen = [g.grad_fn], {g.grad_fn}  # the nodes themselves: NOTE [node identity]
    while stack:
        node = stack.pop()
        if type(node).__name__ == "Error":
            return True
        for n in (n for n, _ in node.next_functions if n is not None):
            if n not in seen and n not in forward:
                seen.add(n)
                stack.append(n)
    return False
