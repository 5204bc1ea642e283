"""The dtype and device of every front door's result follow the inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conventions_cases import ALL, FUNCTIONAL, _net, _poly, _tensors

import torchjac as tj


def _call(name: str, dtype: torch.dtype, batch: int = 3, **options: Any) -> Any:
    """One small valid call of public function ``name`` on inputs of ``dtype``."""
    x = torch.linspace(-1.0, 1.0, batch * 3, dtype=dtype).reshape(batch, 3)
    if name in ("jac", "gramian"):
        xr = x.clone().requires_grad_(True)
        return getattr(tj, name)(_poly(xr), xr, **options)
    if name in FUNCTIONAL:
        return getattr(tj, name)(_poly, x, **options)
    return getattr(tj, name)(_net(dtype), x, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch_dim", [None, 0], ids=["full", "batch"])
@pytest.mark.parametrize("name", ALL)
def test_dtype_and_device_follow_inputs(name: str, dtype: torch.dtype, batch_dim: Any) -> None:
    options = {"batch_dim": batch_dim} if batch_dim is not None or name != "ntk" else {}
    result = _call(name, dtype, **options)
    tensors = _tensors(result)
    assert tensors
    for t in tensors:
        assert t.dtype == dtype, (name, t.dtype)
        assert t.device == torch.device("cpu")
        assert not t.requires_grad  # create_graph=False: a plain result
