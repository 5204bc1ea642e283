"""One function per family of aten ops the sparsity tracer meets: no nonzero is ever missed,
ops without a rule are reported, and ``sparse_jacobian`` equals the dense Jacobian."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.functional import jacobian

import torchjac as tj

D = torch.float64
_G = torch.Generator().manual_seed(7)
W = torch.randn(4, 6, generator=_G, dtype=D)
WB = torch.randn(3, 5, 5, generator=_G, dtype=D)
IDX = torch.tensor([3, 0, 0, 5, 2])


def _write_through_view(x: Tensor) -> Tensor:
    y = x.clone() ** 2
    y.view(-1)[IDX[:2]] = x[:2] * 3
    return y


BN_EVAL = torch.nn.BatchNorm1d(3, dtype=D).eval()
GN = torch.nn.GroupNorm(2, 4, dtype=D)

Op = tuple[tuple[int, ...], Callable[[Tensor], Tensor], str | None]
OPS: dict[str, Op] = {
    "unfold": ((1, 2, 4, 4), lambda x: F.unfold(x, 2).sin(), None),
    "expand_repeat_tile": ((3, 1), lambda x: x.expand(3, 4) * x.repeat(1, 4) + x.tile(1, 4), None),
    "masked_fill": ((6,), lambda x: x.masked_fill(x > 0, 0.0) * x.roll(1), None),
    "index_put_accumulate": (
        (6,),
        lambda x: torch.zeros(4, dtype=D).index_put((IDX[[0, 1, 1, 3, 4, 2]] % 4,), x, True),
        None,
    ),
    "bmm_broadcast": ((3, 5), lambda x: (WB @ x.unsqueeze(-1)).squeeze(-1), None),
    "matmul_batched": ((2, 3, 6), lambda x: x @ W.T, None),
    "einsum": ((3, 4), lambda x: torch.einsum("ij,kj->ik", x, x), None),
    "norms_and_extrema": (
        (3, 4),
        lambda x: torch.cat([x.norm(dim=1), x.max(0).values, x.amin(1), x.logsumexp(1)]),
        None,
    ),
    "diff_rot90_kron": (
        (3, 4),
        lambda x: torch.cat(
            [x.diff(dim=1).flatten(), x.rot90().flatten(), torch.kron(x, W[:2, :2]).flatten()]
        ),
        None,
    ),
    "write_through_view": ((6,), _write_through_view, None),
    "scatter_reduce": (
        (5,),
        lambda x: torch.zeros(3, dtype=D).scatter_reduce(0, IDX % 3, x, "amax", include_self=False),
        None,
    ),
    "take_along_argsort": ((3, 4), lambda x: x.take_along_dim(x.argsort(1), 1), None),
    "chunk_narrow": ((8,), lambda x: torch.cat([c * i for i, c in enumerate(x.chunk(3))]), None),
    "stack_unbind": ((3, 2), lambda x: torch.stack([a * b for a, b in zip(x, x.roll(1, 0))]), None),
    "embedding": ((5, 3), lambda x: F.embedding(torch.tensor([[1, 4], [0, 0]]), x), None),
    "var_std_prod": ((3, 4), lambda x: torch.cat([x.var(1), x.std(0), x.prod(1)]), None),
    "index_copy_slice_scatter": (
        (2, 3),
        lambda x: (
            torch.zeros(4, 3, dtype=D)
            .index_copy(0, IDX[[0, 4]] % 4, x)
            .slice_scatter(x[:1], 0, 1, 2)
        ),
        None,
    ),
    "mv_dot": ((4,), lambda x: torch.cat([W @ torch.cat([x, x[:2]]), (x @ x).view(1)]), None),
    "where_clamp_relu": ((5,), lambda x: torch.where(x > 0, x.clamp(max=1), F.relu(-x)), None),
    "batch_norm_train": ((2, 3, 2), lambda x: F.batch_norm(x, None, None, training=True), None),
    "batch_norm_eval": ((4, 3), lambda x: BN_EVAL(x) * x.roll(1, 0), None),
    "group_norm": ((2, 4, 3), lambda x: GN(x) + F.group_norm(x, 4), None),
    "fold": ((1, 8, 9), lambda x: F.fold(x, (4, 4), 2), "col2im"),
    "bilinear": (
        (1, 1, 3, 4),
        lambda x: F.interpolate(x, scale_factor=2, mode="bilinear"),
        "upsample",
    ),
    "fft": ((4,), lambda x: torch.fft.fft(x).real, "fft"),
    "conv_transpose": (
        (1, 2, 4),
        lambda x: F.conv_transpose1d(x, W[:2, :3].unsqueeze(1)),
        "convolution",
    ),
    "cdist": ((3, 2), lambda x: torch.cdist(x, x).flatten(), "cdist"),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_families(name: str) -> None:
    shape, func, warns = OPS[name]
    gen = torch.Generator().manual_seed(len(name))
    x = torch.randn(shape, generator=gen, dtype=D)
    with pytest.warns(tj.FallbackWarning, match=warns) if warns else contextlib.nullcontext():
        pattern = tj.sparsity_pattern(func, x).to_dense()
    for point in (x, torch.randn(shape, generator=gen, dtype=D)):
        dense = jacobian(func, point).reshape(pattern.shape)
        assert not ((dense != 0) & ~pattern).any()
    with pytest.warns(tj.FallbackWarning) if warns else contextlib.nullcontext():
        J = tj.sparse_jacobian(func, x)
    torch.testing.assert_close(J.to_dense(), jacobian(func, x).reshape(pattern.shape))
