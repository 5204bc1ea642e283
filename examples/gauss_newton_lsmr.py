"""A damped Gauss-Newton (Levenberg-Marquardt) fit of a nonlinear model, with ``lsmr`` on
``tj.JacobianOperator`` instead of a formed Jacobian.

Model: ``y(t) = a exp(-b t) + c sin(w t)`` with parameters ``θ = (a, b, c, w)``, fitted to 2,000
noisy samples. Each step solves ``min_δ ||J δ + r||² + λ ||δ||²`` (``J`` the Jacobian of the
residuals ``r(θ)``) with ``scipy.sparse.linalg.lsmr(J.to_scipy(), -r, damp=sqrt(λ))``: lsmr only
asks for ``J v`` and ``Jᵀ u``. The first step is checked against the same step from the dense
normal equations ``(JᵀJ + λI) δ = -Jᵀ r``.

Run: ``python examples/gauss_newton_lsmr.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import lsmr

import torchjac as tj

TRUE = torch.tensor([2.0, 0.7, 0.5, 3.0], dtype=torch.float64)


def curve(theta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, b, c, w = theta
    return a * torch.exp(-b * t) + c * torch.sin(w * t)


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 5, 2000, dtype=torch.float64)
    y = curve(TRUE, t) + 0.01 * torch.randn(t.shape, generator=gen, dtype=torch.float64)

    def residuals(theta: torch.Tensor) -> torch.Tensor:
        return curve(theta, t) - y

    theta = torch.tensor([1.5, 0.5, 0.8, 2.9], dtype=torch.float64)
    damping = 1e-2
    loss = float((residuals(theta) ** 2).sum())
    print(f"step 0: loss {loss:.6f}  theta {theta.numpy().round(4)}")
    for step in range(1, 9):
        J = tj.JacobianOperator(residuals, theta)
        r = residuals(theta).numpy()
        delta = lsmr(J.to_scipy(), -r, damp=damping**0.5, atol=1e-12, btol=1e-12)[0]
        if step == 1:  # the same step from the dense normal equations
            dense = J.to_dense().numpy()
            normal = np.linalg.solve(dense.T @ dense + damping * np.eye(4), -dense.T @ r)
            agree = float(np.max(np.abs(delta - normal)))
            print(f"first step: lsmr vs dense normal equations, max difference {agree:.1e}")
            assert agree < 1e-8, agree
        trial = theta + torch.from_numpy(delta)
        trial_loss = float((residuals(trial) ** 2).sum())
        if trial_loss < loss:  # accept, trust the model more
            theta, loss, damping = trial, trial_loss, damping / 3
        else:  # reject, damp more
            damping *= 4
        print(f"step {step}: loss {loss:.6f}  theta {theta.numpy().round(4)}")
    error = float((theta - TRUE).abs().max())
    print(f"fitted {theta.numpy().round(4)}, true {TRUE.numpy()}, max error {error:.1e}")
    assert error < 1e-2, error
    print("ok")


if __name__ == "__main__":
    main()
