"""W4 (seed 000): the Jacobian of all parameter gradients with respect to the model output.

MLP 32→128→128→4 tanh, N=16, MSE loss. ``grads = autograd.grad(loss, params,
create_graph=True)``; the Jacobian ``d grads / d out`` has ``P`` rows (P = 21,252 parameters) and
64 columns, shape ``[P, 16, 4]``. Rows (the seed's method) cost P backward passes; columns cost 64
double-backward passes. Reference (float64, closed form): ``d grads / d out = 2/(N·C) · J_θᵀ``
with ``J_θ = d out / d θ`` from ``torch.func.jacrev``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import torchjac as tj
from benchmarks._common import as_double, flat_cat, mlp, randn
from benchmarks._harness import Case, Strategy, Workload

__all__ = ["WORKLOADS"]


def _seed_jacobian(input: Any, wrt: Any, create_graph: bool = False) -> list[Tensor]:
    # Seed 000's row-by-row `jacobian`, verbatim.
    flat_input = torch.cat([i.reshape(-1) for i in input])
    grad_ouputs = torch.eye(len(flat_input), device=input[0].device, dtype=input[0].dtype)
    jac = []
    for i in range(flat_input.numel()):
        jac.append(
            torch.autograd.grad(
                flat_input,
                wrt,
                grad_ouputs[i],
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
                is_grads_batched=False,
            )
        )
    return [torch.stack(z) for z in zip(*jac)]


def _seed_batched_jacobian(input: Any, wrt: Any, create_graph: bool = False) -> Any:
    # Seed 000's `batched_jacobian`, verbatim.
    flat_input = torch.cat([i.reshape(-1) for i in input])
    return torch.autograd.grad(
        flat_input,
        wrt,
        torch.eye(len(flat_input), device=input[0].device, dtype=input[0].dtype),
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=True,
    )


def _columns_double_backward(grads: tuple[Tensor, ...], out: Tensor) -> Tensor:
    # Hand-written columns: v(u) = (d grads/d out)^T u is linear in u; d<v(u), e_k>/du = column k.
    us = [torch.zeros_like(g, requires_grad=True) for g in grads]
    (v,) = torch.autograd.grad(grads, out, us, create_graph=True)
    m = out.numel()
    basis = torch.eye(m, dtype=out.dtype, device=out.device).view(m, *out.shape)
    cols = torch.autograd.grad(v, us, basis, is_grads_batched=True)
    return flat_cat(cols, m).T.reshape(-1, *out.shape)


def _build(small: bool) -> Case:
    sizes = [8, 16, 16, 4] if small else [32, 128, 128, 4]
    n = 4 if small else 16
    model = mlp(sizes, nn.Tanh, seed=0)
    x, target = randn(n, sizes[0], seed=1), randn(n, sizes[-1], seed=2)
    params = list(model.parameters())
    p_total = sum(p.numel() for p in params)

    double = as_double(model)
    pd = {k: v.detach() for k, v in double.named_parameters()}
    jd = jacrev(lambda q: functional_call(double, q, (x.double(),)))(pd)
    j_theta = flat_cat([jd[k] for k in pd], n * sizes[-1])
    reference = (2.0 / (n * sizes[-1]) * j_theta.T).reshape(p_total, n, sizes[-1])

    def setup() -> tuple[Tensor, tuple[Tensor, ...]]:
        out = model(x)
        loss = F.mse_loss(out, target)
        return out, torch.autograd.grad(loss, params, create_graph=True)

    strategies = [
        Strategy(
            "seed 000: row loop (autograd.grad)", lambda s: _seed_jacobian(s[1], [s[0]]), setup
        ),
        Strategy(
            "seed 000: is_grads_batched, eye(P)",
            lambda s: _seed_batched_jacobian(s[1], [s[0]]),
            setup,
        ),
        Strategy("torchjd.autojac.jac", lambda s: _torchjd_jac(s[1], [s[0]]), setup, ("torchjd",)),
        Strategy("hand-written columns (double backward)", lambda s: _cols(s), setup),
        Strategy("tj.jac(grads, [out])", lambda s: tj.jac(s[1], [s[0]]), setup, torchjac=True),
    ]
    size = (
        f"MLP {'→'.join(map(str, sizes))} tanh, N={n}, P={p_total}: [{p_total}, {n}, {sizes[-1]}]"
    )
    return Case(reference, strategies, size)


def _cols(state: tuple[Tensor, tuple[Tensor, ...]]) -> Tensor:
    out, grads = state
    return _columns_double_backward(grads, out)


def _torchjd_jac(outputs: Any, inputs: Any) -> Any:
    from torchjd.autojac import jac

    return jac(outputs, inputs)


WORKLOADS = [Workload("W4", "Jacobian of parameter gradients w.r.t. the output (seed 000)", _build)]
