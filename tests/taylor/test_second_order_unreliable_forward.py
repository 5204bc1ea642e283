"""Ops whose forward mode torch gets wrong (NOTE [unreliable nested forward]), found by the sweep of
torch's operator database (NOTE [opinfo sweep]): the Taylor mode declines them, and the result is
the closed form's, by reverse mode."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import torchjac as tj

DT = torch.float64


def _unit_lower(x: Tensor) -> Tensor:
    """A lower triangular matrix with a unit diagonal, from the strictly lower part of ``x``."""
    return x.tril(-1) + torch.eye(x.shape[0], dtype=x.dtype)


def _reflector(a: Tensor, i: int) -> Tensor:
    v = torch.cat([torch.zeros(i, dtype=a.dtype), torch.ones(1, dtype=a.dtype), a[i + 1 :, i]])
    return v


_TAU = torch.tensor([0.7, 1.3], dtype=DT)
_IDX = torch.tensor([0, 0, 1])


def _householder_closed(a: Tensor) -> Tensor:
    q = torch.eye(a.shape[0], dtype=a.dtype)
    for i in range(a.shape[1]):
        v = _reflector(a, i)
        q = q @ (torch.eye(a.shape[0], dtype=a.dtype) - _TAU[i] * torch.outer(v, v))
    return q[:, : a.shape[1]]


def _batch_norm_closed(x: Tensor) -> Tensor:
    centred = x - x.mean(0)
    return centred / torch.sqrt((centred * centred).mean(0) + 1e-5)


# name -> (func, closed form of the same function by other ops, input shape)
CASES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], tuple[int, ...]]] = {
    "cholesky_inverse": (
        lambda x: torch.cholesky_inverse(_unit_lower(x)),
        lambda x: torch.linalg.inv(_unit_lower(x) @ _unit_lower(x).T),
        (3, 3),
    ),
    "scatter_reduce_prod": (
        lambda x: x[:2].scatter_reduce(0, _IDX, x[2:], "prod"),
        lambda x: torch.stack([x[0] * x[2] * x[3], x[1] * x[4]]),
        (5,),
    ),
    "tensorsolve": (
        lambda x: torch.linalg.tensorsolve(x.reshape(2, 2) + 3 * torch.eye(2, dtype=DT), _B),
        lambda x: torch.linalg.inv(x.reshape(2, 2) + 3 * torch.eye(2, dtype=DT)) @ _B,
        (4,),
    ),
    "householder_product": (
        lambda x: torch.linalg.householder_product(x, _TAU),
        _householder_closed,
        (3, 2),
    ),
    "native_batch_norm": (
        lambda x: torch.native_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)[0],
        _batch_norm_closed,
        (3, 2),
    ),
}
_B = torch.tensor([1.0, -2.0], dtype=DT)
FIRST_ORDER_WRONG = ("cholesky_inverse", "scatter_reduce_prod")


def _run(call: Callable[[], Tensor]) -> tuple[Tensor, int]:
    """``call()`` and how many FallbackWarnings it issued, each naming the wrong forward mode."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", tj.FallbackWarning)
        got = call()
    falls = [str(w.message) for w in record if issubclass(w.category, tj.FallbackWarning)]
    assert all(re.search("forward mode is (unreliable|wrong)", m) for m in falls), falls
    return got, len(falls)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap, householder
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["hessian_diagonal", "laplacian", "hessian"])
def test_second_order_takes_nested_ad(case: str, name: str, gen: torch.Generator) -> None:
    func, closed, shape = CASES[case]
    x = torch.randn(shape, generator=gen, dtype=DT)
    h = torch.func.jacrev(torch.func.jacrev(closed))(x)  # [*out, *in, *in]
    out = h.shape[: h.dim() - 2 * x.dim()]
    flat = h.reshape(*out, x.numel(), x.numel())
    diag = flat.diagonal(dim1=-2, dim2=-1)
    want = {"hessian": h, "hessian_diagonal": diag.reshape(*out, *shape), "laplacian": diag.sum(-1)}
    got, falls = _run(lambda: getattr(tj, name)(func, x))
    # a Hessian of more than 2 inputs may be planned as nested AD from the start (no warning)
    assert falls == 1 or (name == "hessian" and falls == 0 and x.numel() > 2)
    torch.testing.assert_close(got, want[name], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", FIRST_ORDER_WRONG)
@pytest.mark.parametrize("mode", ["auto", "fwd"])
def test_jacobian_of_a_wrong_forward_mode_takes_rows(
    case: str, mode: str, gen: torch.Generator
) -> None:
    func, closed, shape = CASES[case]
    x = torch.randn(shape, generator=gen, dtype=DT)
    got, falls = _run(lambda: tj.jacobian(func, x, mode=mode))
    assert falls == 1 or (mode == "auto" and falls == 0)  # auto may choose rows from the start
    torch.testing.assert_close(got, torch.func.jacrev(closed)(x), rtol=1e-9, atol=1e-10)


@pytest.mark.skipif(
    not hasattr(F, "linear_cross_entropy"), reason="torch without linear_cross_entropy"
)
def test_chunked_linear_cross_entropy_takes_rows(gen: torch.Generator) -> None:
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    w = torch.randn(5, 3, generator=gen, dtype=DT)
    target = torch.tensor([0, 4, 2, 1])
    options = LinearCrossEntropyOptions(batch_chunk_size=2)
    x = torch.randn(4, 3, generator=gen, dtype=DT)

    def chunked(x: Tensor) -> Tensor:
        return F.linear_cross_entropy(x, w, target, options=options)

    want = torch.func.jacrev(lambda x: F.cross_entropy(x @ w.T, target))(x)
    with pytest.warns(tj.FallbackWarning, match="forward mode is wrong"):
        got = tj.jacobian(chunked, x, mode="fwd")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
