"""Newton's method on the 2-D Bratu problem with ``tj.sparse_jacobian`` and a sparse solve.

Solve ``-Δu = λ e^u`` on the unit square with ``u = 0`` on the boundary (λ = 6, below the fold
at λ ≈ 6.81), on an N×N grid of interior points with the five-point Laplacian. Each Newton step
solves ``J δ = -F(u)`` with ``J`` from ``tj.sparse_jacobian`` (detected once, its pattern and
colouring reused by every step) and ``scipy.sparse.linalg.spsolve`` on the CSR converted to
SciPy. The same iteration with the dense Jacobian (``tj.jacobian``) and ``torch.linalg.solve``
runs beside it at a size where the dense matrix fits; both must take the same steps.

Run: ``python examples/newton_bratu.py [--n 32]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import spsolve

import torchjac as tj

LAMBDA = 6.0


def residual(u: torch.Tensor) -> torch.Tensor:
    """``F(u) = -Δ_h u - λ e^u`` with zero Dirichlet boundary, padding and slicing."""
    h2 = 1.0 / (u.shape[0] + 1) ** 2
    p = F.pad(u, (1, 1, 1, 1))
    lap = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u) / h2
    return -lap - LAMBDA * torch.exp(u)


def to_scipy(J: torch.Tensor) -> scipy.sparse.csr_matrix:
    crow, col, val = (t.numpy() for t in (J.crow_indices(), J.col_indices(), J.values()))
    return scipy.sparse.csr_matrix((val, col, crow), shape=tuple(J.shape))


def newton(n: int, sparse: bool, tol: float = 1e-10) -> tuple[torch.Tensor, list[float], float]:
    """Newton from ``u = 0``: the solution, the residual norms, the seconds spent."""
    u = torch.zeros(n, n, dtype=torch.float64)
    pattern = tj.sparsity_pattern(residual, u) if sparse else None
    norms = [float(residual(u).norm())]
    start = time.perf_counter()
    while norms[-1] > tol * max(1.0, norms[0]) and len(norms) < 20:
        r = residual(u).reshape(-1)
        if sparse:
            J = tj.sparse_jacobian(residual, u, pattern=pattern)
            delta = torch.from_numpy(spsolve(to_scipy(J).tocsc(), -r.numpy()))
        else:
            J = tj.jacobian(residual, u).reshape(n * n, n * n)
            delta = torch.linalg.solve(J, -r)
        u = u + delta.reshape(n, n)
        norms.append(float(residual(u).norm()))
    return u, norms, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="interior points per side")
    n = parser.parse_args().n

    u_sparse, sparse_norms, sparse_s = newton(n, sparse=True)
    u_dense, dense_norms, dense_s = newton(n, sparse=False)
    for k, (a, b) in enumerate(zip(sparse_norms, dense_norms)):
        print(f"iteration {k}: |F(u)| sparse {a:.3e}  dense {b:.3e}")
    steps = len(sparse_norms) - 1
    print(
        f"N={n} ({n * n} unknowns): Newton iterations: sparse {steps}, dense {len(dense_norms) - 1}"
    )
    print(f"time: sparse {sparse_s:.3f} s, dense {dense_s:.3f} s")
    diff = float((u_sparse - u_dense).abs().max())
    print(f"max |u_sparse - u_dense| {diff:.1e}, max u {float(u_sparse.max()):.4f}")
    assert steps == len(dense_norms) - 1 and steps <= 8, (sparse_norms, dense_norms)
    assert diff < 1e-10 and np.isfinite(float(u_sparse.max()))
    print("ok")


if __name__ == "__main__":
    main()
