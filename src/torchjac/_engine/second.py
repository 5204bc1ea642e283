"""Planning second derivatives: Taylor-mode propagation or nested AD, with their fallbacks.

NOTE [second-order plan]: with ``R`` output rows and ``D`` input elements per sample, nested AD
costs ``R·D`` forward-over-reverse probes (about three passes each) for a full Hessian, a
diagonal or a trace (forward over forward would need only ``D`` probes, but PyTorch's nested
forward mode is wrong for some ops, e.g. ``layer_norm`` and ``batch_norm``: pytorch#196700).
The Taylor mode (NOTE [taylor mode]) pushes ``K`` coefficients through one pass of the
function: ``K = 2 + D`` for a trace, ``1 + 2D`` for a diagonal, ``1 + D + D(D+1)/2`` for a
full Hessian. "auto" takes the Taylor mode when its ``K`` is below the nested cost, and nested
AD when the Taylor mode cannot follow the function (one ``FallbackWarning``). Forward-mode AD
missing for an op makes the nested path reverse over reverse (one ``FallbackWarning``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchjac._engine.func_call import FuncProblem
from torchjac._engine.func_probes import Traced
from torchjac._engine.func_second import hessian_pairs
from torchjac._engine.taylor_run import TaylorFailed, taylor
from torchjac._errors import warn_fallback

__all__ = ["diagonal_or_trace", "full_hessian"]

# Passes per nested-AD probe, relative to one Taylor coefficient (see NOTE [second-order plan]).
PAIR_COST = 3.0


def _taylor_first(
    p: FuncProblem, t: Traced, kind: str, mode: str, nested_cost: float
) -> Tensor | None:
    """The Taylor-mode result when planned and possible, else ``None`` (after one warning)."""
    d = t.in_group.numel
    k = {"trace": 2 + d, "diag": 1 + 2 * d, "full": 1 + d + d * (d + 1) // 2}[kind]
    if mode != "auto" or k > nested_cost:
        return None
    try:
        return taylor(p, t, kind)
    except TaylorFailed as err:
        warn_fallback(
            p.fn_name, "Taylor-mode propagation could not follow func, used nested AD", err
        )
        return None


def full_hessian(
    p: FuncProblem, t: Traced, mode: str, chunk_size: int | None, budget: int
) -> Tensor:
    """``[B, R, D, D]``: per-sample Hessians of every output row (B = 1 when unbatched)."""
    b, r, d = t.in_group.batch_size, t.out_group.numel, t.in_group.numel
    fast = _taylor_first(p, t, "full", mode, PAIR_COST * r * d)
    if fast is not None:
        return fast
    res = torch.zeros(b, r, d, d, dtype=p.dtype, device=p.device)

    def sink(o: Tensor, a: Tensor, block: Tensor) -> None:
        res[:, o, a] = block.to(p.dtype)

    _nested(
        p,
        t,
        "fwd" if mode == "auto" else mode,
        lambda m: hessian_pairs(p, t, m, chunk_size, budget, sink),
        res,
    )
    return res


def diagonal_or_trace(
    p: FuncProblem, t: Traced, kind: str, mode: str, chunk_size: int | None, budget: int
) -> Tensor:
    """``[B, R, D]`` Hessian diagonals (``kind="diag"``) or ``[B, R]`` traces (``"trace"``)."""
    b, r, d = t.in_group.batch_size, t.out_group.numel, t.in_group.numel
    fast = _taylor_first(p, t, kind, mode, PAIR_COST * r * d)
    if fast is not None:
        return fast
    res = torch.zeros(b, r, d, dtype=p.dtype, device=p.device)

    def sink(o: Tensor, a: Tensor, block: Tensor) -> None:
        idx = a.reshape(1, -1, 1).expand(block.shape[0], -1, 1)
        res[:, o, a] = block.gather(2, idx)[..., 0].to(p.dtype)

    def run(m: str) -> None:
        hessian_pairs(p, t, m, chunk_size, budget, sink)

    _nested(p, t, "fwd" if mode == "auto" else mode, run, res)
    return res.sum(dim=2) if kind == "trace" else res


def _nested(p: FuncProblem, t: Traced, mode: str, run: object, res: Tensor) -> None:
    assert callable(run)
    if mode == "fwd":
        try:
            run("fwd")
            return
        except (RuntimeError, NotImplementedError) as err:
            warn_fallback(p.fn_name, "forward-mode AD failed, used reverse over reverse", err)
            res.zero_()
    run("rev")
