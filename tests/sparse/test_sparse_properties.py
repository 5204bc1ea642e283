"""Properties of ``sparsity_pattern`` and ``sparse_jacobian`` on random chains of grid ops:
the pattern holds every nonzero, forward and reverse agree with the dense Jacobian."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.functional import jacobian

import torchjac as tj

DTYPE = torch.float64

OPS = {
    "roll": lambda u, k: torch.roll(u, k % 3 - 1, k % u.dim()),
    "shift": lambda u, k: F.pad(u, (1, 1))[..., : u.shape[-1]] if k % 2 else u.flip(-1),
    "mix": lambda u, k: u * torch.roll(u, 1, -1) + (k % 3) * u.sin(),
    "cumsum": lambda u, k: u.cumsum(k % u.dim()) * 0.1,
    "reduce": lambda u, k: u - u.mean(k % u.dim(), keepdim=True),
    "gather": lambda u, k: u.reshape(-1)[torch.arange(u.numel()).flip(0) % max(k, 1)].view(u.shape),
    "write": lambda u, k: torch.zeros_like(u).index_put((torch.tensor([0]),), u[k % u.shape[0]]),
    "conv": lambda u, k: F.conv1d(
        u.reshape(1, 1, -1), torch.ones(1, 1, 3, dtype=u.dtype) * k, padding=1
    ).view(u.shape),
}


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    chain=st.lists(st.tuples(st.sampled_from(sorted(OPS)), st.integers(0, 4)), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_random_chains(shape: tuple[int, ...], chain: list[tuple[str, int]], seed: int) -> None:
    def func(u: torch.Tensor) -> torch.Tensor:
        for name, k in chain:
            u = OPS[name](u, k)
        return u.tanh()

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    pattern = tj.sparsity_pattern(func, x).to_dense()
    dense = jacobian(func, x).reshape(pattern.shape)
    assert not ((dense != 0) & ~pattern).any()
    for mode in ("fwd", "rev"):
        J = tj.sparse_jacobian(func, x, mode=mode)
        torch.testing.assert_close(J.to_dense(), dense, rtol=1e-12, atol=1e-12)
