"""``tj.param_jacobian`` arguments: ``params`` selection, tied parameters, and bad arguments."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from param_jacobian_checks import _built
from registry import CASES
from torch import Tensor, nn

import torchjac as tj

pytestmark = pytest.mark.filterwarnings("ignore:.*performance drop.*:UserWarning")


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
