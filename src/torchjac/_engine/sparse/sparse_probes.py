"""Compressed probes of a sparse Jacobian, their decompression by gathers, and their check.

NOTE [compressed probes]: with a column colouring (NOTE [colouring]) the forward probes are the
``C`` indicator vectors of the colours, pushed through ``func`` by ``torch.func.jvp`` vmapped
over chunks (``run_chunks``: chunk size from ``max_memory``, a loop when vmap fails); with a row
colouring the reverse probes are pulled back through one autograd graph (the detection call's,
when the pattern was detected in the same call) by batched backward passes. The products form
one ``[C + 1, m]`` (or ``[C + 1, n]``) block, a probe a row, as the pass returns it; entry
``(i, j)`` of the pattern is one gather from it, at flat positions the pattern's plan keeps
(NOTE [pattern plan]). The last probe, along a fixed pseudo-random direction ``r`` (its own
generator: the user's RNG is not drawn from), checks the result: ``J r`` (or ``rᵀ J``) computed
by AD must equal the sparse product, else a nonzero outside the pattern was lost or folded into
another entry, and the call raises instead of returning a wrong Jacobian. A line whose two
products differ by more than ``CHECK_TOLERANCE`` float32 epsilons of its terms (plus those of
the largest line: a float64 function may compute in float32 inside) is only a suspect: roundoff
of entries that cancel to nearly zero is relative to the terms that cancelled, which no
tolerance knows. A suspect row is confirmed by one more ``jvp`` with NaN on every column outside
its pattern (zero inside): AD can only turn its output into NaN along a path from one of them
(``0 * NaN`` is NaN), the very thing a pattern rules out. So roundoff never raises, and a
missed nonzero above the tolerance always does (a suspect column in reverse mode is confirmed
by a NaN cotangent).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.core.func_call import FuncProblem, forward_jvp
from torchjac._engine.core.plan import MIN_MEMORY_BUDGET, choose_chunk_size, memory_budget
from torchjac._engine.core.run import run_chunks
from torchjac._engine.func.func_probes import Traced
from torchjac._engine.sparse.colouring import Colouring
from torchjac._engine.sparse.sparse_plan import PatternPlan
from torchjac._errors import warn_fallback

__all__ = ["compressed_jacobian"]

CHECK_SEED = 20_261_207
CHECK_TOLERANCE = 256  # in units of eps times the size of the terms summed
CONFIRM_LINES = 8  # suspect lines confirmed by a NaN probe each, worst first
KEEP_SEEDS_BYTES = 2**24  # a pattern's probes are kept on its plan up to this size


@functools.lru_cache(maxsize=8)
def _direction(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The check direction (cached: only read, never written)."""
    g = torch.Generator().manual_seed(CHECK_SEED)
    signs = torch.randint(0, 2, (size,), generator=g) * 2 - 1
    return ((torch.rand(size, generator=g, dtype=torch.float64) + 0.5) * signs).to(device, dtype)


def _seeds(col: Colouring, r: Tensor, start: int, stop: int, keep: dict[Any, Tensor]) -> Tensor:
    """Probes ``start..stop-1``: the colours' indicators, then the check direction ``r``; all
    of them made once and kept in ``keep`` (the plan's) when they take little memory."""
    if (col.count + 1) * r.numel() * r.element_size() <= KEEP_SEEDS_BYTES:
        key = ("seeds", id(col), r.dtype, r.device)  # the colouring lives as long as the plan
        if key not in keep:
            keep[key] = _make_seeds(col, r, 0, col.count + 1)
        return keep[key][start:stop]
    return _make_seeds(col, r, start, stop)


def _make_seeds(col: Colouring, r: Tensor, start: int, stop: int) -> Tensor:
    top = min(stop, col.count)
    parts = [col.seeds(start, top, r.dtype).to(r.device)] if start < top else []
    if stop > col.count:
        parts.append(r.view(1, -1))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _run(fn: str, count: int, chunk: int, probe: Callable[[int, int, bool], Tensor]) -> Tensor:
    """Every probe's product, ``[count, size]`` (one pass's result as it is, when one pass)."""
    parts: list[Tensor] = []

    def write(start: int, stop: int, got: Tensor) -> None:
        parts.append(got.reshape(stop - start, -1))

    run_chunks(fn, count, chunk, probe, write)
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts)


def _forward(
    p: FuncProblem,
    x: Tensor,
    col: Colouring,
    r: Tensor,
    chunk: int,
    m: int,
    keep: dict[Any, Tensor],
) -> tuple[Tensor, torch.Size]:
    """``[C + 1, m]``: ``J s_c`` for each colour, then ``J r``; and the output's shape."""

    def push(t: Tensor) -> Tensor:
        return forward_jvp(_on_copy(p), (x,), (t,))[1][0]

    shape: list[torch.Size] = []

    def probe(start: int, stop: int, batched: bool) -> Tensor:
        seeds = _seeds(col, r, start, stop, keep).view(stop - start, *x.shape)
        jv = (
            torch.vmap(push, randomness="same")(seeds)  # NOTE [one draw per call]
            if batched
            else push(seeds[0]).unsqueeze(0)
        )
        _check_output(p, jv[0], m)
        shape[:] = [jv[0].shape]
        return jv

    block = _run(p.fn_name, col.count + 1, chunk, probe)
    return block, shape[0]


def _on_copy(p: FuncProblem) -> Callable[[Tensor], Any]:
    """``func`` called on a copy of its dual input: a ``func`` that writes into its argument
    would write into ``x`` itself (a dual tensor is a view of its primal), and each probe
    would see the point the previous one left (the reverse probes' graph starts from a copy
    too: NOTE [sparsity tracing])."""
    return lambda v: p.outputs_only(v.clone())


def _reverse(
    p: FuncProblem,
    x: Tensor,
    col: Colouring,
    r: Tensor,
    chunk: int,
    t: Traced | None,
    keep: dict[Any, Tensor],
) -> tuple[Tensor, Traced]:
    """``[C + 1, n]``: ``s_cᵀ J`` for each colour, then ``rᵀ J``; and the call's record."""
    if t is None:  # the graph starts from a leaf of its own; func gets a copy (``_on_copy``)
        leaf = x.detach().requires_grad_(True)
        with torch.enable_grad():
            t = Traced.of(p, p.outputs_only(leaf.clone()), (leaf,))
    y = t.outputs[0]
    _check_output(p, y, r.numel())

    def probe(start: int, stop: int, batched: bool) -> Tensor:
        seeds = _seeds(col, r, start, stop, keep).to(y.dtype).view(stop - start, *y.shape)
        if seeds.storage_offset():  # torch's as_strided backward misreads an offset cotangent
            seeds = seeds.clone()
        if batched:
            return t.pullback((seeds,), True)[0]
        return t.pullback((seeds[0],))[0].unsqueeze(0)

    return _run(p.fn_name, col.count + 1, chunk, probe), t


def _chunk(
    fn: str, count: int, per_probe: int, chunk_size: int | None, memory: Any, device: Any
) -> int:
    """Probes per pass: all of them when they fit in the smallest default budget (no look at
    free memory), else as ``max_memory`` (or free memory) allows."""
    if chunk_size is None and memory is None and count * per_probe <= MIN_MEMORY_BUDGET:
        return choose_chunk_size(count, per_probe, MIN_MEMORY_BUDGET, None)
    return choose_chunk_size(count, per_probe, memory_budget(fn, memory, device), chunk_size)


def compressed_jacobian(
    p: FuncProblem,
    x: Tensor,
    plan: PatternPlan,
    mode: str,
    chunk_size: int | None,
    max_memory: Any,
    traced: Traced | None = None,
    auto: bool = False,
) -> tuple[Tensor, torch.Size]:
    """The values of the pattern's nonzeros in CSR order (NOTE [compressed probes]), and the
    shape of the output; ``traced``: a call already on the graph, for reverse probes. Forward
    probes fall back to reverse ones when forward-mode AD fails; reverse ones to forward ones
    when ``auto`` chose them and reverse-mode AD fails (an in-place write of a value saved for
    backward), as the dense ``"auto"`` would have taken columns."""
    per_probe = 16 * (plan.m + plan.n) * p.dtype.itemsize
    args = (p, x, plan, per_probe, chunk_size, max_memory)
    if mode == "fwd":
        try:
            return _forward_values(*args)
        except (RuntimeError, NotImplementedError) as err:
            if isinstance(err, PatternError):
                raise
            warn_fallback(p.fn_name, "forward-mode AD failed, computed rows in reverse mode", err)
        return _reverse_values(*args, traced)
    try:
        return _reverse_values(*args, traced)
    except RuntimeError as err:
        if not auto:
            raise
        warn_fallback(p.fn_name, "reverse-mode AD failed, computed columns in forward mode", err)
    return _forward_values(*args)


def _forward_values(
    p: FuncProblem,
    x: Tensor,
    plan: PatternPlan,
    per_probe: int,
    chunk_size: int | None,
    max_memory: Any,
) -> tuple[Tensor, torch.Size]:
    m, n, grid, dev = plan.m, plan.n, tuple(x.shape), x.device
    col = plan.colouring("fwd", grid)
    r = _direction(n, p.dtype, dev)
    chunk = _chunk(p.fn_name, col.count + 1, per_probe, chunk_size, max_memory, dev)
    block, y_shape = _forward(p, x, col, r, chunk, m, plan.cache)
    values = block.view(-1).index_select(0, plan.index("fwd", grid, dev))
    values = values.to(p.dtype)  # x's dtype, as reverse probes give (not the output's)
    rows, cols = plan.on("rows", dev), plan.on("cols", dev)
    lines = _suspects(block, plan.check_weights("fwd", grid, r, _keep(block)))

    def push_nan(i: int) -> bool:  # NOTE [compressed probes]: a path, or roundoff?
        t = torch.full((n,), float("nan"), dtype=p.dtype, device=dev)
        t[cols[rows == i]] = 0
        y = forward_jvp(_on_copy(p), (x,), (t.view(x.shape),))[1][0]
        return bool(y.reshape(-1)[i].isnan())

    _confirm(p.fn_name, "row", lines, push_nan)
    return values, y_shape


def _reverse_values(
    p: FuncProblem,
    x: Tensor,
    plan: PatternPlan,
    per_probe: int,
    chunk_size: int | None,
    max_memory: Any,
    traced: Traced | None,
) -> tuple[Tensor, torch.Size]:
    m, grid, dev = plan.m, tuple(x.shape), x.device
    col = plan.colouring("rev", grid)
    r = _direction(m, p.dtype, dev)
    chunk = _chunk(p.fn_name, col.count + 1, per_probe, chunk_size, max_memory, dev)
    block, t = _reverse(p, x, col, r, chunk, traced, plan.cache)
    values = block.view(-1).index_select(0, plan.index("rev", grid, dev))
    rows, cols = plan.on("rows", dev), plan.on("cols", dev)
    lines = _suspects(block, plan.check_weights("rev", grid, r, _keep(block)))

    def pull_nan(j: int) -> bool:
        y = t.outputs[0]
        u = torch.full((m,), float("nan"), dtype=y.dtype, device=dev)
        u[rows[cols == j]] = 0
        return bool(t.pullback((u.view(y.shape),))[0].reshape(-1)[j].isnan())

    _confirm(p.fn_name, "column", lines, pull_nan)
    return values, t.outputs[0].shape


def _check_output(p: FuncProblem, y: Tensor, m: int) -> None:
    if not p.single:
        raise TypeError(f"{p.fn_name}: func must return one Tensor, got a sequence.")
    if y.numel() != m:
        raise PatternError(
            f"{p.fn_name}: `pattern` has {m} rows but func returns {y.numel()} elements "
            f"(shape {list(y.shape)}); pass the pattern of this func, or pattern=None."
        )


class PatternError(ValueError):
    """The Jacobian has a nonzero outside the pattern (raised as a ``ValueError``)."""


def _keep(block: Tensor) -> bool:
    """A block's check weights are kept on the plan when they take little memory."""
    return block.numel() * block.element_size() <= KEEP_SEEDS_BYTES


def _suspects(block: Tensor, weights: Tensor) -> list[int]:
    """Lines where the AD product with the check direction (the block's last probe) and the
    sparse product (``weights``: ``PatternPlan.check_weights``) differ beyond roundoff, worst
    first (at most ``CONFIRM_LINES``)."""
    probe = block[-1]
    if probe.numel() == 0:
        return []
    signed = block * weights  # each entry's term, and minus the AD product in the last row
    diff = signed.sum(0).abs()
    eps = max(torch.finfo(block.dtype).eps, torch.finfo(torch.float32).eps)  # NOTE above
    tol = CHECK_TOLERANCE * eps
    if bool(diff.amax() <= tol * probe.abs().amax()):
        return []  # within roundoff of the largest line: no excess anywhere (floor below)
    scale = signed.abs_().sum(0)  # the terms' sizes, and the AD product's
    floor = scale.max()  # roundoff of cancellations
    excess = diff - tol * (scale + floor)
    if not bool((excess > 0).any()):
        return []
    bad = (excess > 0).nonzero().reshape(-1)
    worst = bad[torch.argsort(excess[bad], descending=True)][:CONFIRM_LINES]
    return [int(i) for i in worst]


def _confirm(fn: str, what: str, lines: list[int], reached: Callable[[int], bool]) -> None:
    """Raise if a suspect line is reached from outside its pattern (NaN probes)."""
    for i in lines:
        try:
            found = reached(i)
        except Exception:  # the NaN probe itself failed: no proof of roundoff
            found = True
        if found:
            raise PatternError(
                f"{fn}: the Jacobian has nonzeros outside the sparsity pattern (at least in "
                f"{what} {i} of the flattened Jacobian). A `pattern` must hold every entry "
                "that can be nonzero: pass the one of tj.sparsity_pattern(func, x) for this "
                "func, or pattern=None to detect it."
            )
