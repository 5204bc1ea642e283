"""Peak memory of one strategy call, measured in a fresh subprocess (Linux, CPU).

NOTE [peak memory]: each strategy runs in its own Python process: build the workload, run the
strategy's ``setup``, then reset the kernel's peak-RSS mark (``/proc/self/clear_refs`` ← 5) and
call ``run``; the result is ``VmHWM - VmRSS`` (MiB), the memory the call needed on top of what
existed before it, its result included. glibc is told to ``mmap`` every block over 64 KiB
(``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave RSS and cannot hide a later peak.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["peak_mib"]

_CHILD = """
import gc, sys
from benchmarks.registry import all_workloads
key, index, small = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
(workload,) = [w for w in all_workloads() if w.key == key]
strategy = workload.build(small).strategies[index]
state = strategy.setup()
gc.collect()

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])  # KiB
    raise RuntimeError(field)

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
result = strategy.run(state)
print("PEAK_MIB", (status("VmHWM:") - base) / 1024)
"""


def peak_mib(key: str, index: int, small: bool, threads: int | None = None) -> float | None:
    """Peak extra memory (MiB) of strategy ``index`` of workload ``key``; None if unmeasurable."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "PYTHONWARNINGS": "ignore",
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    args = [sys.executable, "-c", _CHILD, key, str(index), "1" if small else "0"]
    try:
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None
    for line in done.stdout.splitlines():
        if line.startswith("PEAK_MIB "):
            return float(line.split()[1])
    return None
