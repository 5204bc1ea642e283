"""Planning second derivatives: Taylor-mode propagation or nested AD, with their fallbacks.

NOTE [second-order plan]: with ``R`` output rows and ``D`` input elements per sample, nested AD
costs ``R·D`` forward-over-reverse probes (about three passes each) for a full Hessian, a
diagonal or a trace (forward over forward would need only ``D`` probes, but PyTorch's nested
forward mode is wrong for some ops, e.g. ``layer_norm`` and ``batch_norm``: pytorch#196700).
The Taylor mode (NOTE [taylor mode]) pushes ``K`` coefficients through one pass of the
function: ``K = 2 + D`` for a trace, ``1 + 2D`` for a diagonal, ``1 + D + D(D+1)/2`` for a
full Hessian. "auto" takes the Taylor mode when its ``K`` is at most the nested cost — always
for a trace or a diagonal, and for a full Hessian when ``D <= 2`` or once the function has been
called to count ``R`` — and nested AD when the Taylor mode cannot follow the function (one
``FallbackWarning``). A plain MLP (NOTE [taylor chain]) gets a full Hessian from ``1 + R + D``
passes: it is tried first, and the plan above applies when it declines. Forward-mode AD
missing for an op makes the nested path reverse over reverse (one ``FallbackWarning``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchjac._engine.core.attention import FIX, math_attention, names_fused_attention
from torchjac._engine.core.basis import Group
from torchjac._engine.core.func_call import FuncProblem
from torchjac._engine.func.func_probes import GRAD_OFF, CheckBatch, Traced, autograd_trace
from torchjac._engine.func.func_second import graph_pairs, hessian_pairs
from torchjac._engine.taylor.exact_norms import exact_norms, fused_norms
from torchjac._engine.taylor.taylor_run import (
    NeedForward,
    TaylorFailed,
    TaylorResult,
    chained_taylor,
    taylor,
)
from torchjac._errors import warn_fallback

__all__ = ["second_derivatives"]

# Passes per nested-AD probe, relative to one Taylor coefficient (see NOTE [second-order plan]).
PAIR_COST = 3.0


def second_derivatives(
    p: FuncProblem,
    kind: str,
    mode: str,
    chunk_size: int | None,
    budget: int,
    check_batch: CheckBatch,
) -> tuple[Tensor, Traced | TaylorResult]:
    """``kind="full"``: ``[B, R, D, D]``; ``"diag"``: ``[B, R, D]``; ``"trace"``: ``[B, R]``.

    ``func`` runs with the math attention kernel (NOTE [fused attention]).
    """
    try:
        with math_attention():
            return _second_derivatives(p, kind, mode, chunk_size, budget, check_batch)
    except (RuntimeError, NotImplementedError) as err:
        if not names_fused_attention(err):
            raise
        raise type(err)(f"{p.fn_name}: {FIX} ({err})") from err


def _second_derivatives(
    p: FuncProblem,
    kind: str,
    mode: str,
    chunk_size: int | None,
    budget: int,
    check_batch: CheckBatch,
) -> tuple[Tensor, Traced | TaylorResult]:
    d = Group.of(p.inputs, p.batch_dim).numel
    t: Traced | None = None
    if mode == "auto":
        if kind == "full" and d > 2:  # a plain MLP: 1 + R + D passes (NOTE [taylor chain])
            chained = chained_taylor(p, kind, check_batch)
            if chained is not None:
                return chained.result, chained
        planned = kind != "full" or d <= 2
        if not planned:
            t = autograd_trace(p, check_batch)
            planned = 1 + d + d * (d + 1) // 2 <= PAIR_COST * t.out_group.numel * d
        if planned:
            try:
                try:  # NOTE [taylor tape]: a diagonal with second order in reverse, if it can
                    res = taylor(p, "rdiag" if kind == "diag" else kind, check_batch)
                except NeedForward:
                    res = taylor(p, kind, check_batch)
                return res.result, res
            except TaylorFailed as err:
                if not err.quiet:
                    warn_fallback(
                        p.fn_name,
                        "Taylor-mode propagation could not follow func, used nested AD",
                        err,
                    )
    # auto: reverse over reverse, which is right where forward over reverse is not (det, solve);
    # under NOTE [exact norms]; a trace made for the plan is kept unless its graph (which
    # graph_pairs differentiates) holds a fused norm
    with exact_norms():
        if t is None or fused_norms(t.graph_outputs):
            t = autograd_trace(p, check_batch, mode == "fwd")
        return _nested(p, t, kind, "rev" if mode == "auto" else mode, chunk_size, budget), t


def _nested(
    p: FuncProblem, t: Traced, kind: str, mode: str, chunk_size: int | None, budget: int
) -> Tensor:
    b, r, d = t.in_group.batch_size, t.out_group.numel, t.in_group.numel
    shape = (b, r, d, d) if kind == "full" else (b, r, d)
    res = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def full_sink(o: Tensor, a: Tensor, block: Tensor) -> None:
        res[:, o, a] = block.to(p.dtype)

    def diag_sink(o: Tensor, a: Tensor, block: Tensor) -> None:
        idx = a.reshape(1, -1, 1).expand(block.shape[0], -1, 1)
        res[:, o, a] = block.gather(2, idx)[..., 0].to(p.dtype)

    sink: Callable[[Tensor, Tensor, Tensor], None] = full_sink if kind == "full" else diag_sink
    grad_off = mode == "fwd" and t.grad_off  # NOTE [forward mode and no_grad]
    mode = "rev" if grad_off else mode
    if mode == "fwd":
        try:
            hessian_pairs(p, t, "fwd", chunk_size, budget, sink)
            return res.sum(dim=2) if kind == "trace" else res
        except (RuntimeError, NotImplementedError) as err:
            warn_fallback(p.fn_name, "forward-mode AD failed, used reverse over reverse", err)
            res.zero_()
    try:
        hessian_pairs(p, t, "rev", chunk_size, budget, sink)
    except (RuntimeError, NotImplementedError) as err:  # torch.func cannot transform func
        warn_fallback(p.fn_name, "torch.func failed, used autograd.grad on the graph", err)
        res.zero_()
        graph_pairs(t, sink)
    if grad_off:  # after: a failure of the reverse path is the first cause to name
        warn_fallback(
            p.fn_name, "forward mode cannot follow func, used reverse over reverse", GRAD_OFF
        )
    return res.sum(dim=2) if kind == "trace" else res
