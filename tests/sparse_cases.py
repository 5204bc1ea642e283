"""Functions with sparse Jacobians, each with a point: stencils, bands, blocks, arrows, random
index structure and dense parts. ``exact`` says whether the detected pattern must equal the
Jacobian's nonzeros at a random point (else it must contain them); ``warns`` is the
``FallbackWarning`` the pattern's detection must give (an op without a rule)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPE = torch.float64


@dataclass(frozen=True)
class SparseCase:
    name: str
    func: Callable[[Tensor], Tensor]
    shape: tuple[int, ...]
    exact: bool = True
    warns: str | None = None  # the FallbackWarning expected (sparse_jacobian and the pattern)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def periodic_1d(u: Tensor) -> Tensor:
    return torch.roll(u, 1) - 2 * u + torch.roll(u, -1) + u.sin()


def dirichlet_1d(u: Tensor) -> Tensor:
    p = F.pad(u, (1, 1))
    return 2 * u - p[:-2] - p[2:] + u**3


def bratu_roll(u: Tensor) -> Tensor:
    lap = sum(torch.roll(u, s, d) for s in (1, -1) for d in (0, 1)) - 4 * u
    return -lap - 2.0 * u.exp()


def bratu_slice(u: Tensor) -> Tensor:
    out = torch.zeros_like(u)  # Dirichlet: boundary rows are the identity
    inner = u[:-2, 1:-1] + u[2:, 1:-1] + u[1:-1, :-2] + u[1:-1, 2:] - 4 * u[1:-1, 1:-1]
    out[1:-1, 1:-1] = -inner - u[1:-1, 1:-1].exp()
    out[0], out[-1], out[:, 0], out[:, -1] = u[0], u[-1], u[:, 0], u[:, -1]
    return out


def bratu_conv(u: Tensor) -> Tensor:
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=u.dtype).view(1, 1, 3, 3)
    return -F.conv2d(u[None, None], k, padding=1)[0, 0] - u.exp()


def stencil_3d(u: Tensor) -> Tensor:
    lap = sum(torch.roll(u, s, d) for s in (1, -1) for d in (0, 1, 2)) - 6 * u
    return lap + u.tanh()


def conv3d_stencil(u: Tensor) -> Tensor:
    w = torch.zeros(2, 1, 3, 3, 3, dtype=u.dtype)
    w[0, 0, 1, 1, :] = 1.0
    w[1, 0, :, 1, 1] = torch.tensor([1.0, -2.0, 1.0])
    return F.conv3d(u[None, None], w, padding=1).tanh()


W_CONV = torch.randn(3, 2, 3, 2, generator=_g(5), dtype=DTYPE)
W_CONV[1, 0] = 0.0  # zero weights join nothing
A_BAND = torch.randn(9, 9, generator=_g(1), dtype=DTYPE)
BLOCKS = torch.randn(4, 3, 3, generator=_g(2), dtype=DTYPE)
W_DENSE = torch.randn(2, 4, generator=_g(4), dtype=DTYPE)
_G = _g(3)
IDX = [torch.randint(0, 10, (20,), generator=_G), torch.randint(0, 10, (20,), generator=_G)]
IDX.append(torch.randint(0, 13, (20,), generator=_G))
PERM = torch.randperm(13, generator=_G)


def conv2d_strided(u: Tensor) -> Tensor:
    w = W_CONV
    return F.conv2d(u, w, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=1).sigmoid()


def banded(u: Tensor) -> Tensor:
    n = u.numel()
    a = A_BAND
    band = (torch.arange(n).view(-1, 1) - torch.arange(n).view(1, -1)).abs() <= 2
    return torch.tanh((a * band) @ u) * u


def block_diagonal(u: Tensor) -> Tensor:
    return torch.einsum("bij,bj->bi", BLOCKS, u.view(4, 3).cos()).reshape(-1)


def arrow(u: Tensor) -> Tensor:
    rest = u[1:] ** 2 + u[0]
    return torch.cat([u.sum().view(1), rest])


def random_index(u: Tensor) -> Tensor:
    picked = u.index_select(0, IDX[0]) * u.gather(0, IDX[1])
    out = torch.zeros(13, dtype=u.dtype).scatter_add(0, IDX[2], picked)
    out = out.index_put((torch.tensor([0, 2]),), u[:2].exp())
    return out[PERM]


def dense_part(u: Tensor) -> Tensor:
    head = torch.tanh(torch.nn.functional.linear(u[:4], W_DENSE))  # a dense 2 x 4 block
    return torch.cat([head, u[4:] * u[3:-1], u.softmax(0)[:2]])


def sparse_matrix(u: Tensor) -> Tensor:
    i = torch.tensor([[0, 1, 3, 3], [2, 0, 1, 3]])
    v = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=u.dtype)
    a = torch.sparse_coo_tensor(i, v, (4, 4), check_invariants=True)
    return torch.sparse.mm(a, u.view(4, 1)).view(-1) + u


def reductions(u: Tensor) -> Tensor:
    return torch.cat([u.sum(1), u.mean(0), u.amax(1), u.cumsum(1).reshape(-1), u.norm(dim=0)])


def masks_and_where(u: Tensor) -> Tensor:
    v = torch.where(u > 0, u, 0.1 * u).clone()
    v[u.abs() > 1.5] = 0.0  # a data-dependent mask writing constants
    return F.relu(v) + v.flip(0)


def data_dependent_index(u: Tensor) -> Tensor:
    return u[u.argmax().view(1)] * u  # the element read depends on x: a superset is needed


def tail_and_head(u: Tensor) -> Tensor:  # transposes, views and in-place ops on views
    v = u.t().contiguous()
    v.mul_(2.0)
    v[0].add_(v[-1])
    return v.T.reshape(-1)[1:]


W_GROUPS = torch.randn(4, 2, 3, generator=_g(6), dtype=DTYPE)


def conv1d_groups(u: Tensor) -> Tensor:
    return F.conv1d(u, W_GROUPS, groups=2, padding=2).tanh()


def movement_zoo(u: Tensor) -> Tensor:  # u [1, 1, 4, 5]
    parts = [
        F.interpolate(u, scale_factor=2, mode="nearest"),
        F.unfold(u, 2),
        F.pad(u, (2, 2, 1, 1), mode="reflect"),
        F.pad(u, (1, 2, 1, 0), mode="replicate"),
        F.pad(u, (2, 2, 1, 1), mode="circular"),
        torch.rot90(u, 1, (2, 3)),
        u.expand(3, 1, 4, 5) * torch.arange(3.0, dtype=u.dtype).view(3, 1, 1, 1),
    ]
    return torch.cat([p.reshape(-1) for p in parts])


def float32_inside(u: Tensor) -> Tensor:
    return (u.float().sin() * torch.roll(u, 1).float()).double() + u.sum(0, dtype=torch.float32)


def pools_and_norms(u: Tensor) -> Tensor:  # u [1, 1, 4, 6]
    parts = [
        F.max_pool2d(u, 3, stride=2, padding=1),
        F.avg_pool2d(u, 2, stride=1, ceil_mode=True),
        F.max_pool1d(u[0], 2),
        F.layer_norm(u, (6,), torch.linspace(0.5, 1.0, 6, dtype=u.dtype)),
        F.layer_norm(u[0], (4, 6)),
    ]
    return torch.cat([p.reshape(-1) for p in parts])


BN = torch.nn.BatchNorm1d(3, dtype=DTYPE)  # train mode: each channel over the whole batch


def batch_norm_train(u: Tensor) -> Tensor:
    return BN(u) * u.roll(1, 1)


class StraightThrough(torch.autograd.Function):
    """A step whose derivative is the identity's (a straight-through estimator): its forward's
    ops are constant, its backward and jvp are not (NOTE [custom functions in sparsity])."""

    @staticmethod
    def forward(ctx, u):  # type: ignore[no-untyped-def]
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g

    @staticmethod
    def jvp(ctx, t):  # type: ignore[no-untyped-def]
        return t


class Reversed(torch.autograd.Function):
    """``torch.func`` style (``setup_context``, a generated vmap rule): zeros forward, and a
    derivative that reverses its input."""

    generate_vmap_rule = True

    @staticmethod
    def forward(u):  # type: ignore[no-untyped-def]
        return torch.zeros_like(u)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        pass

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g.flip(-1)

    @staticmethod
    def jvp(ctx, t):  # type: ignore[no-untyped-def]
        return t.flip(-1)


def straight_through(u: Tensor) -> Tensor:
    """On a slice, and viewed before any other op reads it."""
    return torch.cat([StraightThrough.apply(u[:3]) * 2, u[3:] ** 2, StraightThrough.apply(u)[1:3]])


def reversed_rows(u: Tensor) -> Tensor:
    return torch.func.vmap(Reversed.apply)(u) + u


def checkpointed(u: Tensor) -> Tensor:
    """torch's checkpointing computes the forward's derivative: no density."""
    return torch.utils.checkpoint.checkpoint(dirichlet_1d, u, use_reentrant=False)


HOOKED = torch.nn.Linear(5, 5, dtype=DTYPE)
HOOKED.register_full_backward_hook(lambda m, gi, go: None)  # the identity Function of torch


def full_backward_hook(u: Tensor) -> Tensor:
    return HOOKED(u.roll(1, -1)) * u


CASES = [
    SparseCase("periodic_1d", periodic_1d, (7,)),
    SparseCase("dirichlet_1d", dirichlet_1d, (6,)),
    SparseCase("bratu_roll", bratu_roll, (5, 6)),
    SparseCase("bratu_slice", bratu_slice, (5, 6)),
    SparseCase("bratu_conv", bratu_conv, (5, 6)),
    SparseCase("stencil_3d", stencil_3d, (3, 4, 5)),
    SparseCase("conv3d_stencil", conv3d_stencil, (3, 4, 4)),
    SparseCase("conv2d_strided", conv2d_strided, (2, 2, 7, 6)),
    SparseCase("banded", banded, (9,)),
    SparseCase("block_diagonal", block_diagonal, (12,)),
    SparseCase("arrow", arrow, (6,)),
    SparseCase("random_index", random_index, (10,), exact=False),
    SparseCase("dense_part", dense_part, (9,), exact=False),
    SparseCase("sparse_matrix", sparse_matrix, (4,)),
    SparseCase("reductions", reductions, (3, 4), exact=False),
    SparseCase("masks_and_where", masks_and_where, (8,), exact=False),
    SparseCase("data_dependent_index", data_dependent_index, (5,), exact=False),
    SparseCase("tail_and_head", tail_and_head, (3, 4)),
    SparseCase("conv1d_groups", conv1d_groups, (2, 4, 7)),
    SparseCase("movement_zoo", movement_zoo, (1, 1, 4, 5), exact=False),  # times 0
    SparseCase("float32_inside", float32_inside, (5,)),
    SparseCase("pools_and_norms", pools_and_norms, (1, 1, 4, 6), exact=False),  # max: one
    SparseCase("batch_norm_train", batch_norm_train, (4, 3), exact=False),
    SparseCase("size_one", lambda u: (u * 3).exp(), (1,)),
    SparseCase("one_by_one", lambda u: torch.roll(u, 1, 0) * u, (1, 1)),
    SparseCase("scalar_output", lambda u: (u**2).sum(), (4,)),
    SparseCase("straight_through", straight_through, (6,), exact=False, warns="StraightThrough"),
    SparseCase("reversed_rows", reversed_rows, (2, 3), exact=False, warns="Reversed"),
    SparseCase("checkpointed", checkpointed, (6,)),
    SparseCase("full_backward_hook", full_backward_hook, (3, 5)),
]
