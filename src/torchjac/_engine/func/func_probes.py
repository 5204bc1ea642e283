"""First-order probes of a function: rows by batched backward passes, columns by forward mode.

NOTE [function probes]: the function is called once with plain autograd, as the user would call
it (this gives the outputs' shapes for planning, the aux value, the batch coupling check, and the
graph that rows are read from: one vectorised backward pass for many one-hot cotangents, by
functorch's vmap over ``autograd.grad`` (NOTE [vmap over the graph]); the legacy vmap of
``is_grads_batched`` returned wrong rows through the backward of a fused normalisation that the
function differentiates itself, ``torch.func.grad`` of an energy through ``F.group_norm``, off
by 0.18 on torch 2.13). Columns are forward mode: the Taylor mode's first-order part (NOTE
[taylor mode], one pass carrying every direction) when all columns fit in one pass, else
``torch.func.jvp`` vmapped over chunks of one-hot tangents. With ``batch_dim`` the one-hot probes
are broadcast over the batch (NOTE [flat layout]), so a per-sample Jacobian costs ``out`` (or
``in``) probes and never forms the ``[B, ..., B, ...]`` cross terms. Forward-mode AD can be
missing for an op (a custom ``autograd.Function`` without ``jvp``): then rows are computed, with
one ``FallbackWarning``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from torchjac._engine.core.basis import Group
from torchjac._engine.core.func_call import FuncProblem, forward_jvp
from torchjac._engine.core.lean_vmap import batched_grad
from torchjac._engine.core.plan import choose_chunk_size, choose_mode
from torchjac._engine.core.run import run_chunks
from torchjac._engine.core.structure import check_independent
from torchjac._engine.taylor.taylor_chain import chain_rows
from torchjac._engine.taylor.taylor_run import TaylorFailed, TaylorResult, taylor
from torchjac._errors import warn_fallback

__all__ = [
    "GRAD_OFF",
    "CheckBatch",
    "Traced",
    "autograd_trace",
    "bytes_per_probe",
    "solve_jacobian",
    "zeros_for",
]

CheckBatch = Callable[[tuple[Tensor, ...]], None]
# NOTE [forward mode and no_grad]: the cause named by the FallbackWarning
GRAD_OFF = (
    "an op ran with gradients disabled: a torch.no_grad() block or a custom autograd.Function"
)
# Columns are planned without calling the function first (so without counting its rows) when
# there are at most this many: the Taylor-mode pass then costs a few forward passes at most.
BLIND_COLUMNS = 4
# A Taylor-mode column relative to a backward row: the same matrix products, in one pass with no
# vectorisation or autograd overhead; ties go to columns.
TAYLOR_COLUMN_COST = 0.95


@dataclass
class Traced:
    """The function called once with autograd: outputs, aux, layouts, and backward passes."""

    outputs: tuple[Tensor, ...]  # detached
    graph_outputs: tuple[Tensor, ...]  # on the graph (may not require grad: constants)
    graph_inputs: tuple[Tensor, ...]
    aux: Any
    out_group: Group
    in_group: Group
    create_graph: bool
    # (cotangents, gradients) of the coupling check's pullback, reused by NOTE [taylor check]
    probe: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None
    grad_off: bool = False  # NOTE [forward mode and no_grad], when the trace watched for it
    graph: bool = True  # False: called without autograd (``plain_trace``), no pullback

    @staticmethod
    def of(p: FuncProblem, outs: tuple[Tensor, ...], xs: tuple[Tensor, ...]) -> Traced:
        """The record of a call made elsewhere: ``outs`` on the graph from the leaves ``xs``."""
        return Traced(
            tuple(y.detach() for y in outs),
            outs,
            xs,
            None,
            Group.of(outs, p.batch_dim),
            Group.of(p.inputs, p.batch_dim),
            p.create_graph,
        )

    def pullback(
        self, cots: Sequence[Tensor], batched: bool = False, create_graph: bool = False
    ) -> tuple[Tensor, ...]:
        """Gradients of ``<outputs, cots>`` w.r.t. the inputs (zeros where unused)."""
        xs, live = (
            self.graph_inputs,
            [i for i, y in enumerate(self.graph_outputs) if y.requires_grad],
        )
        grads: Sequence[Tensor | None] = [None] * len(xs)
        outs, pulled = [self.graph_outputs[i] for i in live], [cots[i] for i in live]
        if live and batched:  # NOTE [vmap over the graph]: functorch's rules, not the legacy vmap
            grads = batched_grad(outs, list(xs), pulled, True, create_graph)
        elif live:
            grads = torch.autograd.grad(
                outs, xs, pulled, retain_graph=True, create_graph=create_graph, allow_unused=True
            )
        lead = (cots[0].shape[0],) if batched else ()
        return tuple(x.new_zeros(*lead, *x.shape) if g is None else g for g, x in zip(grads, xs))


class _GradOff(TorchFunctionMode):
    """Notes whether a torch function runs with gradients disabled."""

    found = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if not torch.is_grad_enabled():
            self.found = True
        return func(*args, **(kwargs or {}))


def autograd_trace(p: FuncProblem, check_batch: CheckBatch, forward: bool = False) -> Traced:
    """Call the function once (NOTE [function probes]); check the batch and its coupling.

    NOTE [forward mode and no_grad]: torch's forward-mode AD differentiates through a
    ``torch.no_grad()`` block (and a custom ``autograd.Function``'s forward), which reverse mode
    treats as a constant: ``jvp`` columns, and forward over reverse, disagree with rows there
    (off by the block's share). With ``forward`` (forward-mode probes will follow) the call
    notes any op run with gradients disabled in ``grad_off``, and the caller computes in
    reverse mode instead, with a ``FallbackWarning``, as the Taylor mode does (NOTE [taylor
    check]).
    """
    xs = tuple(x if x.requires_grad else x.detach().requires_grad_(True) for x in p.inputs)
    watch = _GradOff() if forward else contextlib.nullcontext()
    with torch.enable_grad(), watch:  # on copies: func may write into its arguments
        outs, aux = p.call(*(x.clone() for x in xs))
    check_batch(outs)
    t = Traced(
        tuple(y.detach() for y in outs),
        outs,
        xs,
        aux,
        Group.of(outs, p.batch_dim),
        Group.of(p.inputs, p.batch_dim),
        p.create_graph,
        grad_off=isinstance(watch, _GradOff) and watch.found,
    )
    if p.batch_dim is not None:

        def pull(cots: list[Tensor]) -> tuple[Tensor, ...]:
            cast = tuple(c.to(y.dtype) for c, y in zip(cots, t.outputs))
            grads = t.pullback(cast)
            t.probe = (cast, tuple(g.detach() for g in grads))
            return grads

        check_independent(
            p.fn_name,
            p.batch_dim,
            t.out_group,
            t.in_group,
            p.input_names,
            p.dtype,
            p.device,
            pull,
        )
    return t


def plain_trace(p: FuncProblem, check_batch: CheckBatch) -> Traced:
    """The function called once without autograd, for forward probes only: a ``func`` that
    reverse-mode AD cannot follow (an in-place write into one of ``split``'s views), which
    forward mode can. No batch (its coupling check pulls back) and no ``create_graph``."""
    with torch.no_grad():  # on copies: func may write into its arguments
        outs, aux = p.call(*(x.detach().clone() for x in p.inputs))
    check_batch(outs)
    t = Traced.of(p, outs, p.inputs)
    t.aux, t.graph = aux, False
    return t


def zeros_for(like: Tensor, c: int) -> Tensor:
    """A free (stride-0) zero probe for a tensor a chunk does not touch."""
    return torch.zeros((), dtype=like.dtype, device=like.device).expand(c, *like.shape)


def bytes_per_probe(p: FuncProblem, outs: Sequence[Tensor]) -> int:
    """A generous guess of the memory one vectorised probe needs (intermediates unknown)."""
    full = sum(t.numel() for t in (*outs, *p.inputs))
    return 16 * full * p.dtype.itemsize


def _probes(group: Group, like: Sequence[Tensor], start: int, stop: int) -> tuple[Tensor, ...]:
    basis = group.one_hot(start, stop, like[0].dtype, like[0].device)
    return tuple(
        zeros_for(t, stop - start) if b is None else b.to(t.dtype) for b, t in zip(basis, like)
    )


def solve_jacobian(
    p: FuncProblem, mode: str, chunk_size: int | None, budget: int, check_batch: CheckBatch
) -> tuple[list[Tensor], Traced | TaylorResult]:
    """Plan and run; return one ``[B, rows, n_j]`` tensor per input (B = 1 when unbatched)."""
    g_in = Group.of(p.inputs, p.batch_dim)
    d = g_in.numel
    columns_only = mode != "rev" and p.batch_dim is None and not p.create_graph
    in_bytes = 16 * sum(x.numel() for x in p.inputs) * p.dtype.itemsize
    t: Traced | None = None
    if mode == "auto" and d > BLIND_COLUMNS:
        rows = chain_rows(p)  # a plain MLP's width needs no counting pass (NOTE [taylor chain])
        rows = _count_rows(p, check_batch) if rows is None else rows
        mode = choose_mode(mode, rows, d, TAYLOR_COLUMN_COST)
    if mode != "rev" and (chunk_size or d) >= d and in_bytes * (d + 2) <= budget:
        try:
            res = taylor(p, "first", check_batch)  # [B, R, D]: every column in one pass
            return [res.result[:, :, o : o + n] for o, n in zip(g_in.offsets, g_in.sizes)], res
        except TaylorFailed as err:
            if not err.quiet:
                warn_fallback(p.fn_name, "Taylor-mode propagation could not follow func", err)
            mode = "rev" if err.reverse else mode  # NOTE [unreliable nested forward]
    if t is None:
        try:
            t = autograd_trace(p, check_batch, forward=mode != "rev")
        except RuntimeError as err:
            if not columns_only:
                raise
            t = plain_trace(p, check_batch)  # reverse-mode AD cannot follow func: columns
            if mode == "rev":  # "auto" chose rows
                warn_fallback(p.fn_name, "reverse-mode AD failed, computed columns", err)
            mode = "fwd"
    return _probes_on_trace(p, t, "fwd" if mode != "rev" else "rev", chunk_size, budget), t


def _count_rows(p: FuncProblem, check_batch: CheckBatch) -> int:
    """Output elements per sample: one plain forward pass, on the whole batch (DESIGN: ``func``
    always sees the batch exactly as the user would pass it)."""
    with torch.no_grad():  # on copies: func may write into its arguments
        outs, _ = p.call(*(x.clone() for x in p.inputs))
    check_batch(outs)
    return Group.of(outs, p.batch_dim).numel


def _probes_on_trace(
    p: FuncProblem, t: Traced, chosen: str, chunk_size: int | None, budget: int
) -> list[Tensor]:
    n_rows, n_cols = t.out_group.numel, t.in_group.numel
    per_probe = bytes_per_probe(p, t.outputs)
    results = [
        torch.zeros(t.in_group.batch_size, n_rows, s, dtype=p.dtype, device=p.device)
        for s in t.in_group.sizes
    ]
    if chosen == "fwd" and t.grad_off:  # NOTE [forward mode and no_grad]
        warn_fallback(p.fn_name, "forward mode cannot follow func, computed rows", GRAD_OFF)
        chosen = "rev"
    if chosen == "fwd":
        try:
            _columns(p, t, results, choose_chunk_size(n_cols, per_probe, budget, chunk_size))
            return results
        except (RuntimeError, NotImplementedError) as err:
            if not t.graph:  # neither mode follows func
                raise
            warn_fallback(p.fn_name, "forward-mode AD failed, computed rows in reverse mode", err)
            for r in results:
                r.zero_()
    _rows(p, t, results, choose_chunk_size(n_rows, per_probe, budget, chunk_size))
    return results


def _rows(p: FuncProblem, t: Traced, results: list[Tensor], chunk_size: int) -> None:
    def probe(start: int, stop: int, batched: bool) -> tuple[Tensor, ...]:
        cots = _probes(t.out_group, t.outputs, start, stop)
        if batched:
            return t.pullback(cots, True, p.create_graph)
        grads = t.pullback(tuple(c[0] for c in cots), False, p.create_graph)
        return tuple(g.unsqueeze(0) for g in grads)

    def write(start: int, stop: int, grads: tuple[Tensor, ...]) -> None:
        for j, g in enumerate(grads):
            results[j][:, start:stop] = t.in_group.flatten(j, g)

    run_chunks(p.fn_name, t.out_group.numel, chunk_size, probe, write)


def _columns(p: FuncProblem, t: Traced, results: list[Tensor], chunk_size: int) -> None:
    ins = p.inputs

    def push(*tangents: Tensor) -> tuple[Tensor, ...]:
        return tuple(forward_jvp(p.outputs_of_copies, ins, tangents)[1])

    def probe(start: int, stop: int, batched: bool) -> tuple[Tensor, ...]:
        tans = _probes(t.in_group, ins, start, stop)
        if batched:
            return tuple(torch.vmap(push, randomness="same")(*tans))  # NOTE [one draw per call]
        return tuple(y.unsqueeze(0) for y in push(*(v[0] for v in tans)))

    def write(start: int, stop: int, jv: tuple[Tensor, ...]) -> None:
        flat = [t.out_group.flatten(i, y) for i, y in enumerate(jv)]
        block = torch.cat(flat, dim=2) if len(flat) > 1 else flat[0]  # [B, c, m]
        for j, lo, hi in t.in_group.touched(start, stop):
            skip = t.in_group.offsets[j] + lo - start
            results[j][:, :, lo:hi] = block[:, skip : skip + hi - lo].transpose(1, 2)

    run_chunks(p.fn_name, t.in_group.numel, chunk_size, probe, write)
