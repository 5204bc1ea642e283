"""W6's NTK split over 2 gloo ranks with one thread each, against 1 rank with one thread.

    python -m benchmarks.distributed_ntk [--n 2048] [--rounds 3] [--model mlp|cnn]

Spawns 2 processes (``torch.multiprocessing``), each with ``torch.set_num_threads(1)``. Every
round times, in alternating order and in the same processes: ``tj.ntk(model, x)`` on rank 0
alone (rank 1 waits in a barrier), ``tj.ntk(model, x, process_group=g)`` (the whole kernel
gathered on both ranks), the same with ``gather="rank0"`` (on rank 0 only) and with
``gather=False`` (each rank keeps its tile).
Rank 0 prints the median of each and the speed-ups, by wall time and by the CPU time of the
busiest rank (which other processes on the machine disturb less; waiting is not CPU time), the
largest difference to the single-process kernel, the bytes a rank holds with ``gather=False``
against the whole kernel, and the load average before and after (``os.getloadavg``): on a
machine shared with other work the wall-time ratio measures the load as much as the split.
Models: ``mlp`` is W6's MLP 32→256→256→6 ReLU (default N = 2048); ``cnn`` a small CNN on
1×12×12 images with 10 outputs (default N = 512).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import torchjac as tj
from benchmarks._common import fork_rng, mlp, randn


def _model(kind: str) -> nn.Module:
    if kind == "mlp":
        return mlp([32, 256, 256, 6], nn.ReLU, seed=60)
    with fork_rng(62):
        return nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )


def _data(kind: str, n: int) -> Tensor:
    return randn(n, 32, seed=61) if kind == "mlp" else randn(n, 1, 12, 12, seed=63)


def _timed(call: Callable[[], Any], group: Any) -> tuple[float, float, Any]:
    """Wall time (barrier to barrier) and the busiest rank's CPU time (all its threads)."""
    dist.barrier(group)
    start, cpu = time.perf_counter(), time.process_time()
    out = call()
    cpu = time.process_time() - cpu
    dist.barrier(group)
    wall = time.perf_counter() - start
    cpus: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(cpus, cpu, group=group)
    return wall, max(cpus), out


def _worker(rank: int, size: int, store: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=1800)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                            timeout=timeout)  # fmt: skip
    group = dist.group.WORLD
    model, x = _model(args.model), _data(args.model, args.n)
    strategies: dict[str, Callable[[], Any]] = {
        "1 rank x 1 thread": lambda: tj.ntk(model, x) if rank == 0 else None,
        f"{size} ranks, gather='all'": lambda: tj.ntk(model, x, process_group=group),
        f"{size} ranks, gather='rank0'": lambda: tj.ntk(
            model, x, process_group=group, gather="rank0"
        ),
        f"{size} ranks, gather=False": lambda: tj.ntk(model, x, process_group=group, gather=False),
    }
    times: dict[str, list[float]] = {name: [] for name in strategies}
    cpus: dict[str, list[float]] = {name: [] for name in strategies}
    results: dict[str, Any] = {}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        order = list(strategies) if r % 2 == 0 else list(reversed(strategies))
        for name in order:
            t, cpu, out = _timed(strategies[name], group)
            times[name].append(t)
            cpus[name].append(cpu)
            results[name] = out
            del out
    load_after = os.getloadavg()
    if rank != 0:
        dist.destroy_process_group()
        return
    single = results["1 rank x 1 thread"]
    split = results[f"{size} ranks, gather='all'"]
    to_rank0 = results[f"{size} ranks, gather='rank0'"]
    tile, index = results[f"{size} ranks, gather=False"]
    scale = single.abs().max().item()
    n, k = single.shape[0], single.shape[1]
    print(
        f"NTK of {args.model} at N={n}: [{n}, {k}, {n}, {k}], {args.rounds} rounds, 1 thread/rank"
    )
    base = statistics.median(times["1 rank x 1 thread"])
    base_cpu = statistics.median(cpus["1 rank x 1 thread"])
    print("  wall time, barrier to barrier:")
    for name, ts in times.items():
        med = statistics.median(ts)
        laps = ", ".join(f"{t:.2f}" for t in ts)
        print(f"    {name:28s} median {med:7.2f} s  ({laps})  speed-up {base / med:.2f}x")
    print("  CPU time of the busiest rank (less sensitive to other work on the machine):")
    for name, ts in cpus.items():
        med = statistics.median(ts)
        laps = ", ".join(f"{t:.2f}" for t in ts)
        print(f"    {name:28s} median {med:7.2f} s  ({laps})  speed-up {base_cpu / med:.2f}x")
    diff = (split - single).abs().max().item() / scale
    diff0 = (to_rank0 - single).abs().max().item() / scale
    tdiff = (tile - single[index]).abs().max().item() / scale
    print(
        f"  max |split - single| / max |K|: {diff:.1e} (gathered), {diff0:.1e} (to rank 0), "
        f"{tdiff:.1e} (own tile)"
    )
    full_mb = single.numel() * single.element_size() / 2**20
    tile_mb = tile.numel() * tile.element_size() / 2**20
    print(f"  gather=False on rank 0: tile {tile_mb:.0f} MiB of the kernel's {full_mb:.0f} MiB")
    print(f"  load average (1, 5, 15 min) before {load_before}, after {load_after}")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 2048 if args.model == "mlp" else 512
    store = os.path.join(tempfile.mkdtemp(), "store")
    mp.spawn(_worker, args=(2, store, args), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
