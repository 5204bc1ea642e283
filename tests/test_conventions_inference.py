"""Inference mode works like no_grad, and inference tensors are accepted as inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conventions_cases import ALL, FUNCTIONAL, _net, _poly, _tensors

import torchjac as tj


def _inference_call(name: str) -> Any:
    x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
    if name in ("jac", "gramian"):
        xr = x.clone().requires_grad_(True)
        y = _poly(xr)
        with torch.inference_mode():
            return getattr(tj, name)(y, xr, batch_dim=0)
    with torch.inference_mode():
        if name in FUNCTIONAL:
            return getattr(tj, name)(_poly, x, batch_dim=0)
        return getattr(tj, name)(_net(), x, batch_dim=0)


_NTK_INFERENCE = (
    "BUG: ntk under torch.inference_mode() raises RuntimeError ('element 0 of tensors does not "
    "require grad') although it works under no_grad and param_jacobian works in inference mode"
)


@pytest.mark.parametrize("name", ALL)
def test_works_under_inference_mode(name: str) -> None:
    got = _inference_call(name)
    with torch.no_grad():
        if name in ("jac", "gramian"):
            x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3).requires_grad_()
            with torch.enable_grad():
                y = _poly(x)
            want = getattr(tj, name)(y, x, batch_dim=0)
        elif name in FUNCTIONAL:
            want = getattr(tj, name)(
                _poly, torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3), batch_dim=0
            )
        else:
            x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
            want = getattr(tj, name)(_net(), x, batch_dim=0)
    for a, b in zip(_tensors(got), _tensors(want)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("name", "mode"),
    [pytest.param(n, m, id=f"{n}-{m}") for n in FUNCTIONAL for m in ("auto", "rev", "fwd")],
)
def test_inference_tensor_inputs(name: str, mode: str) -> None:
    with torch.inference_mode():
        x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
    got = getattr(tj, name)(torch.sin, x, batch_dim=0, mode=mode)
    s, c = x.clone().sin(), x.clone().cos()
    eye = torch.eye(3, dtype=x.dtype)
    want = {
        "jacobian": c[:, :, None] * eye,
        "hessian": -s[:, :, None, None] * eye[:, :, None] * eye[:, None, :],
        "hessian_diagonal": -s[:, :, None] * eye,
        "laplacian": -s,
    }[name]
    torch.testing.assert_close(got, want)
