"""Train a small physics-informed network (PINN) on a Poisson equation, `tj.laplacian` in the loss.

The problem, on the unit square: -Δu = f with u = 0 on the boundary, for
f(x, y) = 2π² sin(πx) sin(πy), whose solution is u*(x, y) = sin(πx) sin(πy). The trial solution
u(x, y) = x(1 - x) y(1 - y) · net(x, y) vanishes on the boundary by construction, and the network
is trained on the residual -Δu - f at random interior points. The Laplacian of every point is
`tj.laplacian(u, xy, batch_dim=0, create_graph=True)`: one Taylor-mode pass through the network
and the product, differentiable with respect to the network's parameters.

    python examples/pinn_poisson.py [--steps 600] [--points 256]

Prints the loss during training and the relative L2 error against u*; exits with status 1 if
the Laplacian disagrees with torch.func's or the error did not fall below 5%.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import Tensor, nn

import torchjac as tj


def source(xy: Tensor) -> Tensor:
    """f(x, y) = 2π² sin(πx) sin(πy), shape [N, 1]."""
    s = torch.sin(math.pi * xy)
    return 2 * math.pi**2 * (s[:, :1] * s[:, 1:])


def exact(xy: Tensor) -> Tensor:
    """u*(x, y) = sin(πx) sin(πy), shape [N, 1]."""
    s = torch.sin(math.pi * xy)
    return s[:, :1] * s[:, 1:]


class Trial(nn.Module):
    """u(x, y) = x(1 - x) y(1 - y) · net(x, y): zero on the boundary of the unit square."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1)
        )

    def forward(self, xy: Tensor) -> Tensor:
        bump = (xy * (1 - xy)).prod(dim=-1, keepdim=True)
        return bump * self.net(xy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--points", type=int, default=256, help="interior points per step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    u = Trial()

    # The Laplacian torchjac computes agrees with torch.func's trace of the Hessian.
    probe = torch.rand(16, 2, generator=gen)
    lap = tj.laplacian(u, probe, batch_dim=0)
    ref = torch.func.vmap(torch.func.hessian(u))(probe).diagonal(dim1=-2, dim2=-1).sum(-1)
    lap_diff = (lap - ref).abs().max().item()
    print(f"laplacian vs torch.func: max |difference| {lap_diff:.2e}")

    test = torch.rand(2048, 2, generator=gen)
    opt = torch.optim.Adam(u.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        xy = torch.rand(args.points, 2, generator=gen)
        residual = -tj.laplacian(u, xy, batch_dim=0, create_graph=True) - source(xy)
        loss = residual.pow(2).mean()
        if step % max(args.steps // 6, 1) == 0:
            print(f"step {step:4d}  loss {loss.item():.4e}")
        if step == args.steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - start

    with torch.no_grad():
        err = ((u(test) - exact(test)).norm() / exact(test).norm()).item()
    print(f"trained {args.steps} steps in {seconds:.1f} s")
    print(f"relative L2 error against the exact solution: {err:.2%}")
    ok = lap_diff < 1e-4 and err < 0.05
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
