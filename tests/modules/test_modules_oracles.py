"""``tj.param_jacobian`` against float64 oracles across the model registry, chunked or not."""

from __future__ import annotations

import pytest
import torch
from param_jacobian_checks import _assert_close, _built
from registry import (
    CASES,
    DTYPE,
    PER_SAMPLE,
    BareParameter,
    ModelCase,
    double_loop,
    full_oracle,
    per_sample_oracle,
)
from torch import Tensor, nn
from torch.nn import functional as F

import torchjac as tj

pytestmark = pytest.mark.filterwarnings("ignore:.*performance drop.*:UserWarning")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_full_jacobian_matches_jacrev(case: ModelCase) -> None:
    model, args, kwargs = _built(case)
    _assert_close(tj.param_jacobian(model, *args, **kwargs), full_oracle(model, args, kwargs))


@pytest.mark.parametrize("case", PER_SAMPLE, ids=lambda c: c.id)
def test_per_sample_matches_vmap_jacrev(case: ModelCase) -> None:
    model, args, kwargs = _built(case)
    bd = case.batch_dim
    assert bd is not None
    got = tj.param_jacobian(model, *args, batch_dim=bd, **kwargs)
    _assert_close(got, full_oracle(model, args, kwargs))
    rows = {n: j.movedim(bd, 0) for n, j in got.items()}
    _assert_close(rows, per_sample_oracle(model, args, kwargs, bd))


@pytest.mark.parametrize("case_id", ["mlp", "bare_parameter", "tied_embedding_direct_use"])
def test_matches_seed_003_double_loop(case_id: str) -> None:
    model, args, kwargs = _built(next(c for c in CASES if c.id == case_id))
    want = double_loop(model, args, kwargs)
    _assert_close(tj.param_jacobian(model, *args, batch_dim=0, **kwargs), want)
    _assert_close(tj.param_jacobian(model, *args, **kwargs), want)


@pytest.mark.parametrize(
    ("chunk_size", "max_memory"), [(1, None), (2, None), (None, "1KiB"), (None, None)]
)
@pytest.mark.parametrize("case_id", ["layernorm_twice", "bare_parameter", "cnn"])
def test_chunking_gives_the_same_result(
    case_id: str, chunk_size: int | None, max_memory: str | None
) -> None:
    model, args, kwargs = _built(next(c for c in CASES if c.id == case_id))
    want = full_oracle(model, args, kwargs)
    for bd in (None, 0):
        got = tj.param_jacobian(
            model, *args, batch_dim=bd, chunk_size=chunk_size, max_memory=max_memory, **kwargs
        )
        _assert_close(got, want)


class ItemInForward(BareParameter):
    """Data-dependent control flow: ``vmap`` cannot run it, the loop can."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y * 2 if float(x.detach().sum()) > 0 else y


def test_general_path_falls_back_to_a_loop_with_one_warning() -> None:
    model = ItemInForward().to(DTYPE)
    x = torch.randn(4, 3, dtype=DTYPE).abs()
    with pytest.warns(tj.FallbackWarning, match="param_jacobian: vectorised probing failed"):
        got = tj.param_jacobian(model, x, batch_dim=0)
    _assert_close(got, full_oracle(model, (x,), {}))


def test_float32_follows_the_model_dtype() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    got = tj.param_jacobian(model, x, batch_dim=0)
    assert all(j.dtype == torch.float32 for j in got.values())
    torch.testing.assert_close(got, tj.param_jacobian(model, x))


class SubPReLU(nn.PReLU):
    """Not the exact type: no closed form, the general per-sample path."""


class BarePReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2]))

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.prelu(x, self.w)


@pytest.mark.parametrize(
    ("layers", "shape"),
    [
        (lambda: nn.Sequential(nn.PReLU(), nn.AvgPool1d(2)), (3, 1, 6)),
        (
            lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.PReLU(3), nn.Flatten(), nn.Linear(12, 2)),
            (4, 2, 6),
        ),
        (lambda: nn.Sequential(nn.Linear(3, 4), nn.PReLU(4, init=0.1)), (5, 3)),
        (lambda: nn.Sequential(SubPReLU(), nn.AvgPool1d(2)), (3, 1, 6)),  # the general path
        (lambda: nn.Sequential(BarePReLU(), nn.AvgPool1d(2)), (3, 2, 6)),
    ],
)
def test_prelu_weights_by_their_closed_form(layers, shape) -> None:  # type: ignore[no-untyped-def]
    """A loop oracle: torch 2.13's nested vmap through prelu and pooling gives wrong values."""
    torch.manual_seed(0)
    model, x = layers().to(DTYPE), torch.randn(*shape, dtype=DTYPE)
    got = tj.param_jacobian(model, x, batch_dim=0)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(xi: Tensor) -> dict[str, Tensor]:
        return torch.func.jacrev(lambda q: torch.func.functional_call(model, q, (xi,))[0])(params)

    per_sample = [one(x[i : i + 1]) for i in range(shape[0])]
    for name in params:
        torch.testing.assert_close(got[name], torch.stack([r[name] for r in per_sample]))


class FreqLookups(nn.Module):
    """Two lookups with ``scale_grad_by_freq`` in a hand-written forward: no closed form."""

    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2, dtype=DTYPE))
        self.lin = nn.Linear(4, 2).to(DTYPE)
        self.padding_idx = padding_idx

    def forward(self, i: Tensor) -> Tensor:
        e = torch.nn.functional.embedding(
            i, self.w, padding_idx=self.padding_idx, scale_grad_by_freq=True
        )
        e2 = torch.embedding(self.w, i.flip(-1), -1, True)
        return self.lin(torch.tanh(e + e2**2).flatten(1))


@pytest.mark.parametrize("padding_idx", [None, 1])
@pytest.mark.parametrize("chunk_size", [1, None])
def test_lookups_scaled_by_frequency_count_the_whole_call(
    padding_idx: int | None, chunk_size: int | None
) -> None:
    """NOTE [per-sample index counts]: the per-sample rows are the whole call's rows, whose
    derivative divides by the indices' counts over all samples (not per sample, as a run on one
    sample would count them); the kernel follows."""
    torch.manual_seed(0)
    model, idx = FreqLookups(padding_idx), torch.tensor([[0, 2], [2, 1], [3, 2]])
    want = full_oracle(model, (idx,), {})
    _assert_close(tj.param_jacobian(model, idx, batch_dim=0, chunk_size=chunk_size), want)
    rows = torch.cat([j.reshape(6, -1) for j in want.values()], 1)
    got = tj.ntk(model, idx, chunk_size=chunk_size)
    torch.testing.assert_close(got.reshape(6, 6), rows @ rows.T)


class RBFFeatures(nn.Module):
    """``exp(-|x - c|²)`` by ``torch.cdist`` with trainable centres: no closed form."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.centres = nn.Parameter(torch.randn(5, 3, dtype=DTYPE))
        self.lin = nn.Linear(5, out).to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(torch.exp(-(torch.cdist(x, self.centres) ** 2)))


def _energy_gradient(h: Tensor) -> Tensor:
    """A gradient the model takes itself, through ``group_norm``'s backward."""
    return torch.func.grad(lambda u: F.group_norm(u.view(-1, 4, 2), 2).sin().sum())(h)


class GroupNormGradient(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return _energy_gradient(h)


@pytest.mark.parametrize(
    ("make", "n"),
    [
        (lambda: RBFFeatures(6), 4),  # the general per-sample path: functorch's vmap
        (lambda: nn.Sequential(nn.Linear(3, 8), GroupNormGradient(), nn.Linear(8, 2)), 1),
        (lambda: nn.Sequential(nn.Linear(3, 8), GroupNormGradient(), nn.Linear(8, 2)), 3),
    ],
    ids=["cdist_general_path", "group_norm_gradient_deltas_1", "group_norm_gradient_deltas_3"],
)
@pytest.mark.parametrize("chunk_size", [2, None])
def test_ops_a_vmap_gets_wrong_per_sample(make, n: int, chunk_size: int | None) -> None:  # type: ignore[no-untyped-def]
    """NOTE [wrong batching rules]: functorch's rule of ``_cdist_backward`` made the vmapped
    per-sample rows off by 0.35 (the kernel by 0.14), the legacy vmap of the layers' ``δ``
    through ``group_norm``'s backward by 0.34 (one sample) or failed (a loop, with a warning)."""
    torch.manual_seed(0)
    model, x = make().to(DTYPE), torch.randn(n, 3, dtype=DTYPE)
    want = double_loop(model, (x,), {})  # jacrev uses functorch's rule of _cdist_backward
    _assert_close(tj.param_jacobian(model, x, batch_dim=0, chunk_size=chunk_size), want)
    m = model(x).numel()
    rows = torch.cat([j.reshape(m, -1) for j in want.values()], 1)
    got = tj.ntk(model, x, chunk_size=chunk_size).reshape(m, m)
    torch.testing.assert_close(got, rows @ rows.T)
