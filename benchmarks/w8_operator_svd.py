"""W8 (issue 18): top-10 singular values of a parameter Jacobian too large to store.

MLP 256→896→896→10 Tanh (1,042,954 parameters) over 8,192 samples in 8 batches of 1,024: J is
81,920 × 1,042,954 (342 GB in float32). Every strategy returns the 10 largest singular values
from ``scipy.sparse.linalg.svds(..., k=10)`` on a matrix-free operator (the same start vector,
float64 ARPACK, float32 products), building the operator inside the timed call. Peers:
curvlinops' ``JacobianLinearOperator`` (``check_deterministic=False``, so that it makes no extra
passes), and forming J (``tj.param_jacobian`` per batch, then ``torch.linalg.svdvals``), which
only runs where J fits in a quarter of the free memory (``--small``: MLP 16→32→32→10, 256
samples). Reference: the dense float64 SVD where J fits; at full size svds in float64 (tight
tolerance) on ``JacobianOperator`` of a float64 copy of the model, the only affordable one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import torchjac as tj
from benchmarks._common import as_double, mlp, randn
from benchmarks._harness import Case, Strategy, Workload
from torchjac._engine.core.plan import available_memory

__all__ = ["WORKLOADS"]

K = 10


def _problem(small: bool) -> tuple[nn.Module, list[Tensor], str]:
    sizes = [16, 32, 32, 10] if small else [256, 896, 896, 10]
    n, batch = (256, 64) if small else (8192, 1024)
    model = mlp(sizes, nn.Tanh, seed=80)
    batches = list(randn(n, sizes[0], seed=81).split(batch))
    p = sum(q.numel() for q in model.parameters())
    dense_gb = n * sizes[-1] * p * 4 / 1e9
    size = (
        f"MLP {'→'.join(map(str, sizes))} Tanh, P={p:,}, N={n:,} in batches of {batch}: "
        f"J {n * sizes[-1]:,} × {p:,} ({dense_gb:.3g} GB float32); top-{K} singular values"
    )
    return model, batches, size


def _svds(op: Any, tol: float = 0.0) -> Tensor:
    from scipy.sparse.linalg import svds

    v0 = np.ones(min(op.shape)) / np.sqrt(min(op.shape))  # the same start for every strategy
    values = svds(op, k=K, tol=tol, v0=v0, return_singular_vectors=False)
    return torch.from_numpy(np.sort(values)[::-1].copy())


def _torchjac(model: nn.Module, batches: list[Tensor]) -> Tensor:
    return _svds(tj.JacobianOperator.from_module(model, data=batches).to_scipy())


def _curvlinops(model: nn.Module, batches: list[Tensor]) -> Tensor:
    from curvlinops import JacobianLinearOperator

    data = [(x, x.new_zeros(x.shape[0])) for x in batches]  # curvlinops wants (X, y) pairs
    params = [p for p in model.parameters() if p.requires_grad]
    op = JacobianLinearOperator(model, params, data, check_deterministic=False)
    return _svds(op.to_scipy())


def _dense(model: nn.Module, batches: list[Tensor]) -> Tensor:
    m = sum(x.shape[0] for x in batches) * 10
    p = sum(q.numel() for q in model.parameters())
    need, free = m * p * 4, available_memory(torch.device("cpu"))
    if need > free // 4:
        raise MemoryError(
            f"J needs {need / 1e9:.3g} GB, a quarter of free memory is {free / 4e9:.3g}"
        )
    rows = []
    for x in batches:
        jac = tj.param_jacobian(model, x, batch_dim=0)
        rows.append(torch.cat([j.reshape(x.shape[0] * 10, -1) for j in jac.values()], dim=1))
    return torch.linalg.svdvals(torch.cat(rows))[:K].double()


def _reference(model: nn.Module, batches: list[Tensor]) -> Tensor:
    double, xs = as_double(model), [x.double() for x in batches]
    m = sum(x.shape[0] for x in xs) * 10
    p = sum(q.numel() for q in model.parameters())
    if m * p * 8 <= available_memory(torch.device("cpu")) // 4:
        params = dict(double.named_parameters())
        rows = []
        for x in xs:
            jac = torch.func.jacrev(lambda q, x=x: torch.func.functional_call(double, q, (x,)))(
                {k: v.detach() for k, v in params.items()}
            )
            rows.append(torch.cat([j.reshape(x.shape[0] * 10, -1) for j in jac.values()], 1))
        return torch.linalg.svdvals(torch.cat(rows))[:K]
    return _svds(tj.JacobianOperator.from_module(double, data=xs).to_scipy(), tol=1e-12)


def _build(small: bool) -> Case:
    model, batches, size = _problem(small)
    strategies = [
        Strategy(
            "curvlinops JacobianLinearOperator + svds",
            lambda _: _curvlinops(model, batches),
            requires=("curvlinops", "scipy"),
        ),
        Strategy("form J (tj.param_jacobian), svdvals", lambda _: _dense(model, batches)),
        Strategy(
            "tj.JacobianOperator.from_module + svds",
            lambda _: _torchjac(model, batches),
            requires=("scipy",),
            torchjac=True,
        ),
    ]
    return Case(_reference(model, batches), strategies, size)


WORKLOADS = [
    Workload("W8", "Top-10 singular values of a 1M-parameter Jacobian", _build),
]
