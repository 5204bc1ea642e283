"""Shared by the ``tj.param_jacobian`` tests: build a registry case, compare dicts of Jacobians."""

from __future__ import annotations

import torch
from registry import ModelCase
from torch import Tensor, nn


def _built(case: ModelCase) -> tuple[nn.Module, tuple, dict]:
    return case.build(torch.Generator().manual_seed(0))


def _assert_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
