"""The empirical NTK of an MLP split over 2 processes, its top eigenvalues against one process.

`tj.ntk(model, x, process_group=group)` splits the kernel into tiles, one per rank (rows of
samples against all of them for 2 ranks), each rank computes its tile and every rank gets the
whole kernel back (`gather="all"`). Every rank calls with the same arguments, as with DDP.

    torchrun --nproc-per-node 2 examples/ntk_distributed.py [--points 512]
    python examples/ntk_distributed.py [--points 512]      # starts the 2 ranks itself

Rank 0 prints the top eigenvalues of the split kernel and of the single-process `tj.ntk`, and
checks that they agree. Each rank uses one thread (gloo on CPU; NCCL with GPUs works alike).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchjac as tj


def mlp(width: int = 256, n_in: int = 8, n_out: int = 3) -> nn.Module:
    torch.manual_seed(0)  # every rank builds the same model
    layers = [nn.Linear(n_in, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, n_out))


def run(points: int) -> bool:
    """One rank's part, inside an initialised process group; True when the check passed."""
    torch.set_num_threads(1)
    rank, size = dist.get_rank(), dist.get_world_size()
    model = mlp()
    x = torch.randn(points, 8, generator=torch.Generator().manual_seed(1))
    K = tj.ntk(model, x, process_group=dist.group.WORLD)  # [N, 3, N, 3] on every rank
    tile, index = tj.ntk(model, x, process_group=dist.group.WORLD, gather=False)
    if rank != 0:
        return True
    n = K.shape[0] * K.shape[1]
    top = torch.linalg.eigvalsh(K.reshape(n, n).double()).flip(0)[:5]
    alone = tj.ntk(model, x)  # the same kernel in this one process
    ref = torch.linalg.eigvalsh(alone.reshape(n, n).double()).flip(0)[:5]
    rows, cols = index[0], index[2]
    print(
        f"K {tuple(K.shape)}, split over {size} ranks; rank 0 computed the tile "
        f"K[{rows.start}:{rows.stop}, :, {cols.start}:{cols.stop}, :]"
    )
    print("top eigenvalues, split over ranks:", ", ".join(f"{v:.6g}" for v in top.tolist()))
    print("top eigenvalues, one process:     ", ", ".join(f"{v:.6g}" for v in ref.tolist()))
    rel = ((top - ref).abs().max() / ref[0]).item()
    own = (tile - alone[index]).abs().max().item() / alone.abs().max().item()
    print(f"max relative difference of the eigenvalues {rel:.1e}, of rank 0's tile {own:.1e}")
    ok = rel < 1e-5 and own < 1e-5
    print("ok" if ok else "FAILED")
    return ok


def _spawned(rank: int, size: int, store: str, points: int) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        if not run(points):
            raise SystemExit(1)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=512)
    args = parser.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        try:
            return 0 if run(args.points) else 1
        finally:
            dist.destroy_process_group()
    store = os.path.join(tempfile.mkdtemp(), "store")
    mp.spawn(_spawned, args=(2, store, args.points), nprocs=2)  # raises if a rank failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
