"""Top-10 singular values of an MLP's parameter Jacobian over 4,096 samples, without forming J.

``tj.JacobianOperator.from_module(model, data=batches)`` is the Jacobian of every output of every
sample (rows, stacked over the batches in order) with respect to every parameter
(columns). ``scipy.sparse.linalg.svds`` only asks for products ``J v`` and ``Jᵀ u``, so J is
never stored. Here J is small enough to form as well, so the script checks the singular values
against the dense SVD of J (computed in float64 from ``tj.param_jacobian``).

Run: ``python examples/jacobian_operator_svd.py``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.sparse.linalg import svds
from torch import nn

import torchjac as tj


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
    )
    x = torch.randn(4096, 8)
    batches = list(x.split(1024))  # any re-iterable of batches: a list, a DataLoader(shuffle=False)

    start = time.perf_counter()
    J = tj.JacobianOperator.from_module(model, data=batches)
    top = np.sort(svds(J.to_scipy(), k=10, return_singular_vectors=False))[::-1]
    seconds = time.perf_counter() - start
    m, n = J.shape
    print(f"J: {m} rows (4096 samples x 3 outputs) x {n} parameters, never formed")
    print("top-10 singular values (svds on J.to_scipy()):", np.array2string(top, precision=4))

    # The check: J formed densely in float64, where it fits (m x n x 8 bytes).
    double = model.double()
    dense = torch.cat(
        [j.reshape(m, -1) for j in tj.param_jacobian(double, x.double(), batch_dim=0).values()],
        dim=1,
    )
    exact = torch.linalg.svdvals(dense)[:10].numpy()
    rel = float(np.max(np.abs(top - exact) / exact))
    print("top-10 singular values (dense float64 SVD):  ", np.array2string(exact, precision=4))
    print(f"max relative difference: {rel:.1e} (svds took {seconds:.2f} s)")
    assert rel < 1e-4, rel
    print("ok")


if __name__ == "__main__":
    main()
