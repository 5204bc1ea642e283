"""Second-order fallbacks to nested AD (one FallbackWarning each) and second-order errors."""

from __future__ import annotations

import pytest
import torch
from conftest import randn
from test_functional import MODES, Cube, OldCube, Straight, _one_fallback

import torchjac as tj


def test_custom_function_taylor_check_takes_nested_ad(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)

    with pytest.warns(tj.FallbackWarning, match="Taylor") as record:
        got = tj.hessian_diagonal(lambda x: Straight.apply(x).sum(-1), x, batch_dim=0)
    _one_fallback(record)
    torch.testing.assert_close(got, torch.full_like(x, 2.0))


def test_missing_forward_ad_uses_reverse_over_reverse(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    with pytest.warns(tj.FallbackWarning) as record:
        got = tj.hessian_diagonal(lambda x: Cube.apply(x).sum(-1), x, batch_dim=0, mode="fwd")
    _one_fallback(record)
    torch.testing.assert_close(got, 6 * x)


def test_second_order_errors(gen: torch.Generator) -> None:
    x = randn(6, 3, gen=gen)
    with pytest.raises(tj.BatchCouplingError, match="batch_dim=0"):
        tj.laplacian(lambda x: ((x - x.mean(0)) ** 2).sum(-1), x, batch_dim=0)
    bn = torch.nn.BatchNorm1d(3).double().train()
    with pytest.raises(tj.BatchCouplingError, match="BatchNorm"):
        tj.hessian_diagonal(bn, x, batch_dim=0)
    for mode in MODES:  # torch.func needs setup_context: autograd.grad on the graph instead
        with pytest.warns(tj.FallbackWarning, match="setup_context"):
            got = tj.hessian(lambda x: OldCube.apply(x).sum(), x[0], mode=mode)
        torch.testing.assert_close(got, torch.diag(6 * x[0]))
    with pytest.raises(TypeError, match="func must return a Tensor"):
        tj.laplacian(lambda x: 1.0, x)
    with pytest.raises(ValueError, match="out of range"):
        tj.hessian(lambda x: x.sum(), x, batch_dim=0)
