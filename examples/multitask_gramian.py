"""A multi-task training step that combines the task gradients with weights read from `tj.gramian`.

A shared trunk feeds one head per task; the tasks pull the trunk in partly conflicting
directions. Each step computes the Gramian of the task losses with respect to the trunk,
G = J Jᵀ (G[i, j] = <∇L_i, ∇L_j>), with `tj.gramian`, which never forms J. Most aggregators of
multi-objective optimisation read only G. This example writes one, UPGrad (each task's unit
weight projected onto the dual cone {w : G w ≥ 0}, then averaged), with a small exact solver of
its quadratic programs; MGDA's min-norm weights on the simplex are computed too, for comparison.
The trunk's update is Jᵀ w, one weighted `losses.backward(w)` through the graph the Gramian
kept (`retain_graph=True`); the heads take their own gradients. `benchmarks/w5_sweep.py` (W5d)
times this step against TorchJD's `autogram.Engine`.

    python examples/multitask_gramian.py [--steps 150] [--tasks 4]

Prints the Gramian and the weights of the first step, checks that the combined direction
conflicts with no task (G w ≥ 0), then trains and prints every task's loss before and after.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch import Tensor, nn

import torchjac as tj


def project_dual_cone(G: np.ndarray, u: np.ndarray, tol: float = 1e-12) -> np.ndarray:
    """The UPGrad sub-problem argmin_{v ≥ u} vᵀ G v.

    Exact coordinate descent: each coordinate is minimised in closed form and clipped at its
    bound, sweep after sweep, until a sweep moves nothing; it converges for a positive
    semi-definite ``G`` with a positive diagonal. (``G v`` is then ≥ 0 where ``v > u``.)
    """
    v = u.copy()
    for _ in range(10_000):
        moved = 0.0
        for j in range(len(u)):
            new = max(u[j], v[j] - G[j] @ v / G[j, j])
            moved = max(moved, abs(new - v[j]))
            v[j] = new
        if moved < tol:
            break
    return v


def upgrad_weights(G: Tensor) -> Tensor:
    """UPGrad: the mean over tasks i of argmin_{v ≥ e_i} vᵀ G v (G normalised by its trace)."""
    g = G.double().numpy() / G.trace().item()
    w = np.mean([project_dual_cone(g, e) for e in np.eye(len(g))], axis=0)
    return torch.from_numpy(w).to(G.dtype)


def mgda_weights(G: Tensor, iters: int = 1000) -> Tensor:
    """MGDA: argmin_{w in the simplex} wᵀ G w, by Frank-Wolfe with exact line search."""
    g = G.double().numpy()
    w = np.full(len(g), 1.0 / len(g))
    for _ in range(iters):
        grad = g @ w
        d = -w.copy()
        d[grad.argmin()] += 1.0
        curvature = d @ g @ d
        if curvature <= 1e-15 or grad @ d >= 0:
            break
        w = w + min(1.0, -(grad @ d) / curvature) * d
    return torch.from_numpy(w).to(G.dtype)


class MultiTask(nn.Module):
    def __init__(self, n_in: int, tasks: int, width: int = 32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width))
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(tasks))

    def forward(self, x: Tensor, ys: Tensor) -> Tensor:
        """The vector of task losses, shape [tasks]."""
        z = torch.relu(self.trunk(x))
        return torch.stack([(h(z).squeeze(1) - y).pow(2).mean() for h, y in zip(self.heads, ys)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_printoptions(precision=3, sci_mode=False)

    n, d = 256, 8
    x = torch.randn(n, d)
    targets = torch.randn(args.tasks, d)  # task t: a noisy nonlinear function of x
    targets[1] = -targets[0]  # tasks 0 and 1 conflict: opposite targets
    ys = torch.tanh(x @ targets.T).T + 0.05 * torch.randn(args.tasks, n)

    model = MultiTask(d, args.tasks)
    trunk = list(model.trunk.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    first = model(x, ys).detach()
    ok = True
    for step in range(args.steps):
        losses = model(x, ys)
        G = tj.gramian(losses, trunk, retain_graph=True)  # [tasks, tasks], J never formed
        w = upgrad_weights(G)
        if step == 0:
            J = torch.cat([j.flatten(1) for j in tj.jac(losses, trunk, retain_graph=True)], 1)
            print("Gramian of the task gradients w.r.t. the trunk:")
            print(G)
            print(f"max |G - J Jᵀ| = {(G - J @ J.T).abs().max().item():.2e}")
            print(f"UPGrad weights: {w}")
            print(f"MGDA weights:   {mgda_weights(G)}")
            print(f"<g_i, Jᵀw> = G w = {G @ w}  (>= 0: no task is harmed)")
            print(f"mean of the gradients instead: G 1/k = {G.mean(1)}")
            ok &= bool((G @ w >= -1e-6 * G.trace()).all())
            ok &= torch.allclose(G, J @ J.T, rtol=1e-4, atol=1e-6)
        opt.zero_grad()
        # The trunk's direction is Jᵀ w: one backward pass of the losses weighted by w, through
        # the graph that `retain_graph=True` kept (the step TorchJD's autogram Engine serves).
        # Head i only meets loss i, so it gets w_i times its own gradient.
        losses.backward(w)
        opt.step()

    last = model(x, ys).detach()
    print(f"task losses before: {first}")
    print(f"task losses after:  {last}  ({args.steps} steps)")
    ok &= bool((last < first).all())
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
