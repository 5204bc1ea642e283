"""The Jacobian of a loss's parameter gradients with respect to the model's output.

Gradient-leakage analyses of federated learning ask how the parameter gradients g = ∂L/∂θ of a
loss change with the model's output y: the Jacobian ∂g/∂y, with P rows (one per parameter entry)
and as many columns as y has elements. The usual way builds g with `create_graph=True` and runs
one backward pass per row, P of them (or an `eye(P)` of cotangents with `is_grads_batched`).
`tj.jac(grads, [out])` counts rows and columns and computes columns instead, by double backward:
as many as y has elements, whatever P is.

    python examples/grad_jacobian.py [--width 128] [--batch 16]

Prints the shape, the agreement with the row loop and both times (torchjac's after one warm-up
call).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import Tensor, nn

import torchjac as tj


def row_loop(grads: tuple[Tensor, ...], out: Tensor) -> Tensor:
    """One ``autograd.grad`` per gradient entry: the usual answer."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = [torch.autograd.grad(flat[i], out, retain_graph=True)[0] for i in range(flat.numel())]
    return torch.stack(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model = nn.Sequential(
        nn.Linear(8, args.width),
        nn.Tanh(),
        nn.Linear(args.width, args.width),
        nn.Tanh(),
        nn.Linear(args.width, 4),
    )
    out = model(torch.randn(args.batch, 8))  # y: [batch, 4]
    loss = (out - torch.randn_like(out)).pow(2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    n_params = sum(g.numel() for g in grads)

    tj.jac(grads, [out], retain_graph=True)  # a first call pays one-off set-up costs
    start = time.perf_counter()
    J = tj.jac(grads, [out], retain_graph=True)[0]  # [P] + out.shape
    t_tj = time.perf_counter() - start
    start = time.perf_counter()
    ref = row_loop(grads, out)
    t_loop = time.perf_counter() - start

    diff = (J - ref).abs().max().item()
    print(
        f"d(∂L/∂θ)/dy: {n_params} gradient entries x output {tuple(out.shape)} -> {tuple(J.shape)}"
    )
    print(f"max |tj.jac - row loop| = {diff:.2e}")
    print(f"tj.jac (columns by double backward): {t_tj * 1e3:.1f} ms")
    print(f"row loop ({n_params} backward passes):  {t_loop * 1e3:.1f} ms")
    ok = J.shape == (n_params, *out.shape) and diff <= 1e-5 * ref.abs().max().item()
    print("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
