"""``tj.param_jacobian`` against float64 oracles across the model registry, and its contract."""

from __future__ import annotations

from typing import Any

import pytest
import torch
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

import torchjac as tj

pytestmark = pytest.mark.filterwarnings("ignore:.*performance drop.*:UserWarning")


def _built(case: ModelCase) -> tuple[nn.Module, tuple, dict]:
    return case.build(torch.Generator().manual_seed(0))


def _assert_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


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


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": [
            (n, id(p), type(p), p.detach().clone(), p.requires_grad, p.grad)
            for n, p in model.named_parameters(remove_duplicate=False)
        ],
        "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
        "modes": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert before["grad_mode"] == after["grad_mode"]
    assert torch.equal(before["rng"], after["rng"])
    for (n, i, t, v, rg, g), (n2, i2, t2, v2, rg2, g2) in zip(before["params"], after["params"]):
        assert (n, i, t, rg) == (n2, i2, t2, rg2) and t2 is nn.Parameter
        assert torch.equal(v, v2), n
        assert g is g2, n  # .grad untouched (the same object, or still None)
    for (n, b), (n2, b2) in zip(before["buffers"], after["buffers"]):
        assert n == n2 and torch.equal(b, b2), n


@pytest.mark.parametrize("per_sample", [False, True], ids=["full", "batch_dim"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_model_unchanged(case: ModelCase, per_sample: bool) -> None:
    model, args, kwargs = _built(case)
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    before = _snapshot(model)
    if per_sample and case.batch_dim is None:
        with pytest.raises(tj.BatchCouplingError, match="train mode"):
            tj.param_jacobian(model, *args, batch_dim=0, **kwargs)
    else:
        bd = case.batch_dim if per_sample else None
        tj.param_jacobian(model, *args, batch_dim=bd, **kwargs)
    _assert_same(before, _snapshot(model))


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        self.lin(x)
        raise RuntimeError("boom in forward")


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_hooks_removed_after_an_exception(batch_dim: int | None) -> None:
    model, x = Failing(), torch.randn(4, 3, dtype=DTYPE)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom in forward"):
        tj.param_jacobian(model, x, batch_dim=batch_dim)
    _assert_same(before, _snapshot(model))


class BatchCentered(nn.Module):
    """Couples samples after its Linear (``where="after"``) or before a bare parameter."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(DTYPE)
        self.scale = nn.Parameter(torch.ones(2, dtype=DTYPE))
        self.where = where

    def forward(self, x: Tensor) -> Tensor:
        if self.where == "before":  # upstream of every parameter: per-sample rows are exact
            x = x - x.mean(0)
        h = self.lin(x)
        if self.where == "after":
            h = h - h.mean(0)
        if self.where == "bare":
            h = (h - h.mean(0)) * self.scale
        return h * self.scale


@pytest.mark.parametrize("where", ["after", "bare"])
def test_coupled_samples_raise(where: str) -> None:
    model = BatchCentered(where)
    with pytest.raises(tj.BatchCouplingError, match="batch_dim=0"):
        tj.param_jacobian(model, torch.randn(5, 3, dtype=DTYPE), batch_dim=0)


def test_coupling_upstream_of_the_closed_forms_is_exact() -> None:
    model, x = BatchCentered("before"), torch.randn(5, 3, dtype=DTYPE)
    got = tj.param_jacobian(model, x, params=["lin.weight", "lin.bias"], batch_dim=0)
    want = full_oracle(model, (x,), {})
    _assert_close(got, {n: want[n] for n in ("lin.weight", "lin.bias")})
    with pytest.raises(tj.BatchCouplingError, match="input 0"):  # the general path would be wrong
        tj.param_jacobian(model, x, batch_dim=0)


def test_batchnorm_train_raises_and_keeps_statistics() -> None:
    model, args, _ = _built(next(c for c in CASES if c.id == "batchnorm_train"))
    stats = [b.clone() for b in model.buffers()]
    with pytest.raises(tj.BatchCouplingError, match=r"module '1' \(BatchNorm2d\) is in train"):
        tj.param_jacobian(model, *args, batch_dim=0)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))


def test_params_selection_names_objects_and_frozen() -> None:
    model, args, _ = _built(next(c for c in CASES if c.id == "frozen"))
    default = tj.param_jacobian(model, *args, batch_dim=0)
    assert list(default) == ["2.weight", "2.bias"]
    chosen = tj.param_jacobian(model, *args, params=[model[2].bias, "0.weight"], batch_dim=0)
    assert list(chosen) == ["0.weight", "2.bias"]  # named_parameters() order
    torch.testing.assert_close(chosen["2.bias"], default["2.bias"])
    full = tj.param_jacobian(model, *args, params="0.weight")
    torch.testing.assert_close(full["0.weight"], chosen["0.weight"])
    assert not model[0].weight.requires_grad


def test_tied_parameter_listed_once_under_its_first_name() -> None:
    model, args, _ = _built(next(c for c in CASES if c.id == "tied_embedding"))
    names = list(tj.param_jacobian(model, *args, batch_dim=0))
    assert names == ["emb.weight", "hidden.weight", "hidden.bias"]
    by_alias = tj.param_jacobian(model, *args, params=["out.weight"], batch_dim=0)
    assert list(by_alias) == ["emb.weight"]


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


class ReturnsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(4, 2, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return self.p * 1.0 if x.dim() else x


def test_output_that_ignores_the_batch_is_an_error_per_sample() -> None:
    model, x = ReturnsParameter(), torch.randn(4, 3, dtype=DTYPE)
    full = tj.param_jacobian(model, x)["p"]
    torch.testing.assert_close(full, torch.eye(8, dtype=DTYPE).reshape(4, 2, 4, 2))
    with pytest.raises(ValueError, match="does not follow the batch of its inputs"):
        tj.param_jacobian(model, x, batch_dim=0)


def test_float32_follows_the_model_dtype() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    got = tj.param_jacobian(model, x, batch_dim=0)
    assert all(j.dtype == torch.float32 for j in got.values())
    torch.testing.assert_close(got, tj.param_jacobian(model, x))


def test_dropout_in_train_mode_leaves_the_rng_state() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    state = torch.get_rng_state()
    got = tj.param_jacobian(model, x)
    assert torch.equal(state, torch.get_rng_state())
    assert got["0.weight"].shape == (5, 2, 4, 3)


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.lin(x), x


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m, x: tj.param_jacobian(lambda t: t, x), TypeError, "`model` must be"),
        (lambda m, x: tj.param_jacobian(m, x, batch_dim=0.0), TypeError, "`batch_dim`"),
        (lambda m, x: tj.param_jacobian(m, x, chunk_size=0), ValueError, "`chunk_size`"),
        (lambda m, x: tj.param_jacobian(m, x, params=["nope"]), ValueError, "'nope'"),
        (lambda m, x: tj.param_jacobian(m, x, params=[]), ValueError, "`params` is empty"),
        (lambda m, x: tj.param_jacobian(m, x, params=[3]), TypeError, "got int"),
        (
            lambda m, x: tj.param_jacobian(m, x, params=[nn.Parameter(torch.ones(1))]),
            ValueError,
            "not a parameter of the model",
        ),
        (lambda m, x: tj.param_jacobian(TupleOut(), x), TypeError, "must return a Tensor"),
        (
            lambda m, x: tj.param_jacobian(TupleOut(), x, batch_dim=0),
            TypeError,
            "must return a Tensor",
        ),
        (lambda m, x: tj.param_jacobian(m, x, max_memory="lots"), ValueError, "`max_memory`"),
    ],
)
def test_bad_arguments(call: Any, error: type, match: str) -> None:
    model, x = nn.Linear(3, 2), torch.randn(4, 3)
    with pytest.raises(error, match=match):
        call(model, x)


def test_all_frozen_needs_params() -> None:
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter of the model requires grad"):
        tj.param_jacobian(model, torch.randn(4, 3))


def test_zero_dim_output_with_batch_dim() -> None:
    model = nn.Sequential(nn.Linear(3, 1), nn.Flatten(0))
    with pytest.raises(ValueError, match="0-d output"):
        tj.param_jacobian(lambda_sum(model), torch.randn(4, 3), batch_dim=0)


class lambda_sum(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).sum()
