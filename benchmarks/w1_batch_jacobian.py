"""W1 (seed 002): the per-sample input Jacobian of an MLP applied to a batch.

MLP 32→256→256→32 tanh, B=256: ``J[b] = d f(x)[b] / d x[b]``, shape ``[256, 32, 32]``, without
the ``[B, out, B, in]`` cross terms. Reference: float64 ``vmap(jacrev)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian as ag_jacobian
from torch.func import jacfwd, jacrev, vmap

import torchjac as tj
from benchmarks._common import as_double, mlp, randn, styles
from benchmarks._harness import Case, Strategy, Workload

__all__ = ["WORKLOADS"]


def _per_sample(f: nn.Module, jac: object) -> object:
    return vmap(jac(lambda xi: f(xi.unsqueeze(0)).squeeze(0)))  # type: ignore[operator]


def _sum_trick(f: nn.Module, x: Tensor) -> Tensor:
    # Seed 002's accepted answer: differentiate the batch-summed output, then permute.
    return ag_jacobian(lambda z: f(z).sum(0), x, vectorize=True).permute(1, 0, 2)


def _full_diagonal(f: nn.Module, x: Tensor) -> Tensor:
    # Seed 002's question: the full [B, out, B, in] Jacobian (one backward per row, the default),
    # then its batch diagonal.
    return ag_jacobian(f, x).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _row_loop(f: nn.Module, x: Tensor) -> Tensor:
    x = x.detach().requires_grad_()
    y = f(x)
    rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0] for i in range(y.shape[1])]
    return torch.stack(rows, dim=1)


def _torchjd(f: nn.Module, x: Tensor) -> Tensor:
    from torchjd.autojac import jac

    x = x.detach().requires_grad_()
    return jac(f(x).sum(0), [x])[0].permute(1, 0, 2)


def _build(small: bool) -> Case:
    sizes = [8, 32, 32, 8] if small else [32, 256, 256, 32]
    b = 16 if small else 256
    f = mlp(sizes, nn.Tanh, seed=20)
    x = randn(b, sizes[0], seed=21)
    reference = _per_sample(as_double(f), jacrev)(x.double())  # type: ignore[operator]
    rev, fwd = _per_sample(f, jacrev), _per_sample(f, jacfwd)
    strategies = [
        Strategy("torch.func vmap(jacrev)", lambda _: rev(x)),  # type: ignore[operator]
        Strategy("torch.func vmap(jacfwd)", lambda _: fwd(x)),  # type: ignore[operator]
        Strategy("sum trick, autograd.functional (vectorize)", lambda _: _sum_trick(f, x)),
        Strategy("row loop of autograd.grad (sum trick)", lambda _: _row_loop(f, x)),
        Strategy("full Jacobian + diagonal (seed 002)", lambda _: _full_diagonal(f, x)),
        Strategy(
            "torchjd jac of batch-summed output", lambda _: _torchjd(f, x), requires=("torchjd",)
        ),
        Strategy(
            "tj.jacobian(f, x, batch_dim=0)",
            lambda _: tj.jacobian(f, x, batch_dim=0),
            torchjac=True,
        ),
        *(
            Strategy(
                f"tj.jacobian, {style}",
                lambda _, g=g: tj.jacobian(g, x, batch_dim=0),  # type: ignore[misc]
                torchjac=True,
            )
            for style, g in styles(f)
        ),
    ]
    size = f"MLP {'→'.join(map(str, sizes))} tanh, B={b}: [{b}, {sizes[-1]}, {sizes[0]}]"
    return Case(reference, strategies, size)


WORKLOADS = [Workload("W1", "per-sample input Jacobian (seed 002)", _build)]
