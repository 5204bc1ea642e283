"""``torchjac bench``: find the ``benchmarks/`` workloads, run them, print and save the results.

The workloads live in the repository's ``benchmarks/`` package (next to ``src/``), not in the
installed package: they need the optional peers (TorchJD, BackPACK) and are read by people who
re-measure the claims. ``find_benchmarks`` looks, in order, at ``$TORCHJAC_BENCHMARKS``,
``./benchmarks`` and the checkout this package was installed from (editable install).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["find_benchmarks", "run_bench"]


def find_benchmarks() -> Path:
    """The ``benchmarks/`` directory holding ``registry.py``; ``FileNotFoundError`` if none."""
    candidates = []
    if os.environ.get("TORCHJAC_BENCHMARKS"):
        candidates.append(Path(os.environ["TORCHJAC_BENCHMARKS"]))
    candidates.append(Path.cwd() / "benchmarks")
    candidates.append(Path(__file__).resolve().parents[2] / "benchmarks")
    for path in candidates:
        if (path / "registry.py").is_file() and (path / "_harness.py").is_file():
            return path.resolve()
    raise FileNotFoundError(
        "torchjac bench: no benchmarks/ directory found (looked at "
        + ", ".join(str(p) for p in candidates)
        + "). Run it from a checkout of the torchjac repository, or set TORCHJAC_BENCHMARKS "
        "to its benchmarks/ directory."
    )


def _import(name: str, root: Path) -> Any:
    parent = str(root.parent)
    if parent not in sys.path:
        sys.path.insert(0, parent)
    return importlib.import_module(f"benchmarks.{name}")


def _summary(rows: list[Any]) -> None:
    """One line per finished workload on stderr (the table comes at the end, on stdout)."""
    parts = []
    for r in rows:
        if r.torchjac:
            ratio = "—" if r.ratio is None else f"{r.ratio:.2f}× the best peer"
            parts.append(f"{r.strategy}: {ratio} ({r.status})")
    if rows:
        print(f"{rows[0].workload} done. " + "; ".join(parts), file=sys.stderr, flush=True)


def run_bench(
    workloads: list[str] | None,
    *,
    quick: bool,
    small: bool,
    json_path: str | None,
    plot_path: str | None,
    progress: bool,
    memory: bool = False,
) -> int:
    """Run the selected workloads and print the Markdown table.

    Returns 0, or 1 when a strategy disagreed with the reference or a torchjac strategy failed.
    """
    root = find_benchmarks()
    harness = _import("_harness", root)
    registry = _import("registry", root)
    report = _import("_report", root)
    chosen = registry.select(registry.all_workloads(), workloads)
    timing = harness.Timing(repeats=5, min_repeats=1, budget_s=1.0) if quick else harness.Timing()
    env = report.environment()
    rows = harness.run_workloads(
        chosen, small=small, timing=timing, progress=progress, on_workload=_summary, memory=memory
    )
    flags = (("quick", quick), ("small sizes", small), ("peak memory", memory))
    mode = ", ".join(m for m, on in flags if on)
    print(
        f"torchjac bench: {env['utc']}, torch {env['torch']}, {env['threads']} thread(s), "
        f"{env['cpu']}, Python {env['python']}" + (f" ({mode})" if mode else "")
    )
    print()
    print(report.workload_legend(rows))
    print()
    print(report.markdown_table(rows))
    print()
    print(
        "Median wall time per call after one untimed checked call; ratio = median / fastest "
        "peer (torchjac in bold, < 1 means faster)."
        + (
            " Peak MiB: memory a call needs on top of what existed before it, its result "
            "included (a fresh process per strategy, peak RSS)."
            if memory
            else ""
        )
    )
    if json_path:
        report.save_json(json_path, rows, env)
        print(f"wrote {json_path}")
    if plot_path:
        report.save_plot(plot_path, rows)
        print(f"wrote {plot_path}")
    failed = [
        r
        for r in rows
        if r.status.startswith("wrong") or (r.torchjac and r.status.startswith("error"))
    ]
    return 1 if failed else 0
