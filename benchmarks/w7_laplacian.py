"""W7 and W7b: per-sample Laplacian and Hessian diagonal of a scalar field.

MLP 16→128→128→128→1 tanh, B=256. W7: ``Δf(x_b) = Σ_i ∂²f/∂x_i²``, shape ``[256, 1]``. W7b: the
Hessian diagonal, ``[256, 1, 16]``. The peers form the full per-sample Hessian (``[B, 1, 16,
16]``) and take its trace or diagonal, or loop over the 16 input dimensions. Reference: float64
``vmap(hessian)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import hessian, jacfwd, jacrev, vmap

import torchjac as tj
from benchmarks._common import as_double, mlp, randn, styles
from benchmarks._harness import Case, Strategy, Workload

__all__ = ["WORKLOADS"]


def _single(f: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def _diag(h: Tensor) -> Tensor:
    return h.diagonal(dim1=-2, dim2=-1)  # [B, 1, D, D] -> [B, 1, D]


def _autograd_loop(f: nn.Module, x: Tensor) -> Tensor:
    # Sum trick, then one backward per input dimension: [B, 1, D].
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    cols = [
        torch.autograd.grad(g[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(x.shape[1])
    ]
    return torch.stack(cols, dim=1).unsqueeze(1)


def _problem(small: bool) -> tuple[nn.Module, Tensor, Tensor, str]:
    sizes = [4, 16, 16, 16, 1] if small else [16, 128, 128, 128, 1]
    b = 16 if small else 256
    f = mlp(sizes, nn.Tanh, seed=70)
    x = randn(b, sizes[0], seed=71)
    h = vmap(hessian(_single(as_double(f))))(x.double())  # [B, 1, D, D]
    size = f"MLP {'→'.join(map(str, sizes))} tanh, B={b}"
    return f, x, _diag(h), size


def _peers(f: nn.Module, x: Tensor, reduce: Callable[[Tensor], Tensor]) -> list[Strategy]:
    s = _single(f)
    vh, vrr, vfr = vmap(hessian(s)), vmap(jacrev(jacrev(s))), vmap(jacfwd(jacrev(s)))
    return [
        Strategy("vmap(hessian), then diagonal", lambda _: reduce(_diag(vh(x)))),
        Strategy("vmap(jacrev(jacrev)), then diagonal", lambda _: reduce(_diag(vrr(x)))),
        Strategy("vmap(jacfwd(jacrev)), then diagonal", lambda _: reduce(_diag(vfr(x)))),
        Strategy("autograd loop over input dims", lambda _: reduce(_autograd_loop(f, x))),
    ]


def _call(fn: Callable[..., Tensor], g: Callable[[Tensor], Tensor], x: Tensor) -> Callable:
    return lambda _: fn(g, x, batch_dim=0)


def _trace(d: Tensor) -> Tensor:
    return d.sum(-1)


def _same(d: Tensor) -> Tensor:
    return d


def _build_laplacian(small: bool) -> Case:
    f, x, diag, size = _problem(small)
    strategies = [
        *_peers(f, x, _trace),
        Strategy(
            "tj.laplacian(f, x, batch_dim=0)",
            lambda _: tj.laplacian(f, x, batch_dim=0),
            torchjac=True,
        ),
        *(
            Strategy(f"tj.laplacian, {style}", _call(tj.laplacian, g, x), torchjac=True)
            for style, g in styles(f)
        ),
    ]
    return Case(diag.sum(-1), strategies, f"{size}: [{x.shape[0]}, 1]")


def _build_diagonal(small: bool) -> Case:
    f, x, diag, size = _problem(small)
    strategies = [
        *_peers(f, x, _same),
        Strategy(
            "tj.hessian_diagonal(f, x, batch_dim=0)",
            lambda _: tj.hessian_diagonal(f, x, batch_dim=0),
            torchjac=True,
        ),
        *(
            Strategy(
                f"tj.hessian_diagonal, {style}", _call(tj.hessian_diagonal, g, x), torchjac=True
            )
            for style, g in styles(f)
        ),
    ]
    return Case(diag, strategies, f"{size}: [{x.shape[0]}, 1, {x.shape[1]}]")


WORKLOADS = [
    Workload("W7", "per-sample Laplacian", _build_laplacian),
    Workload("W7b", "per-sample Hessian diagonal", _build_diagonal),
]
