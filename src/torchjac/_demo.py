"""``torchjac demo``: the seed problems, the seed's way and torchjac's, side by side.

For each problem of :mod:`torchjac._demo_seeds`: run both ways (one warm-up call, then timed
calls, median), check that they agree, print a Markdown table and save a figure with the
speedups and a per-sample parameter Jacobian heatmap like seed 003's.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchjac._demo_seeds import PROBLEMS, Problem, seed003_model

__all__ = ["DemoRow", "run_demo"]

# Agreement: max |seed - torchjac| <= RTOL * max |seed| (float32 results).
RTOL = 1e-4
# Timed calls per method after the warm-up: up to REPEATS, or fewer once BUDGET_S is spent; a
# method whose warm-up call took over 2 * BUDGET_S is timed by that call alone.
REPEATS, BUDGET_S = 5, 1.0


@dataclass
class DemoRow:
    """One problem's outcome: times in ms, speedup, max |difference|, status."""

    problem: Problem
    size: str = ""
    seed_ms: float | None = None
    tj_ms: float | None = None
    max_diff: float | None = None
    status: str = ""

    @property
    def speedup(self) -> float | None:
        if self.seed_ms is None or self.tj_ms is None:
            return None
        return self.seed_ms / self.tj_ms


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    return [t for v in (x.values() if isinstance(x, dict) else x) for t in _tensors(v)]


def _first(thunk: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = thunk()  # warm-up; its result is the one compared
    return result, (time.perf_counter() - start) * 1e3


def _time_pair(thunks: Sequence[Callable[[], Any]], first_ms: Sequence[float]) -> list[float]:
    """Median ms of each thunk, calls interleaved so that load from other processes hits both."""
    # A slow loop (warm-up over 2 * BUDGET_S) is timed by its warm-up call: warm-up effects are
    # noise next to it, and running it twice would double the demo's time.
    times: list[list[float]] = [[f] if f > 2 * BUDGET_S * 1e3 else [] for f in first_ms]
    slow = [bool(t) for t in times]
    for _ in range(REPEATS):
        for i, thunk in enumerate(thunks):
            if slow[i] or sum(times[i]) > BUDGET_S * 1e3:
                continue
            start = time.perf_counter()
            thunk()
            times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def _compare(got: Any, want: Any) -> tuple[bool, float]:
    pairs = list(zip(_tensors(got), _tensors(want)))
    if len(pairs) != len(_tensors(want)) or any(g.shape != w.shape for g, w in pairs):
        return False, float("nan")
    diff = max((g.detach() - w.detach()).abs().max().item() for g, w in pairs)
    scale = max(w.detach().abs().max().item() for _, w in pairs)
    return diff <= RTOL * max(scale, 1e-12), diff


def run_problem(problem: Problem, small: bool) -> DemoRow:
    """Both ways of one problem; a missing peer or a torchjac placeholder is a status."""
    row = DemoRow(problem)
    try:
        seed_way, tj_way, row.size = problem.build(small)
    except ImportError:
        row.status = f"{problem.needs} not installed"
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seeds' own code warns (BackPACK's hooks)
        want, seed_first = _first(seed_way)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, tj_first = _first(tj_way)
    except NotImplementedError:
        row.status = "torchjac: not available yet"
        (row.seed_ms,) = _time_pair([seed_way], [seed_first])
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warned (or not) in the first call already
        row.seed_ms, row.tj_ms = _time_pair([seed_way, tj_way], [seed_first, tj_first])
    ok, row.max_diff = _compare(got, want)
    row.status = "agree" if ok else "DISAGREE"
    if any(
        issubclass(w.category, UserWarning) and "Fallback" in w.category.__name__ for w in caught
    ):
        row.status += " (fallback warned)"
    return row


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    return (f"{value:.3g}" if value < 1000 else f"{value:.0f}") + unit


def table(rows: Sequence[DemoRow]) -> str:
    """The Markdown table: seed, problem, seed method, both times, speedup, max |difference|."""
    lines = [
        "| seed | problem | seed's method | seed ms | torchjac ms | speedup | max abs diff | |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        p = r.problem
        diff = "—" if r.max_diff is None else f"{r.max_diff:.1e}"
        lines.append(
            f"| {p.seed} | {p.title} ({r.size}) | {p.method} | {_fmt(r.seed_ms)} | "
            f"{_fmt(r.tj_ms)} | {_fmt(r.speedup, '×')} | {diff} | {r.status} |"
        )
    return "\n".join(lines)


def _heatmap() -> tuple[Tensor, str]:
    model, x = seed003_model(small=True)
    try:
        from torchjac import param_jacobian

        jacobians = list(param_jacobian(model, x, batch_dim=0).values())
        how = "tj.param_jacobian"
    except NotImplementedError:
        fs = model(x)
        rows = [
            torch.autograd.grad(f, list(model.parameters()), retain_graph=True)
            for f in fs.flatten()
        ]
        jacobians = [torch.stack(z).view(fs.shape + z[0].shape) for z in zip(*rows)]
        how = "autograd loop (tj.param_jacobian not available yet)"
    image = torch.cat([j.flatten(end_dim=1).flatten(start_dim=1) for j in jacobians], dim=1)
    return image.detach(), how


def save_figure(path: str, rows: Sequence[DemoRow]) -> None:
    """Speedups (log scale) and seed 003's batched Jacobian ``[N·C, P]`` as a heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=[1, 1.2])
    timed = [r for r in rows if r.speedup is not None]
    labels = [f"{r.problem.seed} {r.problem.method}" for r in timed]
    speedups = [r.speedup or 1.0 for r in timed]
    colors = ["tab:orange" if v >= 1 else "tab:gray" for v in speedups]
    left.barh(range(len(timed)), speedups, color=colors)
    left.set_yticks(range(len(timed)), labels, fontsize=8)
    left.invert_yaxis()
    left.axvline(1.0, color="black", lw=0.8)
    if timed:
        left.set_xscale("log")
        left.set_xlim(min(0.5, min(speedups) / 2), max(speedups) * 4)
        left.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        left.xaxis.set_minor_formatter(NullFormatter())
    for i, s in enumerate(speedups):
        left.text(s, i, f" {s:.3g}×" if s < 100 else f" {s:,.0f}×", va="center", fontsize=8)
    left.set_xlabel("speedup of torchjac over the seed's method (log scale)")
    left.set_title("torchjac vs the seeds' own code", fontsize=10)
    image, how = _heatmap()
    limit = float(image.abs().max())
    shown = right.imshow(image.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
    fig.colorbar(shown, ax=right, shrink=0.8)
    right.set_title(f"Seed 003's batched Jacobian [N·C, P]\n({how})", fontsize=10)
    right.set_xlabel("parameters (W1, b1, W2, b2 flattened)")
    right.set_ylabel("(sample n, output c)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(*, out: str = "demo.png", small: bool = False) -> int:
    """Run every seed problem, print the table, save the figure; 1 if any pair disagrees."""
    start = time.perf_counter()
    print(
        f"torchjac demo: the seed problems, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s){', small sizes' if small else ''}"
    )
    rows = []
    for problem in PROBLEMS:
        print(f"  {problem.seed} {problem.method} ...", flush=True)
        rows.append(run_problem(problem, small))
    print()
    print(table(rows))
    save_figure(out, rows)
    print(f"\nwrote {out} ({time.perf_counter() - start:.0f} s in all)")
    bad = [r for r in rows if r.status.startswith("DISAGREE")]
    for r in bad:
        print(
            f"seed {r.problem.seed} ({r.problem.method}): results disagree, max |diff| {r.max_diff}"
        )
    return 1 if bad else 0
