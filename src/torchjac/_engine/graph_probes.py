"""Probes on an existing autograd graph: rows by backward passes, columns by double backward.

NOTE [double backward]: on a graph there is no forward mode, but ``g(u) = J^T u`` (a backward
pass with a dummy cotangent ``u`` that requires grad, built with ``create_graph=True``) is linear
in ``u``, so a backward pass of ``g`` with cotangent ``v`` gives ``d/du <g(u), v> = J v``: one
column per probe. It needs every backward on the path to be differentiable; when one is not, the
rows are computed instead (one ``FallbackWarning``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from torchjac._engine.basis import Group
from torchjac._engine.plan import GRAPH_COLUMN_COST, choose_chunk_size, choose_mode
from torchjac._engine.run import run_chunks
from torchjac._engine.structure import check_independent
from torchjac._errors import warn_fallback

__all__ = ["GraphProblem", "solve"]


@dataclass(frozen=True)
class GraphProblem:
    """A validated Jacobian question on a graph, in the flat layout of NOTE [flat layout]."""

    fn_name: str
    outputs: tuple[Tensor, ...]
    inputs: tuple[Tensor, ...]
    input_names: tuple[str, ...]
    used: tuple[bool, ...]
    jac_outputs: tuple[Tensor, ...] | None
    out_group: Group
    in_group: Group
    batch_dim: int | None
    create_graph: bool
    retain_graph: bool

    @property
    def n_rows(self) -> int:
        return (
            self.jac_outputs[0].shape[0] if self.jac_outputs is not None else self.out_group.numel
        )

    @property
    def dtype(self) -> torch.dtype:
        dtype = self.outputs[0].dtype
        for t in (*self.outputs, *self.inputs):
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype

    @property
    def device(self) -> torch.device:
        return self.outputs[0].device

    def grad(
        self,
        outputs: Sequence[Tensor],
        inputs: Sequence[Tensor],
        cotangents: Sequence[Tensor],
        batched: bool,
        create_graph: bool | None = None,
    ) -> tuple[Tensor | None, ...]:
        """``autograd.grad`` with a leading probe dimension on cotangents and results."""
        cg = self.create_graph if create_graph is None else create_graph
        if not batched:
            cotangents = [c[0] for c in cotangents]
        grads = torch.autograd.grad(
            list(outputs),
            list(inputs),
            list(cotangents),
            retain_graph=True,
            create_graph=cg,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return tuple(g if g is None or batched else g.unsqueeze(0) for g in grads)


def solve(problem: GraphProblem, mode: str, chunk_size: int | None, budget: int) -> list[Tensor]:
    """Run the plan; return one ``[B, rows, n_j]`` tensor per input."""
    p = problem
    if p.batch_dim is not None:
        check_independent(
            p.fn_name,
            p.batch_dim,
            p.out_group,
            p.in_group,
            p.input_names,
            p.dtype,
            p.device,
            lambda cots: [  # full input shapes: drop the probe dimension p.grad adds
                None if g is None else g[0]
                for g in p.grad(p.outputs, p.inputs, [c.unsqueeze(0) for c in cots], False, False)
            ],
        )
    results = [
        torch.zeros(p.in_group.batch_size, p.n_rows, size, dtype=p.dtype, device=p.device)
        for size in p.in_group.sizes
    ]
    n_cols = sum(s for s, u in zip(p.in_group.sizes, p.used) if u)
    chosen = choose_mode(mode, p.n_rows, n_cols, GRAPH_COLUMN_COST)
    full = sum(t.numel() for t in (*p.outputs, *p.inputs))
    per_probe = 4 * full * p.dtype.itemsize
    if chosen == "fwd" and n_cols > 0:
        try:
            _columns(p, results, choose_chunk_size(n_cols, per_probe, budget, chunk_size))
            return results
        except RuntimeError as err:
            if mode == "fwd":
                raise
            warn_fallback(p.fn_name, "columns by double backward failed, computed rows", err)
            for r in results:
                r.zero_()
    _rows(p, results, choose_chunk_size(p.n_rows, per_probe, budget, chunk_size))
    return results


def _rows(p: GraphProblem, results: list[Tensor], chunk_size: int) -> None:
    outs, ins = p.outputs, p.inputs
    live = [j for j, u in enumerate(p.used) if u]

    def probe(start: int, stop: int, batched: bool) -> tuple[Tensor | None, ...]:
        if p.jac_outputs is not None:
            sel = list(range(len(outs)))
            cots = [p.jac_outputs[i][start:stop].to(outs[i].dtype) for i in sel]
        else:
            basis = p.out_group.one_hot(start, stop, p.dtype, p.device)
            sel = [i for i, b in enumerate(basis) if b is not None]
            cots = [basis[i].to(outs[i].dtype) for i in sel]  # type: ignore[union-attr]
        return p.grad([outs[i] for i in sel], [ins[j] for j in live], cots, batched)

    def write(start: int, stop: int, grads: tuple[Tensor | None, ...]) -> None:
        for j, g in zip(live, grads):
            if g is not None:
                results[j][:, start:stop] = p.in_group.flatten(j, g)

    run_chunks(p.fn_name, p.n_rows, chunk_size, probe, write)


def _columns(p: GraphProblem, results: list[Tensor], chunk_size: int) -> None:
    """Columns by double backward, see NOTE [double backward]."""
    outs = p.outputs
    live = [j for j, u in enumerate(p.used) if u]
    dummies = [torch.zeros_like(y).requires_grad_(True) for y in outs]
    g = p.grad(outs, [p.inputs[j] for j in live], [d.unsqueeze(0) for d in dummies], False, True)
    trans = {j: gj[0] for j, gj in zip(live, g) if gj is not None}
    for j, gj in trans.items():
        if not gj.requires_grad:
            raise RuntimeError(f"the backward of {p.input_names[j]} is not differentiable")
    left = None
    if p.jac_outputs is not None:  # [B, k, m]
        flat = [p.out_group.flatten(i, a) for i, a in enumerate(p.jac_outputs)]
        left = torch.cat(flat, dim=2).to(p.dtype)
    n_cols = p.in_group.numel
    cols = [j for j in range(len(p.inputs)) if j in trans]

    def probe(start: int, stop: int, batched: bool) -> tuple[Tensor | None, ...]:
        basis = p.in_group.one_hot(start, stop, p.dtype, p.device)
        sel = [j for j in cols if basis[j] is not None]
        if not sel:
            return tuple(None for _ in outs)
        tangents = [basis[j].to(p.inputs[j].dtype) for j in sel]  # type: ignore[union-attr]
        return p.grad([trans[j] for j in sel], dummies, tangents, batched)

    def write(start: int, stop: int, jv: tuple[Tensor | None, ...]) -> None:
        c = stop - start
        flat = [
            p.out_group.flatten(i, t)
            if t is not None
            else torch.zeros(
                p.out_group.batch_size, c, p.out_group.sizes[i], dtype=p.dtype, device=p.device
            )
            for i, t in enumerate(jv)
        ]
        block = torch.cat(flat, dim=2) if len(flat) > 1 else flat[0]  # [B, c, m]
        if left is not None:
            block = torch.einsum("bcm,bkm->bck", block.to(p.dtype), left)
        for j, lo, hi in p.in_group.touched(start, stop):
            skip = p.in_group.offsets[j] + lo - start
            results[j][:, :, lo:hi] = block[:, skip : skip + hi - lo].transpose(1, 2)

    run_chunks(p.fn_name, n_cols, chunk_size, probe, write)
