"""``tj.sparse_jacobian(..., batch_dim=b)``: per-sample blocks, equal to ``tj.jacobian``'s."""

from __future__ import annotations

import pytest
import torch

import torchjac as tj

DTYPE = torch.float64


def stencil_and_head(x: torch.Tensor) -> torch.Tensor:
    """Per sample (rows of ``x``): a periodic stencil and a dense head."""
    return torch.cat([torch.roll(x, 1, 1) * x - x.sin(), x[:, :2].sum(1, keepdim=True)], 1)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_blocks_equal_the_per_sample_jacobian(batch: int, mode: str) -> None:
    x = torch.randn(batch, 5, dtype=DTYPE)
    J = tj.sparse_jacobian(stencil_and_head, x, batch_dim=0, mode=mode)
    assert J.layout == torch.sparse_csr and J.shape == (batch, 6, 5)
    want = tj.jacobian(stencil_and_head, x, batch_dim=0)
    torch.testing.assert_close(J.to_dense(), want, rtol=1e-12, atol=1e-12)


def test_a_batch_dimension_in_the_middle_and_a_reused_pattern() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:  # x [N, B, C]: batch at dim 1
        return (torch.roll(x, 1, 0) * x).tanh() + x.flip(2)

    x = torch.randn(6, 3, 2, dtype=DTYPE)
    P = tj.sparsity_pattern(f, x)
    for _ in range(2):
        x = x + 0.5
        J = tj.sparse_jacobian(f, x, pattern=P, batch_dim=1)
        torch.testing.assert_close(J.to_dense(), tj.jacobian(f, x, batch_dim=1).reshape(3, 12, 12))


def test_coupled_samples_raise() -> None:
    x = torch.randn(3, 4, dtype=DTYPE)
    with pytest.raises(tj.BatchCouplingError, match="output sample 0 depends on input sample 1"):
        tj.sparse_jacobian(lambda u: u - u.mean(0), x, batch_dim=0)


@pytest.mark.parametrize(
    ("func", "batch_dim", "error", "match"),
    [
        (torch.sin, 2, ValueError, "`batch_dim=2` is out of range for x"),
        (torch.sin, True, TypeError, "`batch_dim` must be an int or None"),
        (lambda u: u[:2], 0, ValueError, "mismatched batch sizes"),
    ],
)
def test_bad_batch_dims(func, batch_dim, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        tj.sparse_jacobian(func, torch.randn(3, 4, dtype=DTYPE), batch_dim=batch_dim)
