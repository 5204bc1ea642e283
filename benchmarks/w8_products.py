"""W8a and W8b (issue 18): ``JacobianOperator`` products against the hand-written ones.

W5's problem (trunk MLP 128→512→512 ReLU + 16 linear heads, N=256, the 16 task losses; J is
``[16, 328,704]`` w.r.t. the trunk). W8a: ``J @ V`` with ``V`` of 16 columns, against
``vmap(jvp)`` of ``functional_call`` over the columns and a loop of ``jvp``. W8b: ``Jᵀ @ U``
with ``U`` of 16 columns, against one forward pass and ``autograd.grad(...,
is_grads_batched=True)``, and ``vmap`` over ``torch.func.vjp``. Each timed call includes the
forward pass it needs (the operator makes one per product). The operator is built once, untimed.
Reference: float64 ``jacrev`` times ``V`` (``Uᵀ`` times it for W8b).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vjp, vmap

import torchjac as tj
from benchmarks._common import randn
from benchmarks._harness import Case, Strategy, Workload
from benchmarks.w5_multitask import _problem, _reference_jacobian

__all__ = ["WORKLOADS"]

COLUMNS = 16


def _setup(small: bool) -> tuple:
    model, x, y, size = _problem(small)
    names = [f"trunk.{k}" for k, _ in model.trunk.named_parameters()]
    params = {k: v.detach() for k, v in model.named_parameters() if k in names}
    fixed = {k: v.detach() for k, v in model.named_parameters() if k not in names}
    n = sum(p.numel() for p in params.values())
    reference = torch.cat([j.reshape(16, -1) for j in _reference_jacobian(model, x, y)], dim=1)
    op = tj.JacobianOperator.from_module(model, x, y, params=names)
    return model, x, y, size, params, fixed, n, reference, op


def _split(v: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """``[n, k]`` -> per parameter ``[k, *p]`` (copies, as a user's tangents would be)."""
    out, o = {}, 0
    for k, p in params.items():
        out[k] = v[o : o + p.numel()].T.reshape(-1, *p.shape)
        o += p.numel()
    return out


def _build_jv(small: bool) -> Case:
    model, x, y, size, params, fixed, _, reference, op = _setup(small)
    V = randn(reference.shape[1], COLUMNS, seed=82)
    tangents = _split(V, params)

    def losses(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, {**fixed, **p}, (x, y))

    def one(t: dict[str, Tensor]) -> Tensor:
        return jvp(losses, (params,), (t,))[1]

    def by_vmap(_: object) -> Tensor:
        return vmap(one, randomness="same")(tangents).T

    def by_loop(_: object) -> Tensor:
        return torch.stack([one({k: t[i] for k, t in tangents.items()}) for i in range(COLUMNS)], 1)

    strategies = [
        Strategy("hand-written vmap(jvp) over 16 columns", by_vmap),
        Strategy("hand-written loop of jvp", by_loop),
        Strategy("tj.JacobianOperator @ V", lambda _: op @ V, torchjac=True),
    ]
    return Case(reference @ V.double(), strategies, f"{size}: J @ V, V [P, {COLUMNS}]")


def _build_jtu(small: bool) -> Case:
    model, x, y, size, params, fixed, _, reference, op = _setup(small)
    U = randn(16, COLUMNS, seed=83)
    cots = U.T.contiguous()  # [k, 16]: one cotangent per column

    def is_grads_batched(_: object) -> Tensor:
        leaves = {
            k: v.requires_grad_(True) for k, v in ((k, p.detach()) for k, p in params.items())
        }
        out = functional_call(model, {**fixed, **leaves}, (x, y))
        grads = torch.autograd.grad(out, list(leaves.values()), cots, is_grads_batched=True)
        return torch.cat([g.reshape(COLUMNS, -1) for g in grads], dim=1).T

    def by_vjp(_: object) -> Tensor:
        _, pull = vjp(lambda p: functional_call(model, {**fixed, **p}, (x, y)), params)
        grads = vmap(pull)(cots)[0]
        return torch.cat([g.reshape(COLUMNS, -1) for g in grads.values()], dim=1).T

    strategies = [
        Strategy("forward + autograd.grad is_grads_batched", is_grads_batched),
        Strategy("forward + vmap(vjp)", by_vjp),
        Strategy("tj.JacobianOperator.T @ U", lambda _: op.T @ U, torchjac=True),
    ]
    return Case(reference.T @ U.double(), strategies, f"{size}: Jᵀ @ U, U [16, {COLUMNS}]")


WORKLOADS = [
    Workload("W8a", "J @ V, 16 columns, on W5's trunk", _build_jv),
    Workload("W8b", "Jᵀ @ U, 16 columns, on W5's trunk", _build_jtu),
]
