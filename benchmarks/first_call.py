"""The first call of every strategy, each in a fresh process, against the best peer's.

    python -m benchmarks.first_call [--workloads W1,W2,...] [--processes 3] [--repeats 5]
                                    [--small] [--write]

A one-off call (a script that computes one Jacobian and exits) pays whatever a strategy does
once per process: lazy imports, building a plan, recording a forward, oneDNN creating its
primitives for a new shape. ``torchjac bench`` cannot see that cost: its untimed check call
warms every strategy up. Here every strategy of every workload runs in its own fresh Python
process (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), once per repetition, the
strategies interleaved (the order reversed every other repetition) so that load from other
work on the machine hits them alike. The child process

1. imports the workloads and builds the case (``Workload.build``). That computes the float64
   reference with ``torch.func``, so ``torch.func``'s own first-call costs (its lazy imports,
   the first ``vmap``) are paid before any timing, by torchjac and the peers alike; float32
   kernels and shapes are not warmed, since the reference runs in float64;
2. runs ``strategy.setup()`` untimed, then ``gc.collect()``, then times exactly one
   ``strategy.run(state)``: the *first call*;
3. checks that result against the reference (untimed; a wrong result is reported, not timed);
   Its CPU time (``time.process_time``) is kept too: other work on a shared machine stretches
   wall time far more than CPU time, so the CPU ratio is the steadier figure when it is busy;
4. times ``--repeats`` more calls (each after ``setup()`` and ``gc.collect()``) and keeps
   their median (a strategy whose calls take seconds stops after 5 s, one call at least): the
   *steady* time, for contrast. Unlike ``torchjac bench`` these are not
   interleaved with the other strategies, so the steady ratio is noisier than the bench's.

Per strategy the figure is the median over the ``--processes`` fresh processes; the best peer
is the smallest such median among the peers (``floor`` rows, which copy a result for scale,
are no peers). Ratio = torchjac's first call / the best peer's first call. Workload keys are
exact here: ``W5`` is W5 alone, not its variants (W5c's sweep rows share one key and are not
offered). ``--write`` also writes ``benchmarks/FIRST_CALL.md``. What it found, and what a
first call of torchjac still pays once per process: NOTE [first call]
(``src/torchjac/_engine/core/func_call.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT = ("W1", "W2", "W3", "W3b", "W6", "W6b", "W7", "W7b", "W4", "W5", "W5b")
_ROOT = Path(__file__).resolve().parents[1]
_MARK = "FIRST_CALL_JSON "

_CHILD = """
import gc, json, statistics, sys, time
import torch
torch.set_num_threads(1)
from benchmarks._harness import check
from benchmarks.registry import all_workloads
key, index, small, repeats = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
(workload,) = [w for w in all_workloads() if w.key == key]
case = workload.build(small)
strategy = case.strategies[index]
state = strategy.setup()
gc.collect()
start, cpu = time.perf_counter(), time.process_time()
result = strategy.run(state)
first, cpu = time.perf_counter() - start, time.process_time() - cpu
ok, diff, reason = check(result, case.reference, case.rtol)
del result, state
steady = []
spent = first  # a slow strategy (seconds a call) gets one steady call
for _ in range(repeats if ok else 0):
    state = strategy.setup()
    gc.collect()
    start = time.perf_counter()
    strategy.run(state)
    steady.append(time.perf_counter() - start)
    spent += steady[-1]
    if spent > 5.0:
        break
out = {"first_ms": first * 1e3, "cpu_ms": cpu * 1e3, "ok": ok, "reason": reason,
       "steady_ms": statistics.median(steady) * 1e3 if steady else None}
print("MARK" + json.dumps(out))
""".replace("MARK", _MARK)


@dataclass
class Entry:
    """One strategy's measurements over the fresh processes."""

    name: str
    torchjac: bool
    first_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    steady_ms: list[float] = field(default_factory=list)
    status: str = ""

    @property
    def first(self) -> float | None:
        return statistics.median(self.first_ms) if self.first_ms and not self.status else None

    @property
    def cpu(self) -> float | None:
        return statistics.median(self.cpu_ms) if self.cpu_ms and not self.status else None

    @property
    def steady(self) -> float | None:
        return statistics.median(self.steady_ms) if self.steady_ms and not self.status else None


def _child(key: str, index: int, small: bool, repeats: int) -> dict[str, Any]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
    }
    args = [sys.executable, "-c", _CHILD, key, str(index), "1" if small else "0", str(repeats)]
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "timeout after 900 s"}
    for line in done.stdout.splitlines():
        if line.startswith(_MARK):
            return dict(json.loads(line[len(_MARK) :]))
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": last[:100]}


def _installed(modules: tuple[str, ...]) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def measure(key: str, small: bool, processes: int, repeats: int) -> tuple[str, list[Entry]]:
    """Every non-floor strategy of workload ``key``: first and steady calls, fresh processes."""
    from benchmarks.registry import all_workloads

    (workload,) = [w for w in all_workloads() if w.key == key]
    case = workload.build(small)
    chosen = [
        (i, s) for i, s in enumerate(case.strategies) if not s.floor and _installed(s.requires)
    ]
    entries = [Entry(s.name, s.torchjac) for _, s in chosen]
    for rep in range(processes):
        order = list(range(len(chosen)))
        for j in order if rep % 2 == 0 else reversed(order):
            entry = entries[j]
            if entry.status:
                continue
            got = _child(key, chosen[j][0], small, repeats)
            if "error" in got:
                entry.status = f"error: {got['error']}"
            elif not got["ok"]:
                entry.status = f"wrong: {got['reason']}"
            else:
                entry.first_ms.append(got["first_ms"])
                entry.cpu_ms.append(got["cpu_ms"])
                if got["steady_ms"] is not None:
                    entry.steady_ms.append(got["steady_ms"])
    return f"{key} {workload.title} ({case.size})", entries


def _best(entries: list[Entry], attr: str) -> tuple[float, str] | None:
    peers = [(getattr(e, attr), e.name) for e in entries if not e.torchjac]
    peers = [(t, n) for t, n in peers if t is not None]
    return min(peers) if peers else None


def _ms(t: float | None) -> str:
    return "—" if t is None else f"{t:,.1f}" if t >= 10 else f"{t:.2f}"


def _ratio(a: float | None, b: tuple[float, str] | None) -> str:
    return "—" if a is None or b is None else f"**{a / b[0]:.2f}×**"


def summary(results: list[tuple[str, list[Entry]]]) -> list[str]:
    """The markdown table: each torchjac strategy against the best peer, first and steady."""
    lines = [
        "| workload | torchjac | first call ms | best peer, first call | ms | ratio |"
        " CPU ms | best peer CPU ms | CPU ratio | steady ms | best peer steady ms | steady ratio |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for title, entries in results:
        first, cpu = _best(entries, "first"), _best(entries, "cpu")
        steady = _best(entries, "steady")
        for e in entries:
            if not e.torchjac:
                continue
            lines.append(
                f"| {title.split(' (')[0]} | `{e.name}` | {e.status or _ms(e.first)}"
                f" | {first[1] if first else '—'} | {_ms(first[0] if first else None)}"
                f" | {_ratio(e.first, first)} | {_ms(e.cpu)} | {_ms(cpu[0] if cpu else None)}"
                f" | {_ratio(e.cpu, cpu)} | {_ms(e.steady)}"
                f" | {_ms(steady[0] if steady else None)} | {_ratio(e.steady, steady)} |"
            )
    return lines


def details(results: list[tuple[str, list[Entry]]]) -> list[str]:
    """Every strategy's first calls (wall and CPU time, each process) and steady medians."""
    lines: list[str] = []
    for title, entries in results:
        head = "| strategy | first call ms (each process) | median | CPU ms (each) | median |"
        lines += ["", f"### {title}", "", head + " steady ms |", "|---|---|---:|---|---:|---:|"]
        for e in entries:
            each = e.status or ", ".join(_ms(t) for t in e.first_ms)
            cpus = ", ".join(_ms(t) for t in e.cpu_ms)
            name = f"`{e.name}`" if e.torchjac else e.name
            lines.append(
                f"| {name} | {each} | {_ms(e.first)} | {cpus} | {_ms(e.cpu)} | {_ms(e.steady)} |"
            )
    return lines


def _header(args: argparse.Namespace, elapsed: float) -> list[str]:
    import torch

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    small = ", small sizes" if args.small else ""
    return [
        f"Measured on {now}: {platform.processor() or platform.machine()}, 1 thread, torch"
        f" {torch.__version__}, Python {platform.python_version()}; {args.processes} fresh"
        f" processes per strategy, {args.repeats} steady calls each{small};"
        f" {elapsed / 60:.0f} min; load average at the end {load}.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workloads", default=",".join(DEFAULT))
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="the workloads' reduced sizes")
    parser.add_argument("--write", action="store_true", help="also write benchmarks/FIRST_CALL.md")
    args = parser.parse_args(argv)
    from benchmarks.registry import all_workloads, select

    keys = [k.strip() for k in args.workloads.split(",") if k.strip()]
    known = {w.key.upper(): w.key for w in select(all_workloads(), keys)}
    start = time.perf_counter()
    results = []
    for key in keys:
        results.append(measure(known[key.upper()], args.small, args.processes, args.repeats))
        print("\n".join(details(results[-1:])), file=sys.stderr, flush=True)  # as it goes
    lines = [*_header(args, time.perf_counter() - start), "", *summary(results)]
    lines += ["", "## Every strategy", *details(results)]
    print("\n".join(lines))
    if args.write:
        text = [
            "# First calls",
            "",
            "<!-- Generated by `python -m benchmarks.first_call --write`; do not edit. -->",
            "",
            "How it is measured: see the docstring of `benchmarks/first_call.py`.",
            "",
            *lines,
        ]
        (_ROOT / "benchmarks" / "FIRST_CALL.md").write_text("\n".join(text) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
