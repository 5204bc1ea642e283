"""W2 (seed 002, PINN): per-sample Jacobian and Hessian of a small-input MLP.

MLP 2→64→64→64→3 tanh, B=1024: ``u_x = [B, 3, 2]`` and ``u_xx = [B, 3, 2, 2]``, both needed (a
PINN residual uses first and second derivatives). Reference: float64 ``vmap(jacrev)`` and
``vmap(hessian)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian as ag_jacobian
from torch.func import hessian, jacfwd, jacrev, vmap

import torchjac as tj
from benchmarks._common import as_double, mlp, randn, styles
from benchmarks._harness import Case, Strategy, Workload

__all__ = ["WORKLOADS"]


def _single(f: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def _seed_loop(f: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    # Seed 002's `second_order_jacobians` loop (sum trick per output), extended to every
    # second-derivative column so that it yields the full per-sample Hessian.
    x = x.detach().requires_grad_()
    y = f(x)
    firsts, seconds = [], []
    for i in range(y.shape[1]):
        (j1,) = torch.autograd.grad(y[:, i].sum(), x, create_graph=True)
        firsts.append(j1.detach())
        row = [
            torch.autograd.grad(j1[:, k].sum(), x, retain_graph=True)[0] for k in range(x.shape[1])
        ]
        seconds.append(torch.stack(row, dim=1))
    return torch.stack(firsts, dim=1), torch.stack(seconds, dim=1)


def _nested_sum_trick(f: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    # Seed 002's sum trick, nested: d/dx of the batch-summed output, twice.
    def first(z: Tensor) -> Tensor:
        return ag_jacobian(lambda w: f(w).sum(0), z, create_graph=True, vectorize=True)

    j = first(x)  # [out, B, in]
    h = ag_jacobian(lambda z: first(z).sum(1), x, vectorize=True)  # [out, in, B, in]
    return j.detach().permute(1, 0, 2), h.permute(2, 0, 1, 3)


def _func_with_aux(f: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    # One pass: the Hessian by forward-over-reverse, the Jacobian as its auxiliary output.
    g = jacrev(_single(f))

    def both(xi: Tensor) -> tuple[Tensor, Tensor]:
        jx = g(xi)
        return jx, jx

    return vmap(jacfwd(both, has_aux=True))


def _build(small: bool) -> Case:
    sizes = [2, 16, 16, 3] if small else [2, 64, 64, 64, 3]
    b = 64 if small else 1024
    f = mlp(sizes, nn.Tanh, seed=30)
    x = randn(b, sizes[0], seed=31)
    fd, xd = _single(as_double(f)), x.double()
    reference = (vmap(jacrev(fd))(xd), vmap(hessian(fd))(xd))
    vj, vh = vmap(jacrev(_single(f))), vmap(hessian(_single(f)))
    vjfr, vrr = vmap(jacfwd(jacrev(_single(f)))), vmap(jacrev(jacrev(_single(f))))
    aux = _func_with_aux(f)
    strategies = [
        Strategy("seed 002: autograd.grad loop (sum trick)", lambda _: _seed_loop(f, x)),
        Strategy("vmap(jacrev) + vmap(hessian)", lambda _: (vj(x), vh(x))),
        Strategy("vmap(jacrev) + vmap(jacfwd(jacrev))", lambda _: (vj(x), vjfr(x))),
        Strategy("vmap(jacrev) + vmap(jacrev(jacrev))", lambda _: (vj(x), vrr(x))),
        Strategy("vmap(jacfwd(jacrev, has_aux)): one pass", lambda _: aux(x)[::-1]),
        Strategy("nested sum trick, autograd.functional", lambda _: _nested_sum_trick(f, x)),
        Strategy(
            "tj.jacobian + tj.hessian (batch_dim=0)",
            lambda _: (tj.jacobian(f, x, batch_dim=0), tj.hessian(f, x, batch_dim=0)),
            torchjac=True,
        ),
        *(
            Strategy(
                f"tj.jacobian + tj.hessian, {style}",
                lambda _, g=g: (tj.jacobian(g, x, batch_dim=0), tj.hessian(g, x, batch_dim=0)),  # type: ignore[misc]
                torchjac=True,
            )
            for style, g in styles(f)
        ),
    ]
    size = f"MLP {'→'.join(map(str, sizes))} tanh, B={b}: [{b}, 3, 2] and [{b}, 3, 2, 2]"
    return Case(reference, strategies, size)


WORKLOADS = [Workload("W2", "PINN per-sample Jacobian and Hessian (seed 002)", _build)]
