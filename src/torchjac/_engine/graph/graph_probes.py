"""Probes on an existing autograd graph: rows by backward passes, columns by double backward.

NOTE [double backward]: on a graph there is no forward mode, but ``g(u) = J^T u`` (a backward
pass with a dummy cotangent ``u`` that requires grad, built with ``create_graph=True``) is linear
in ``u``, so a backward pass of ``g`` with cotangent ``v`` gives ``d/du <g(u), v> = J v``: one
column per probe. It needs every backward on the path to be differentiable; when one is not, the
rows are computed instead (one ``FallbackWarning``).

NOTE [retain_graph] (in ``graph_release``): probes always keep the graph; ``solve`` frees it
once they are done, when ``retain_graph=False``.

NOTE [one pass frees]: when the rows take one vectorised pass, with ``retain_graph=False`` and no
``create_graph``, and every node of the graph is torch's own (no custom ``Function``, whose
backward may do what vmap cannot: ``.item()``, data-dependent control flow; none of torch's
whose backward vmap cannot run either: ``group_norm`` on a channels-last input, which made
``jac``/``gramian`` through a channels-last ``GroupNorm`` raise), that pass frees the
graph itself, as ``torch.autograd.grad`` does, and the release pass is skipped: it cost 0.1-0.25
ms, a fifth of the Gramian of 4 losses of a 64-wide trunk. Should such a pass still fail (a
user's hook), it cannot be retried as a loop, part of the graph may be gone: the error says so
and names the fixes (``chunk_size=1``, ``retain_graph=True``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.core.attention import FIX, names_fused_attention
from torchjac._engine.core.basis import Group
from torchjac._engine.core.lean_vmap import batched_grad
from torchjac._engine.core.plan import GRAPH_COLUMN_COST, choose_graph_chunk_size, choose_mode
from torchjac._engine.core.run import FinalError, run_chunks
from torchjac._engine.core.structure import check_independent
from torchjac._engine.graph.graph_columns import columns
from torchjac._engine.graph.graph_release import release_graph, retained_batch_hint
from torchjac._engine.kernel import kernels
from torchjac._errors import fallback_scope, warn_fallback

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
    retained: tuple[Tensor, ...] = ()  # retain_grad() outputs and inputs: NOTE [retain_grad]

    @property
    def n_rows(self) -> int:
        return (
            self.jac_outputs[0].shape[0] if self.jac_outputs is not None else self.out_group.numel
        )

    @functools.cached_property
    def dtype(self) -> torch.dtype:
        dtype = self.outputs[0].dtype
        for t in (*self.outputs, *self.inputs):
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype

    @functools.cached_property
    def counted(self) -> kernels.GraphProducts:
        """One walk of the graph for the planners (NOTE [loop or vmap on a graph])."""
        return kernels.graph_products(self.outputs)

    def walk(self, visit: Callable[[Any], None]) -> None:
        """Call ``visit`` on every node of the graph, in the walk that sets ``counted``."""
        self.__dict__["counted"] = kernels.graph_products(self.outputs, visit)

    def replaced(self, **changes: Any) -> GraphProblem:
        """``dataclasses.replace``; the same outputs are the same graph, so its count is kept
        (not walked again)."""
        new = replace(self, **changes)
        if "counted" in self.__dict__ and "outputs" not in changes:
            new.__dict__["counted"] = self.counted
        return new

    @property
    def used_inputs(self) -> tuple[Tensor, ...]:
        return tuple(x for x, u in zip(self.inputs, self.used) if u)

    @property
    def device(self) -> torch.device:
        return self.outputs[0].device

    def check_coupling(self) -> None:
        """With ``batch_dim``: raise ``BatchCouplingError`` unless samples are independent."""
        if self.batch_dim is None:
            return
        check_independent(
            self.fn_name,
            self.batch_dim,
            self.out_group,
            self.in_group,
            self.input_names,
            self.dtype,
            self.device,
            lambda cots: [  # full input shapes: drop the probe dimension grad adds
                None if g is None else g[0]
                for g in self.grad(
                    self.outputs, self.inputs, [c.unsqueeze(0) for c in cots], False, False
                )
            ],
        )

    def grad(
        self,
        outputs: Sequence[Tensor],
        inputs: Sequence[Tensor],
        cotangents: Sequence[Tensor],
        batched: bool,
        create_graph: bool | None = None,
        retain: bool = True,
    ) -> tuple[Tensor | None, ...]:
        """``autograd.grad`` with a leading probe dimension on cotangents and results; the graph
        is kept (NOTE [retain_graph]).

        NOTE [vmap over the graph]: batched probes run functorch's vmap over
        ``torch.autograd.grad`` on the existing graph, not ``is_grads_batched`` (the legacy vmap):
        its batching rules are complete where the legacy ones loop inside (a matrix-vector
        backward ran 14x slower), and it is never slower on the workloads measured. It is entered
        without ``torch.func.vmap``'s wrapper (NOTE [lean vmap]).

        An input the outputs do not reach gets ``None`` on both paths.
        """
        cg = self.create_graph if create_graph is None else create_graph
        outs, ins = list(outputs), list(inputs)
        for t in self.retained:  # NOTE [retain_grad]: a pass never adds to an earlier one's
            t.grad = None
        if not batched:
            grads = torch.autograd.grad(
                outs, ins, [c[0] for c in cotangents], retain, cg, allow_unused=True
            )
            return tuple(None if g is None else g.unsqueeze(0) for g in grads)
        return batched_grad(outs, ins, list(cotangents), retain, cg)


def solve(
    problem: GraphProblem,
    mode: str,
    chunk_size: int | None,
    budget: int,
    *,
    native: bool = False,
) -> list[Tensor]:
    """Run the plan; one ``[B, rows, n_j]`` tensor per input (a view of probe-major storage).

    ``native`` (only without ``batch_dim``): ``[rows, *x.shape]`` per input instead, in whatever
    strides the pass produced (NOTE [native rows]).
    """
    native = native and problem.batch_dim is None
    freed: list[bool] = []
    with fallback_scope(), retained_batch_hint(problem.fn_name):  # NOTE [fallback]
        result = _solve(problem, mode, chunk_size, budget, native, freed)
    if not problem.retain_graph and not freed:  # NOTE [retain_graph]
        release_graph(problem.outputs, problem.used_inputs, problem.retained)
    return result


def _solve(
    problem: GraphProblem,
    mode: str,
    chunk_size: int | None,
    budget: int,
    native: bool,
    freed: list[bool],
) -> list[Tensor]:
    p = problem
    p.check_coupling()
    n_cols = sum(s for s, u in zip(p.in_group.sizes, p.used) if u)
    chosen = choose_mode(mode, p.n_rows, n_cols, GRAPH_COLUMN_COST)
    full = sum(t.numel() for t in (*p.outputs, *p.inputs))
    per_probe = 4 * full * p.dtype.itemsize
    counted = p.counted
    work = min(p.n_rows, n_cols) * full

    def chunks(n_probes: int) -> int:
        # NOTE [loop or vmap on a graph]: a row's backward does about twice the forward's products
        return choose_graph_chunk_size(
            n_probes,
            per_probe,
            budget,
            chunk_size,
            nodes=counted.nodes,
            macs=2 * counted.macs,
            products=2 * counted.products,
            device=p.device,
        )

    row_chunk = chunks(p.n_rows) if chosen == "rev" or n_cols == 0 else 0
    per_pass = 2 * row_chunk * counted.big_macs if row_chunk > 1 else 0
    products = kernels.backward_products(p.outputs, p.dtype, p.device, work, counted, per_pass)
    with products or contextlib.nullcontext():
        if chosen == "fwd" and n_cols > 0:
            try:
                flat = columns(p, chunks(n_cols))
                if not native:
                    return flat
                return [f.reshape(p.n_rows, *s) for f, s in zip(flat, p.in_group.shapes)]
            except RuntimeError as err:
                # one FallbackWarning per call: a later vmap -> loop one is dropped (fallback_scope)
                what = "columns by double backward failed, computed rows"
                if names_fused_attention(err):  # NOTE [fused attention]
                    what += f"; for columns, {FIX}"
                warn_fallback(p.fn_name, what, err)
        chunk = row_chunk or chunks(p.n_rows)
        if one_pass_frees(p, chunk, counted.builtin):
            freed.append(True)
        return _rows(p, chunk, native, freeing=bool(freed))


def freed_message(fn_name: str, err: Exception) -> str:
    """NOTE [one pass frees]: a failed pass that may have freed part of the graph."""
    return (
        f"{fn_name}: the vectorised pass failed ({type(err).__name__}: {err}) and, with "
        "retain_graph=False, "
        "it may have freed part of the graph, so it cannot be retried as a loop: pass "
        "chunk_size=1 (a loop) or retain_graph=True"
    )


def _storage(p: GraphProblem, dims: tuple[int, ...], j: int) -> Tensor:
    """Uninitialised storage for input ``j``; zeros for an input the outputs do not use."""
    alloc = torch.empty if p.used[j] else torch.zeros
    return alloc(dims, dtype=p.dtype, device=p.device)


def one_pass_frees(p: GraphProblem, chunk: int, builtin: bool) -> bool:
    """NOTE [one pass frees]: whether the rows' only pass may free the graph itself."""
    return not p.retain_graph and not p.create_graph and builtin and chunk >= max(p.n_rows, 2)


def _rows(
    p: GraphProblem, chunk_size: int, native: bool = False, freeing: bool = False
) -> list[Tensor]:
    """Rows by backward passes; storage ``[R, B, n_j]`` (``native``: ``[R, *x_j.shape]``).

    NOTE [native rows]: a vectorised pass of all rows at once returns each input's rows in the
    strides autograd chose (a Linear weight's rows come transposed, ``[R, out, in]`` with ``in``
    outermost), and that result is adopted as the answer (``_adoptable``). Flattening it to
    ``[R, 1, n_j]`` would copy all of ``J`` (3-8% of a multi-task Jacobian, measured on W5), so
    ``jac`` and ``gramian``, which need no flat layout, ask for the native shape and reshape it
    only where the public layout differs.
    """
    outs, ins, g_in = p.outputs, p.inputs, p.in_group
    live = [j for j, u in enumerate(p.used) if u]
    if native:
        dims: list[tuple[int, ...]] = [(p.n_rows, *s) for s in g_in.shapes]
    else:
        dims = [(p.n_rows, g_in.batch_size, n) for n in g_in.sizes]
    if not live:  # allow_unused and nothing is used: all zeros, and autograd.grad needs inputs
        if native:
            return [_storage(p, d, j) for j, d in enumerate(dims)]
        return [_storage(p, d, j).permute(1, 0, 2) for j, d in enumerate(dims)]
    store: list[Tensor | None] = [
        None if j in live else _storage(p, dims[j], j) for j in range(len(dims))
    ]

    def probe(start: int, stop: int, batched: bool) -> tuple[Tensor | None, ...]:
        if p.jac_outputs is not None:
            sel = list(range(len(outs)))
            cots = [p.jac_outputs[i][start:stop].to(outs[i].dtype) for i in sel]
        else:
            basis = p.out_group.one_hot(start, stop, p.dtype, p.device)
            sel = [i for i, b in enumerate(basis) if b is not None]
            cots = [basis[i].to(outs[i].dtype) for i in sel]  # type: ignore[union-attr]
        targets = [outs[i] for i in sel]
        if not freeing:
            return p.grad(targets, [ins[j] for j in live], cots, batched)
        try:
            return p.grad(targets, [ins[j] for j in live], cots, batched, retain=False)
        except Exception as err:  # NOTE [one pass frees]: final, never retried as a loop
            raise FinalError(freed_message(p.fn_name, err)) from err

    def write(start: int, stop: int, grads: tuple[Tensor | None, ...]) -> None:
        for j, g in zip(live, grads):
            block = g if native or g is None else g_in.probe_major(j, g)
            if start == 0 and stop == p.n_rows and store[j] is None and _adoptable(p, block):
                store[j] = block  # one pass made every row: its result is the storage, no copy
                continue
            target = store[j]
            if target is None:
                target = store[j] = _storage(p, dims[j], j)
            target[start:stop] = 0 if block is None else block

    run_chunks(p.fn_name, p.n_rows, chunk_size, probe, write)
    done = [_storage(p, d, j) if s is None else s for j, (s, d) in enumerate(zip(store, dims))]
    return done if native else [s.permute(1, 0, 2) for s in done]


def _adoptable(p: GraphProblem, block: Tensor | None) -> bool:
    """Whether a pass's result can be the storage itself: our own one-hot cotangents made it (no
    ``jac_outputs`` of the user's to alias), in the result's dtype, its memory its own (no
    stride-0 broadcast of a cotangent, no other tensor on its storage)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: absent means no
    return (
        block is not None
        and use_count is not None
        and p.jac_outputs is None
        and block.dtype == p.dtype
        and torch._debug_has_internal_overlap(block) == 0
        and use_count(block.untyped_storage()._cdata) <= 3
    )
