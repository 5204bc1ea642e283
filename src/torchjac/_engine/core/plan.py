"""Planning: which mode (rows or columns), how many probes per vectorised pass, under what memory.

NOTE [probe cost]: a row is one vector-Jacobian product (one backward pass). A column is one
Jacobian-vector product: with ``torch.func`` it is a forward pass; on an existing graph it is a
double backward (``d/du <J^T u, v>``), which costs about two backward passes plus one setup pass.
"auto" compares ``rows`` with ``cols * COLUMN_COST`` and takes the cheaper.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass

import torch

__all__ = [
    "Plan",
    "available_memory",
    "choose_chunk_size",
    "choose_graph_chunk_size",
    "choose_mode",
    "memory_budget",
    "parse_memory",
]

# A double-backward column relative to a row (see NOTE [probe cost]).
GRAPH_COLUMN_COST = 2.0
# A forward-mode (jvp) column relative to a row, for functions.
FUNC_COLUMN_COST = 1.0
# Share of the currently free memory a call may use by default.
DEFAULT_MEMORY_SHARE = 0.25
MIN_MEMORY_BUDGET = 2**26  # bytes: the default budget is never below it
# NOTE [loop or vmap]: vmap removes the per-operator overhead of a probe, and pays a fixed cost
# of its own. On a CPU, when there are few probes and each one moves many elements (so its
# operators are compute-bound), a plain loop is as fast or faster (measured on W5 when graph rows
# still went through this rule: 16 probes of a 512-wide trunk, loop 3-5% ahead; rows on a graph
# now follow NOTE [loop or vmap on a graph], and this rule serves the other families). On CUDA
# kernel launches dominate, so vmap always wins there.
# Under the oneDNN dispatch mode of NOTE [dense kernels] every operator costs ~8 µs more, once
# per probe in a loop and once per chunk under vmap: vmap wins again (W5: 39 against 45 ms).
LOOP_MAX_PROBES = 2
FEW_PROBES = 32
LARGE_PROBE_WORK = 2**17  # elements touched per probe (outputs + inputs of the problem)

# NOTE [loop or vmap on a graph]: rows of a Jacobian on an existing graph (``jac``, ``gramian``)
# run as a loop of ``autograd.grad`` or as vectorised passes, chosen by a modelled cost: a pass
# pays a cost per graph node (the engine, the Python of hooks, functorch's batching rules), and
# the products cost their multiply-adds at a rate that needs big enough products to use the
# threads. Measured on the CPU of the benchmarks (torch 2.13, trunk 64→256→256, 1 thread):
# a loop pass costs ~8 µs a node, a vectorised pass ~13 µs a node (functorch's rules, once per
# chunk, not once per probe); the multiply-adds are the same either way, but a loop's products are
# ``n`` times smaller and torch splits a product over threads only from ~``PARALLEL_GRAIN``
# multiply-adds per thread. So from two probes on, the vectorised pass costs less (at 1 thread:
# m=2 1.55 against 1.54 ms, a tie; m=16 12.7 against 13.8 ms; at 2 threads the loop fell far
# behind), and a loop is left for a single probe, a chunk of one forced by the memory budget, or
# the user's ``chunk_size=1``. (The old rule, a loop for up to 32 probes of large work, came from
# a path that copied every vectorised result once more; NOTE [native rows].)
LOOP_NODE_S = 8e-6
VMAP_NODE_S = 13e-6
MAC_S = 1 / 80e9  # a float32 multiply-add at one thread's GEMM rate (MKL on the benchmark CPU)
PARALLEL_GRAIN = 2**16

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


@dataclass(frozen=True)
class Plan:
    """A decided probing plan: ``mode`` in {"rev", "fwd"}, ``n_probes``, ``chunk_size``."""

    mode: str
    n_probes: int
    chunk_size: int


def parse_memory(fn: str, max_memory: float | str | None) -> int | None:
    """``512MiB``, ``"2 GB"``, ``10**9``, ``1.5e9`` -> bytes (rounded down); ``None`` stays."""
    if max_memory is None:
        return None
    if isinstance(max_memory, bool):
        raise TypeError(
            f"{fn}: `max_memory` must be a number of bytes or a string like '512MiB', got bool."
        )
    if isinstance(max_memory, int):
        value = max_memory
    elif isinstance(max_memory, float):
        if not math.isfinite(max_memory):
            raise ValueError(
                f"{fn}: `max_memory` must be a finite number of bytes, got {max_memory!r}. "
                "Pass None for the default (a share of the free memory)."
            )
        value = int(max_memory)
    elif isinstance(max_memory, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", max_memory)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"{fn}: `max_memory` must be bytes or a string such as '512MiB' or '2GB', "
                f"got {max_memory!r}."
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise TypeError(
            f"{fn}: `max_memory` must be a number of bytes or a string like '512MiB', "
            f"got {type(max_memory).__name__}."
        )
    if value <= 0:
        raise ValueError(
            f"{fn}: `max_memory` must be positive (at least 1 byte), got {max_memory!r}."
        )
    return value


def available_memory(device: torch.device) -> int:
    """Free memory on ``device`` in bytes (CUDA: from the device; CPU: MemAvailable).

    Read at most once a second per device: calls in a training loop should not pay for it.
    """
    now = time.monotonic()
    key = str(device)
    cached = _FREE_CACHE.get(key)
    if cached is not None and now - cached[0] < 1.0:
        return cached[1]
    free = _read_free(device)
    _FREE_CACHE[key] = (now, free)
    return free


_FREE_CACHE: dict[str, tuple[float, int]] = {}


def _read_free(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:  # Linux; else sysconf below
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages > 0 else 4 * 2**30


def memory_budget(fn: str, max_memory: float | str | None, device: torch.device) -> int:
    """The bytes a call may spend on probes: ``max_memory`` or a safe share of free memory."""
    parsed = parse_memory(fn, max_memory)
    if parsed is not None:
        return parsed
    return max(int(available_memory(device) * DEFAULT_MEMORY_SHARE), MIN_MEMORY_BUDGET)


def choose_mode(mode: str, n_rows: int, n_cols: int, column_cost: float) -> str:
    """Fewest weighted probes (see NOTE [probe cost]); explicit modes are kept."""
    if mode != "auto":
        return mode
    return "fwd" if n_cols * column_cost < n_rows else "rev"


def choose_chunk_size(
    n_probes: int,
    bytes_per_probe: int,
    budget: int,
    chunk_size: int | None,
    *,
    work_per_probe: int = 0,
    device: torch.device | None = None,
) -> int:
    """Probes per vectorised pass: the user's, else as many as ``budget`` holds (at least 1).

    See NOTE [loop or vmap]: a few probes whose work is large run as a loop on a CPU.
    """
    if n_probes <= 0:
        return 1
    if chunk_size is not None:
        return min(chunk_size, n_probes)
    if n_probes <= LOOP_MAX_PROBES:
        return 1
    on_cpu = device is None or device.type == "cpu"
    if on_cpu and n_probes <= FEW_PROBES and work_per_probe >= LARGE_PROBE_WORK:
        return 1
    fits = budget // max(bytes_per_probe, 1)
    return int(max(1, min(n_probes, fits)))


def _threads_used(macs_per_product: float, threads: int) -> float:
    return max(1.0, min(float(threads), macs_per_product / PARALLEL_GRAIN))


def graph_rows_cost(
    n_probes: int, chunk: int, *, nodes: int, macs: int, products: int, threads: int
) -> float:
    """Modelled seconds for ``n_probes`` rows on a graph of ``nodes`` nodes whose ``products``
    big products take ``macs`` multiply-adds per probe, in chunks of ``chunk`` (``1``: a loop).
    See NOTE [loop or vmap on a graph]."""
    passes = math.ceil(n_probes / max(chunk, 1))
    per_node = LOOP_NODE_S if chunk <= 1 else VMAP_NODE_S
    per_product = chunk * macs / max(products, 1)
    return passes * nodes * per_node + n_probes * macs * MAC_S / _threads_used(per_product, threads)


def choose_graph_chunk_size(
    n_probes: int,
    bytes_per_probe: int,
    budget: int,
    chunk_size: int | None,
    *,
    nodes: int,
    macs: int,
    products: int,
    device: torch.device,
) -> int:
    """Rows per pass on a graph: the user's, else the cheaper of a loop and the largest chunk the
    ``budget`` holds, by ``graph_rows_cost`` (NOTE [loop or vmap on a graph]); CUDA: vectorised."""
    if n_probes <= 0:
        return 1
    if chunk_size is not None:
        return min(chunk_size, n_probes)
    fits = int(max(1, min(n_probes, budget // max(bytes_per_probe, 1))))
    if fits == 1 or device.type != "cpu":
        return fits
    threads = torch.get_num_threads()
    kw = {"nodes": nodes, "macs": macs, "products": products, "threads": threads}
    loop = graph_rows_cost(n_probes, 1, **kw)
    return 1 if loop < graph_rows_cost(n_probes, fits, **kw) else fits
