"""W9 and W9b (issue 20): the sparse Jacobian of a 2-D Bratu residual, dense and sparse.

``F(u) = -Δ_h u - λ e^u`` on an N×N grid with zero Dirichlet boundary (h = 1/(N+1), λ = 6),
float64, written two ways users write it: padding and slicing, and ``F.conv2d`` with the
five-point kernel. Its Jacobian is ``-Δ_h - λ diag(e^u)``: five nonzeros a row.

W9 (N = 64, 4,096 unknowns): ``tj.sparse_jacobian`` with detection, colouring and probes all
timed, and with a cached pattern (the Newton-loop call), against dense ``jacfwd`` and
``jacrev`` (4,096 probes and a 4,096² matrix each). W9b (N = 512, 262,144 unknowns, where the
dense Jacobian would take 550 GB in float64): the sparse calls alone; run with ``--memory`` for
their peak memory. Every strategy returns the Jacobian's values at the five-point pattern in CSR
order (the dense ones gather them from their matrix, a cost too small to matter); the reference
is the closed form. The dense calls' time is mostly the kernel's page faults on fresh memory
(about 0.5 million a call, glibc returning each freed block of over 32 MiB): with
``MALLOC_MMAP_THRESHOLD_`` set high, ``jacfwd`` measured 215 ms here against 1.3 s by default,
while the sparse calls moved by less than noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import jacfwd, jacrev

import torchjac as tj
from benchmarks._common import fork_rng
from benchmarks._harness import Case, Strategy, Workload

__all__ = ["WORKLOADS", "bratu_conv", "bratu_slicing", "closed_form"]

LAMBDA = 6.0


def bratu_slicing(u: Tensor) -> Tensor:
    h2 = 1.0 / (u.shape[0] + 1) ** 2
    p = F.pad(u, (1, 1, 1, 1))
    lap = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u) / h2
    return -lap - LAMBDA * torch.exp(u)


def bratu_conv(u: Tensor) -> Tensor:
    h2 = 1.0 / (u.shape[0] + 1) ** 2
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=u.dtype).view(1, 1, 3, 3)
    lap = F.conv2d(u[None, None], k / h2, padding=1)[0, 0]
    return -lap - LAMBDA * torch.exp(u)


def closed_form(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, cols, values)`` of the Jacobian, sorted by row then column (CSR order)."""
    n_side = u.shape[0]
    h2 = 1.0 / (n_side + 1) ** 2
    i, j = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    rows, cols, vals = [i * n_side + j], [i * n_side + j], [4 / h2 - LAMBDA * u.reshape(-1).exp()]
    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        ok = (i + di >= 0) & (i + di < n_side) & (j + dj >= 0) & (j + dj < n_side)
        rows.append((i * n_side + j)[ok])
        cols.append(((i + di) * n_side + j + dj)[ok])
        vals.append(torch.full((int(ok.sum()),), -1 / h2, dtype=u.dtype))
    r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    order = torch.argsort(r * n_side**2 + c)
    return r[order], c[order], v[order]


def _point(n_side: int) -> Tensor:
    with fork_rng(90):
        return 0.1 * torch.rand(n_side, n_side, dtype=torch.float64)


def _values(J: Tensor) -> Tensor:
    return J.values()


def _build(small: bool, large: bool) -> Case:
    n_side = (16 if large else 8) if small else (512 if large else 64)
    u = _point(n_side)
    rows, cols, reference = closed_form(u)
    cached = tj.sparsity_pattern(bratu_slicing, u)
    tj.sparse_jacobian(bratu_slicing, u, pattern=cached)  # colours it once (a Newton loop's)
    m = n_side * n_side
    strategies = []
    if not large:

        def dense(jac: object, f: object) -> Tensor:
            return jac(f)(u).reshape(m, m)[rows, cols]  # type: ignore[operator]

        strategies += [
            Strategy("torch.func jacfwd (dense)", lambda _: dense(jacfwd, bratu_slicing)),
            Strategy("torch.func jacrev (dense)", lambda _: dense(jacrev, bratu_slicing)),
        ]
    strategies += [
        Strategy(
            "tj.sparse_jacobian, slicing (detect + colour + probes)",
            lambda _: _values(tj.sparse_jacobian(bratu_slicing, u)),
            torchjac=True,
        ),
        Strategy(
            "tj.sparse_jacobian, conv2d (detect + colour + probes)",
            lambda _: _values(tj.sparse_jacobian(bratu_conv, u)),
            torchjac=True,
        ),
        Strategy(
            "tj.sparse_jacobian, cached pattern (probes only)",
            lambda _: _values(tj.sparse_jacobian(bratu_slicing, u, pattern=cached)),
            torchjac=True,
        ),
    ]
    size = f"N={n_side}: {m:,} unknowns, J [{m:,}, {m:,}] with {reference.numel():,} nonzeros"
    if not large:
        size += "; dense times are mostly page faults (see the module's docstring)"
    return Case(reference, strategies, size, rtol=1e-10)


WORKLOADS = [
    Workload("W9", "sparse Jacobian of a Bratu residual, N=64", lambda s: _build(s, False)),
    Workload("W9b", "sparse Jacobian of a Bratu residual, N=512", lambda s: _build(s, True)),
]
