"""The benchmark harness: strategies checked against a reference, then timed (medians).

A workload builds a :class:`Case`: a reference result and the strategies that compute it. Each
strategy is run once untimed and compared with the reference (``check``); only a strategy that
agrees is timed. A strategy whose peer is not installed is ``skipped``; a torchjac function that
is still a placeholder (``NotImplementedError``) is ``not available``; any other failure is an
``error`` row. Nothing here raises because one strategy failed.
"""

from __future__ import annotations

import gc
import importlib.util
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Case",
    "Row",
    "Strategy",
    "Timing",
    "Workload",
    "check",
    "check_strategy",
    "run_workloads",
    "time_strategies",
]


def _no_setup() -> None:
    return None


@dataclass(frozen=True)
class Strategy:
    """One way to compute a workload's result.

    ``setup()`` runs untimed before every call (e.g. to build a fresh autograd graph) and its
    value is passed to ``run``; ``requires`` names the importable modules of the peer.
    """

    name: str
    run: Callable[[Any], Any]
    setup: Callable[[], Any] = _no_setup
    requires: tuple[str, ...] = ()
    torchjac: bool = False
    floor: bool = False  # a lower bound shown for scale (e.g. copying the result), not a peer


@dataclass(frozen=True)
class Case:
    """A built workload: its reference result, the strategies, and the check tolerance.

    A result agrees when ``max |result - reference| <= rtol * max |reference|`` for every tensor
    (results are flattened: Tensor, tuple/list, dict values in order).
    """

    reference: Any
    strategies: Sequence[Strategy]
    size: str
    rtol: float = 1e-4


@dataclass(frozen=True)
class Workload:
    """A named workload; ``build(small)`` returns its :class:`Case` (``small``: reduced sizes)."""

    key: str
    title: str
    build: Callable[[bool], Case]


@dataclass(frozen=True)
class Timing:
    """Repeats: up to ``repeats``, at least ``min_repeats``, stop once ``budget_s`` is spent."""

    repeats: int = 15
    min_repeats: int = 3
    budget_s: float = 3.0
    reuse_first_s: float = 10.0  # a check call slower than this is the (only) timing


@dataclass
class Row:
    """One strategy's outcome on one workload (one line of the table)."""

    workload: str
    title: str
    size: str
    strategy: str
    torchjac: bool
    status: str
    floor: bool = False
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    max_diff: float | None = None
    ratio: float | None = None
    warnings: list[str] = field(default_factory=list)
    peak_mib: float | None = None


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    raise TypeError(f"a strategy returned {type(x).__name__}, expected tensors")


def check(result: Any, reference: Any, rtol: float) -> tuple[bool, float, str]:
    """Compare ``result`` with ``reference``: (agree, max |difference|, reason if not)."""
    got, want = _tensors(result), _tensors(reference)
    if len(got) != len(want):
        return False, float("nan"), f"{len(got)} tensors, expected {len(want)}"
    worst, ok = 0.0, True
    for g, w in zip(got, want):
        if tuple(g.shape) != tuple(w.shape):
            return False, float("nan"), f"shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        w64 = w.detach().double()
        diff = (g.detach().double() - w64).abs().max().item() if w.numel() else 0.0
        scale = w64.abs().max().item() if w.numel() else 0.0
        worst = max(worst, diff)
        ok = ok and diff <= rtol * max(scale, 1e-12)
    return ok, worst, "" if ok else f"max abs diff {worst:.2e}"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:70] if text else ''}"


def _call(strategy: Strategy) -> tuple[Any, float]:
    state = strategy.setup()
    start = time.perf_counter()
    result = strategy.run(state)
    elapsed = time.perf_counter() - start
    return result, elapsed


def _guarded(row: Row, action: Callable[[], Any]) -> Any:
    """Run ``action``; a failure sets ``row.status`` and returns None (the run goes on)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return action()
        except NotImplementedError:
            row.status = "not available"
        except Exception as exc:  # a failing strategy is a row, not a crash
            row.status = f"error: {_first_line(exc)}"
        finally:
            seen = {f"{w.category.__name__}: {w.message}"[:160] for w in caught}
            row.warnings = sorted(seen.union(row.warnings))
    return None


def check_strategy(row: Row, strategy: Strategy, case: Case) -> float | None:
    """First (untimed) call and check; returns its duration in s, or None if not to be timed."""
    missing = [m for m in strategy.requires if not _installed(m)]
    if missing:
        row.status = f"skipped: {', '.join(missing)} not installed"
        return None
    called = _guarded(row, lambda: _call(strategy))
    if called is None:
        return None
    ok, row.max_diff, reason = check(called[0], case.reference, case.rtol)
    if not ok:
        row.status = f"wrong: {reason}"
        return None
    return float(called[1])


def time_strategies(
    rows: Sequence[Row], strategies: Sequence[Strategy], first_s: Sequence[float], timing: Timing
) -> None:
    """Time the checked strategies in interleaved rounds; fill ``times_ms``/``median_ms``.

    NOTE [repeats]: the check call warms up. Rounds interleave the strategies, so that load from
    other processes hits them alike; a strategy slower than the budget is timed once (by its check
    call if that took over ``reuse_first_s``), the others until ``repeats`` calls or their share of
    the budget is spent (at least ``min_repeats``). ``torch.func`` is warmed up once per process
    first (its first call pays for lazy imports, seconds). Each call follows a ``gc.collect()``, so
    that no strategy pays for another's garbage, with the objects alive before the rounds frozen
    (``gc.freeze``): a full collection walks every live object (about 290,000 with the peers
    imported), and the call after one ran up to 1.4 ms slower on W9 (a bare ten-op function: 0.05 ms
    before, 0.4 ms after), a cost no loop of calls pays. The order of the strategies rotates by one
    each round: a call right after a peer that touched gigabytes ran on a cold machine (W9's slicing
    form, 3.9 ms right after a dense ``jacfwd`` against 2.6 ms after another sparse call), and a
    fixed order charged that to the same strategy every round.
    """
    wanted = [1 if f > timing.budget_s else timing.repeats for f in first_s]
    for row, first in zip(rows, first_s):
        if first > timing.reuse_first_s:  # very slow (a Python loop): warm-up effects are noise
            row.times_ms.append(first * 1e3)
    spent = [0.0] * len(rows)
    gc.collect()
    gc.freeze()
    try:
        for round_ in range(max(wanted, default=0)):
            for i in rotated(len(rows), round_):
                row, strategy = rows[i], strategies[i]
                done = len(row.times_ms)
                if row.status or done >= wanted[i] or round_ > done:
                    continue
                if spent[i] > timing.budget_s and done >= min(timing.min_repeats, wanted[i]):
                    continue
                gc.collect()
                called = _guarded(row, lambda s=strategy: _call(s))
                if called is not None:
                    row.times_ms.append(called[1] * 1e3)
                    spent[i] += called[1]
    finally:
        gc.unfreeze()
    for row in rows:
        if not row.status and row.times_ms:
            row.median_ms = statistics.median(row.times_ms)
            fallback = any(w.startswith("FallbackWarning") for w in row.warnings)
            row.status = "ok (fallback warned)" if fallback else "ok"


def rotated(count: int, round_: int) -> list[int]:
    """The strategies' order in round ``round_``: rotated by one each round, so that each
    follows each of the others equally often (NOTE [repeats])."""
    start = round_ % max(count, 1)
    return list(range(start, count)) + list(range(start))


def _warm_up_torch_func() -> None:
    x = torch.ones(2, 2)
    torch.func.vmap(torch.func.jacrev(torch.sin))(x)
    torch.func.vmap(torch.func.jacfwd(torch.sin))(x)
    torch.autograd.grad(x.requires_grad_().sin().sum(), x)


def _ratios(rows: list[Row]) -> None:
    peers = [r.median_ms for r in rows if not (r.torchjac or r.floor) and r.median_ms is not None]
    if not peers:
        return
    best = min(peers)
    for r in rows:
        if r.median_ms is not None:
            r.ratio = r.median_ms / best


def run_workloads(
    workloads: Sequence[Workload],
    *,
    small: bool = False,
    timing: Timing | None = None,
    progress: bool = True,
    on_workload: Callable[[list[Row]], None] | None = None,
    warm_up: bool = True,
    memory: bool = False,
) -> list[Row]:
    """Build, check and time every strategy of every workload; one :class:`Row` per strategy.

    ``on_workload`` is called with each workload's rows as soon as it is done; ``warm_up``
    pays ``torch.func``'s first-call cost before any timing (see NOTE [repeats]); ``memory``
    also measures each checked strategy's peak memory in a subprocess (NOTE [peak memory]).
    """
    from tqdm.auto import tqdm

    timing = timing or Timing()
    if warm_up:
        _warm_up_torch_func()
    rows: list[Row] = []
    bar = tqdm(
        total=len(workloads), disable=None if progress else True, unit="workload", leave=False
    )
    with bar:
        for wl in workloads:
            bar.set_description(wl.key)
            try:
                case = wl.build(small)
            except Exception as exc:
                rows.append(
                    Row(wl.key, wl.title, "", "(build)", False, f"error: {_first_line(exc)}")
                )
                bar.update()
                continue
            mine: list[Row] = []
            checked: list[tuple[Row, Strategy, float]] = []
            for strategy in case.strategies:
                bar.set_postfix_str(f"checking {strategy.name[:40]}")
                row = Row(
                    wl.key,
                    wl.title,
                    case.size,
                    strategy.name,
                    strategy.torchjac,
                    "",
                    strategy.floor,
                )
                first = check_strategy(row, strategy, case)
                mine.append(row)
                if first is not None:
                    checked.append((row, strategy, first))
            bar.set_postfix_str("timing")
            rows_, strategies_, firsts = zip(*checked) if checked else ((), (), ())
            time_strategies(rows_, strategies_, firsts, timing)
            _ratios(mine)
            if memory:
                from benchmarks._memory import peak_mib

                for index, row in enumerate(mine):
                    if row.median_ms is not None:
                        bar.set_postfix_str(f"memory of {row.strategy[:40]}")
                        threads = torch.get_num_threads()
                        row.peak_mib = peak_mib(wl.key, index, small, threads)
            rows.extend(mine)
            if on_workload is not None:
                on_workload(mine)
            bar.update()
    return rows
