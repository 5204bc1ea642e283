"""``tj.JacobianOperator`` rejects bad arguments and operands before any work, naming itself."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import torchjac as tj

D = torch.float64


@pytest.fixture
def J() -> tj.JacobianOperator:
    return tj.JacobianOperator(lambda x: x.sin(), torch.zeros(2, 3, dtype=D))


@pytest.mark.parametrize(
    ("operand", "error", "match"),
    [
        (torch.ones(5, dtype=D), ValueError, r"JacobianOperator: `@` needs 6 rows"),
        (torch.ones(6, 2, 1, dtype=D), ValueError, r"got a 3-D tensor of shape \[6, 2, 1\]"),
        (torch.ones((), dtype=D), ValueError, r"got a 0-D tensor"),
        (torch.ones(6), TypeError, r"operator's dtype torch.float64, got torch.float32"),
        (torch.ones(6, dtype=D, device="meta"), ValueError, r"on cpu, got one on meta"),
        (np.ones(6), TypeError, r"use \.to_scipy\(\)"),
        ([1.0] * 6, TypeError, r"needs a torch.Tensor, got list"),
        (torch.ones(6, dtype=D, requires_grad=True), ValueError, r"not differentiable"),
    ],
)
def test_bad_operands(J: tj.JacobianOperator, operand: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        J @ operand


def test_transposed_and_gram_operands_are_checked(J: tj.JacobianOperator) -> None:
    with pytest.raises(ValueError, match=r"JacobianOperator\.T: `@` needs 6 rows"):
        J.T @ torch.ones(5, dtype=D)
    with pytest.raises(ValueError, match=r"JacobianOperator\.T\.gram\(\): `@` needs 6 rows"):
        J.T.gram() @ torch.ones(3, dtype=D)
    with pytest.raises(ValueError, match=r"JacobianOperator\.gram\(\): `@` needs a vector"):
        J.gram() @ torch.ones(6, 1, 1, dtype=D)


def _model() -> nn.Module:
    return nn.Linear(3, 2).double()


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: tj.JacobianOperator(3, torch.ones(2)), TypeError, "`func` must be callable"),
        (
            lambda: tj.JacobianOperator(torch.sin, torch.ones(2, dtype=torch.long)),
            TypeError,
            r"JacobianOperator: inputs must have a real floating dtype",
        ),
        (
            lambda: tj.JacobianOperator(lambda x: x.long(), torch.ones(2)),
            TypeError,
            "the output of func must have a real floating dtype",
        ),
        (
            lambda: tj.JacobianOperator(torch.sin, torch.ones(2), chunk_size=0),
            ValueError,
            r"JacobianOperator: `chunk_size` must be >= 1",
        ),
        (
            lambda: tj.JacobianOperator(torch.sin, torch.ones(2), max_memory="lots"),
            ValueError,
            "`max_memory` must be bytes",
        ),
        (
            lambda: tj.JacobianOperator(torch.sin, torch.ones(2, 3), batch_dim=2),
            ValueError,
            "`batch_dim=2` is out of range",
        ),
        (
            lambda: tj.JacobianOperator.from_module(torch.sin, torch.ones(2)),
            TypeError,
            r"JacobianOperator\.from_module: `model` must be a torch.nn.Module",
        ),
        (
            lambda: tj.JacobianOperator.from_module(_model(), torch.ones(2, 3), data=[]),
            ValueError,
            "either as `\\*args` \\(one batch\\) or as the items of `data`, not both",
        ),
        (
            lambda: tj.JacobianOperator.from_module(_model(), data=[]),
            ValueError,
            "`data` yielded no items",
        ),
        (
            lambda: tj.JacobianOperator.from_module(_model(), data=iter([torch.ones(2, 3)])),
            TypeError,
            "`data` is an iterator",
        ),
        (
            lambda: tj.JacobianOperator.from_module(_model(), data=torch.ones(2, 3)),
            TypeError,
            "`data` must be a re-iterable",
        ),
        (
            lambda: tj.JacobianOperator.from_module(
                _model(), data=DataLoader(TensorDataset(torch.ones(4, 3)), shuffle=True)
            ),
            ValueError,
            "shuffle=True",
        ),
        (
            lambda: tj.JacobianOperator.from_module(
                _model(), data=[torch.ones(2, 3, dtype=D), torch.ones(2, 1, 3, dtype=D)]
            ),
            ValueError,
            r"item 0 has \(torch.float64 2-D\) but item 1 has \(torch.float64 3-D\)",
        ),
        (
            lambda: tj.JacobianOperator.from_module(
                _model(), data=[torch.ones(2, 3, dtype=D), (torch.ones(2, 3, dtype=D), 1)]
            ),
            ValueError,
            "must share one structure",
        ),
        (
            lambda: tj.JacobianOperator.from_module(_model(), data=[{"x": torch.ones(2, 3)}]),
            TypeError,
            "each item of `data` must be a Tensor or a tuple",
        ),
        (
            lambda: tj.JacobianOperator.from_module(_model(), torch.ones(2, 3), params=["nope"]),
            ValueError,
            r"`params` names 'nope'",
        ),
        (
            lambda: tj.JacobianOperator.from_graph(torch.ones(2), torch.ones(2)),
            ValueError,
            r"JacobianOperator\.from_graph: outputs is not on the autograd graph",
        ),
    ],
)
def test_bad_arguments(build: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


class _Shrinking:
    """A re-iterable whose second pass yields fewer items than its first."""

    def __init__(self) -> None:
        self.passes = 0

    def __iter__(self) -> Any:
        self.passes += 1
        items = [torch.ones(2, 3, dtype=D)] * (2 if self.passes == 1 else 1)
        return iter(items)


def test_max_memory_is_checked_before_the_function_runs() -> None:
    calls = []
    with pytest.raises(ValueError, match=r"JacobianOperator: `max_memory` must be bytes"):
        tj.JacobianOperator(lambda x: calls.append(1) or x, torch.ones(2), max_memory="lots")
    with pytest.raises(ValueError, match=r"from_module: `max_memory` must be bytes"):
        tj.JacobianOperator.from_module(_model(), data=[torch.ones(1, 3)], max_memory="-")
    assert calls == []


def test_data_that_changes_between_passes_is_an_error() -> None:
    J = tj.JacobianOperator.from_module(_model(), data=_Shrinking())
    with pytest.raises(RuntimeError, match="yielded 1 items, but 2 when the operator was built"):
        J @ torch.ones(J.shape[1], dtype=D)


def test_function_whose_shapes_change_is_an_error() -> None:
    calls = []

    def f(x: Tensor) -> Tensor:
        calls.append(1)
        return x if len(calls) == 1 else x[:1]

    J = tj.JacobianOperator(f, torch.ones(2, dtype=D))
    with pytest.raises(RuntimeError, match=r"returned shapes \[\[1\]\], but \[\[2\]\]"):
        J.T @ torch.ones(2, dtype=D)


def test_data_that_grows_between_passes_is_an_error() -> None:
    data = [torch.ones(2, 3, dtype=D)]
    J = tj.JacobianOperator.from_module(_model(), data=data)
    data.append(torch.ones(2, 3, dtype=D))
    with pytest.raises(RuntimeError, match="yielded more than 1 items, but 1 when"):
        J.T @ torch.ones(J.shape[0], dtype=D)


def test_to_scipy_without_scipy_says_how_to_install(
    J: tj.JacobianOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)  # import fails
    with pytest.raises(ImportError, match=r"JacobianOperator\.to_scipy\(\) needs scipy"):
        J.to_scipy()
    with pytest.raises(ImportError, match=r"JacobianOperator\.T\.gram\(\)\.to_scipy\(\) needs"):
        J.T.gram().to_scipy()
