"""First-order probes of a function: rows by ``torch.func.vjp``, columns by ``torch.func.jvp``.

NOTE [function probes]: the function is called once under ``torch.func.vjp`` (this gives the
outputs' shapes for planning, the aux value, and the pullback used for rows and for the batch
coupling check). Rows are the pullback vmapped over one-hot cotangents; columns are ``jvp``
vmapped over one-hot tangents. With ``batch_dim`` the one-hot probes are broadcast over the batch
(NOTE [flat layout]), so a per-sample Jacobian costs ``out`` (or ``in``) probes and never forms
the ``[B, ..., B, ...]`` cross terms. Forward-mode AD can be missing for an op (a custom
``autograd.Function`` without ``jvp``): then rows are computed, with one ``FallbackWarning``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.basis import Group
from torchjac._engine.func_call import FuncProblem
from torchjac._engine.func_graph import TraceFailed
from torchjac._engine.plan import FUNC_COLUMN_COST, choose_chunk_size, choose_mode
from torchjac._engine.run import run_chunks
from torchjac._engine.structure import check_independent
from torchjac._errors import warn_fallback

__all__ = ["Traced", "bytes_per_probe", "jacobian_probes", "trace", "zeros_for"]


@dataclass
class Traced:
    """The function called once under ``torch.func.vjp``: outputs, pullback, aux, layouts."""

    outputs: tuple[Tensor, ...]
    pullback: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]
    aux: Any
    out_group: Group
    in_group: Group
    # (cotangents, gradients) of the coupling check's pullback, reused by NOTE [taylor check]
    probe: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None


def trace(p: FuncProblem, check_batch: Callable[[tuple[Tensor, ...]], None]) -> Traced:
    """Call the function once (see NOTE [function probes]); check the batch and its coupling."""
    try:
        outs, pullback, aux_tensors = torch.func.vjp(p.traced, *p.inputs, has_aux=True)  # type: ignore[misc]
    except RuntimeError as err:  # see NOTE [graph fallback]
        raise TraceFailed(err) from err
    aux = p.aux(list(aux_tensors)) if p.has_aux else None
    check_batch(outs)
    t = Traced(outs, pullback, aux, Group.of(outs, p.batch_dim), Group.of(p.inputs, p.batch_dim))
    if p.batch_dim is not None:

        def pull(cots: list[Tensor]) -> tuple[Tensor, ...]:
            cast = tuple(c.to(y.dtype) for c, y in zip(cots, outs))
            grads = tuple(pullback(cast))
            t.probe = (cast, grads)
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


def jacobian_probes(
    p: FuncProblem, t: Traced, mode: str, chunk_size: int | None, budget: int
) -> list[Tensor]:
    """Run the plan; return one ``[B, rows, n_j]`` tensor per input (B = 1 when unbatched)."""
    n_rows, n_cols = t.out_group.numel, t.in_group.numel
    chosen = choose_mode(mode, n_rows, n_cols, FUNC_COLUMN_COST)
    per_probe = bytes_per_probe(p, t.outputs)
    results = [
        torch.zeros(t.in_group.batch_size, n_rows, s, dtype=p.dtype, device=p.device)
        for s in t.in_group.sizes
    ]
    if chosen == "fwd":
        try:
            _columns(p, t, results, choose_chunk_size(n_cols, per_probe, budget, chunk_size))
            return results
        except (RuntimeError, NotImplementedError) as err:
            warn_fallback(p.fn_name, "forward-mode AD failed, computed rows in reverse mode", err)
            for r in results:
                r.zero_()
    _rows(p, t, results, choose_chunk_size(n_rows, per_probe, budget, chunk_size))
    return results


def _rows(p: FuncProblem, t: Traced, results: list[Tensor], chunk_size: int) -> None:
    def probe(start: int, stop: int, batched: bool) -> tuple[Tensor, ...]:
        cots = _probes(t.out_group, t.outputs, start, stop)
        if batched:
            return tuple(torch.vmap(t.pullback)(cots))
        return tuple(g.unsqueeze(0) for g in t.pullback(tuple(c[0] for c in cots)))

    def write(start: int, stop: int, grads: tuple[Tensor, ...]) -> None:
        for j, g in enumerate(grads):
            results[j][:, start:stop] = t.in_group.flatten(j, g)

    run_chunks(p.fn_name, t.out_group.numel, chunk_size, probe, write)


def _columns(p: FuncProblem, t: Traced, results: list[Tensor], chunk_size: int) -> None:
    ins = p.inputs

    def push(*tangents: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.func.jvp(p.outputs_only, ins, tangents)[1])

    def probe(start: int, stop: int, batched: bool) -> tuple[Tensor, ...]:
        tans = _probes(t.in_group, ins, start, stop)
        if batched:
            return tuple(torch.vmap(push)(*tans))
        return tuple(y.unsqueeze(0) for y in push(*(v[0] for v in tans)))

    def write(start: int, stop: int, jv: tuple[Tensor, ...]) -> None:
        flat = [t.out_group.flatten(i, y) for i, y in enumerate(jv)]
        block = torch.cat(flat, dim=2) if len(flat) > 1 else flat[0]  # [B, c, m]
        for j, lo, hi in t.in_group.touched(start, stop):
            skip = t.in_group.offsets[j] + lo - start
            results[j][:, :, lo:hi] = block[:, skip : skip + hi - lo].transpose(1, 2)

    run_chunks(p.fn_name, t.in_group.numel, chunk_size, probe, write)
