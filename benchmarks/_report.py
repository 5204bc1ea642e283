"""Reporting benchmark rows: a Markdown table, a JSON file, a plot (matplotlib, Agg)."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks._harness import Row

__all__ = ["environment", "markdown_table", "save_json", "save_plot"]


def environment() -> dict[str, Any]:
    """Where and when: torch version, threads, CPU, Python, UTC time."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "python": platform.python_version(),
    }


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _ratio(row: Row) -> str:
    if row.ratio is None:
        return "—"
    text = f"{row.ratio:.2f}×" if row.ratio < 10 else f"{row.ratio:.0f}×"
    return f"**{text}**" if row.torchjac else text


def markdown_table(rows: Sequence[Row]) -> str:
    """One line per strategy: workload, strategy, median ms, ratio to the best peer, check.

    A "peak MiB" column is added when peak memory was measured (``--memory``).
    """
    memory = any(r.peak_mib is not None for r in rows)
    head = "| workload | strategy | median ms | ratio to best peer | check |"
    rule = "|---|---|---:|---:|---|"
    if memory:
        head, rule = head + " peak MiB |", rule + "---:|"
    lines = [head, rule]
    for r in rows:
        name = f"**{r.strategy}**" if r.torchjac else r.strategy
        line = f"| {r.workload} | {name} | {_ms(r.median_ms)} | {_ratio(r)} | {r.status} |"
        if memory:
            line += " — |" if r.peak_mib is None else f" {r.peak_mib:.1f} |"
        lines.append(line)
    return "\n".join(lines)


def workload_legend(rows: Sequence[Row]) -> str:
    """One line per workload: key, title and problem size."""
    seen: dict[str, str] = {}
    for r in rows:
        seen.setdefault(r.workload, f"- **{r.workload}** {r.title} ({r.size})")
    return "\n".join(seen.values())


def save_json(path: str | Path, rows: Sequence[Row], env: dict[str, Any]) -> None:
    """Write the environment and every row (all timings, warnings) as JSON."""
    data = {"environment": env, "rows": [asdict(r) for r in rows]}
    Path(path).write_text(json.dumps(data, indent=2))


def save_plot(path: str | Path, rows: Sequence[Row]) -> None:
    """Bars of each strategy's ratio to the best peer (log scale), one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    keys = list(dict.fromkeys(r.workload for r in rows))
    timed = {k: [r for r in rows if r.workload == k and r.ratio is not None] for k in keys}
    keys = [k for k in keys if timed[k]] or keys[:1]
    heights = [max(len(timed.get(k, [])), 1) * 0.3 + 0.7 for k in keys]
    fig, axes = plt.subplots(
        len(keys),
        1,
        figsize=(9, sum(heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, key in zip(axes[:, 0], keys):
        mine = timed.get(key, [])
        ratios = [r.ratio or 1.0 for r in mine]
        colors = ["tab:orange" if r.torchjac else "0.7" if r.floor else "tab:blue" for r in mine]
        ax.barh(range(len(mine)), ratios, color=colors)
        ax.set_yticks(range(len(mine)), [r.strategy for r in mine], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8)
        for i, r in enumerate(mine):
            ax.text(ratios[i], i, f" {_ms(r.median_ms)} ms", va="center", fontsize=6)
        if ratios:
            ax.set_xscale("log")
            ax.set_xlim(min(0.5, min(ratios) / 2), max(2.0, max(ratios)) * 6)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        title = mine[0].title if mine else key
        ax.set_title(f"{key}: {title}", fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("time / fastest peer (log scale; orange: torchjac, grey: floor)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
