"""Gramians ``J Jᵀ`` of tensors on a graph, one block of ``J`` at a time.

NOTE [gramian blocks]: ``J Jᵀ = Σ_j J_j J_jᵀ`` over the inputs (column blocks of ``J``), so the
Gramian is accumulated input group by input group: each group's block ``J_j`` (``[B, m, n_j]``)
is solved by the graph engine (rows or columns, chunked, with its fallbacks), multiplied into the
``[B, m, m]`` accumulator and freed. Groups are packed so one group's blocks fit in half of the
memory budget. An input whose block alone does not fit is streamed by row chunks:
``G[r, s] = J_r J_sᵀ`` for every pair of row chunks, recomputing ``J_s`` (``m·(1 + m/2c)`` row
probes in all, but only two ``[B, c, n_j]`` chunks alive). With ``batch_dim`` the samples are
independent, ``J`` is block-diagonal and only the per-sample Gramians ``[B, m, m]`` are formed.
Without ``batch_dim``, when rows are the cheaper probes, one vectorised pass gives every block
at once and weights used once by ``F.linear`` are taken as ghost products where that is cheaper
(NOTE [graph ghost], NOTE [ghost or rows]); the blocks above are the path when that does not fit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchjac._engine.core.basis import Group
from torchjac._engine.core.plan import GRAPH_COLUMN_COST, choose_chunk_size, choose_mode
from torchjac._engine.core.run import run_chunks
from torchjac._engine.graph.graph_ghost import Consumers, find_ghost_layers, ghost_gramian
from torchjac._engine.graph.graph_probes import GraphProblem, solve
from torchjac._engine.graph.graph_release import release_graph, retained_batch_hint

__all__ = ["graph_gramian"]


def graph_gramian(
    problem: GraphProblem,
    mode: str,
    chunk_size: int | None,
    budget: int,
    walked: Consumers | None = None,
) -> Tensor:
    """Per-sample Gramian ``[B, m, m]`` (``B = 1`` without ``batch_dim``) of ``problem``;
    ``walked``: the graph's consumers, collected by the walk of the call's validation.

    Every block keeps the graph; it is freed once, at the end (NOTE [retain_graph]).
    """
    kept = problem.replaced(retain_graph=True)
    freed: list[bool] = []  # NOTE [one pass frees]
    with retained_batch_hint(problem.fn_name):
        free = (not problem.retain_graph, freed)
        gram = _gramian(kept, mode, chunk_size, budget, free, walked)
    if not problem.retain_graph and not freed:
        release_graph(problem.outputs, problem.used_inputs, problem.retained)
    return gram


def _gramian(
    p: GraphProblem,
    mode: str,
    chunk_size: int | None,
    budget: int,
    free: tuple[bool, list[bool]],
    walked: Consumers | None,
) -> Tensor:
    p.check_coupling()
    if p.batch_dim is None and not p.create_graph and mode != "fwd":
        ghosts = find_ghost_layers(p, walked=walked)  # NOTE [graph ghost]
        ghosted = {g.j for g in ghosts if g.ghost}
        n_cols = sum(s for j, s in enumerate(p.in_group.sizes) if p.used[j] and j not in ghosted)
        if not n_cols or choose_mode(mode, p.n_rows, n_cols, GRAPH_COLUMN_COST) == "rev":
            one_pass = ghost_gramian(p, ghosts, chunk_size, budget, free)
            if one_pass is not None:
                return one_pass
    bsz, m = p.in_group.batch_size, p.n_rows
    gram = torch.zeros(bsz, m, m, dtype=p.dtype, device=p.device)
    block_bytes = [bsz * m * n * p.dtype.itemsize for n in p.in_group.sizes]
    half = max(budget // 2, 1)
    plan: list[tuple[str, list[int], int]] = []  # ("group" | "stream", inputs, bytes held)
    group: list[int] = []
    filled = 0
    for j in (j for j, u in enumerate(p.used) if u):
        if block_bytes[j] > half:
            plan.append(("stream", [j], 0))
            continue
        if group and filled + block_bytes[j] > half:
            plan.append(("group", group, filled))
            group, filled = [], 0
        group.append(j)
        filled += block_bytes[j]
    if group:
        plan.append(("group", group, filled))
    for kind, js, held in plan:
        if kind == "stream":
            gram = gram + _streamed(p, js[0], chunk_size, half)
        else:
            gram = gram + _grouped(_subproblem(p, js), mode, chunk_size, budget - held)
    return gram


def _subproblem(p: GraphProblem, group: list[int]) -> GraphProblem:
    ins = tuple(p.inputs[j] for j in group)
    return p.replaced(
        inputs=ins,
        input_names=tuple(p.input_names[j] for j in group),
        used=tuple(True for _ in group),
        in_group=Group.of(ins, p.batch_dim),
        batch_dim=None,  # coupling already checked for all inputs; the groups keep the layout
    )


def _grouped(sub: GraphProblem, mode: str, chunk_size: int | None, budget: int) -> Tensor:
    """``Σ_j J_j J_jᵀ`` over the inputs of ``sub``, each ``J_j`` solved whole by the engine."""
    p = sub
    blocks = solve(sub, mode, chunk_size, max(budget, 1))
    gram = blocks[0].to(p.dtype) @ blocks[0].to(p.dtype).transpose(1, 2)
    for blk in blocks[1:]:
        gram = gram + blk.to(p.dtype) @ blk.to(p.dtype).transpose(1, 2)
    return gram


def _streamed(p: GraphProblem, j: int, chunk_size: int | None, budget: int) -> Tensor:
    """``J_j J_jᵀ`` for one input too large to hold ``J_j``: pairs of row chunks."""
    sub = _subproblem(p, [j])
    bsz, m, n = p.in_group.batch_size, p.n_rows, p.in_group.sizes[j]
    per_row = 3 * bsz * n * p.dtype.itemsize  # two held chunks and the probe itself
    c = choose_chunk_size(m, per_row, budget, None)
    inner = c if chunk_size is None else min(chunk_size, c)
    gram = torch.zeros(bsz, m, m, dtype=p.dtype, device=p.device)
    for r0 in range(0, m, c):
        r1 = min(m, r0 + c)
        left = _row_block(sub, r0, r1, inner)
        for s0 in range(r0, m, c):
            s1 = min(m, s0 + c)
            right = left if s0 == r0 else _row_block(sub, s0, s1, inner)
            tile = left @ right.transpose(1, 2)
            gram[:, r0:r1, s0:s1] = tile
            if s0 != r0:
                gram[:, s0:s1, r0:r1] = tile.transpose(1, 2)
    return gram


def _row_block(p: GraphProblem, start: int, stop: int, chunk_size: int) -> Tensor:
    """Rows ``start..stop-1`` of ``J`` for the single input of ``p``: ``[B, c, n]``."""
    out = torch.zeros(
        p.in_group.batch_size, stop - start, p.in_group.sizes[0], dtype=p.dtype, device=p.device
    )
    outs = p.outputs

    def probe(lo: int, hi: int, batched: bool) -> tuple[Tensor | None, ...]:
        basis = p.out_group.one_hot(start + lo, start + hi, p.dtype, p.device)
        sel = [i for i, b in enumerate(basis) if b is not None]
        cots = [basis[i].to(outs[i].dtype) for i in sel]  # type: ignore[union-attr]
        return p.grad([outs[i] for i in sel], [p.inputs[0]], cots, batched)

    def write(lo: int, hi: int, grads: tuple[Tensor | None, ...]) -> None:
        if grads[0] is not None:
            out[:, lo:hi] = p.in_group.flatten(0, grads[0])

    run_chunks(p.fn_name, stop - start, chunk_size, probe, write)
    return out
