"""Results are exact for functions that use ``torch.func`` inside and for linear-algebra ops."""

from __future__ import annotations

import warnings

import pytest
import torch
from conventions_cases import FUNCTIONAL
from torch import Tensor

import torchjac as tj

_W = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6], [-0.7, 0.2, 0.9]], dtype=torch.float64)


_X = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)


def _single(s: Tensor) -> Tensor:
    return torch.tanh(s @ _W) * s[0]


def _energy(s: Tensor) -> Tensor:
    return (torch.tanh(s @ _W) ** 2).sum()


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        pytest.param(
            n,
            m,
            id=f"{n}-{m}",
        )
        for n in FUNCTIONAL
        for m in ("auto", "rev", "fwd")
    ],
)
def test_user_function_vmapped_by_the_user(name: str, mode: str) -> None:
    h = torch.func.vmap(torch.func.hessian(_single))(_X)
    want = {
        "jacobian": torch.func.vmap(torch.func.jacrev(_single))(_X),
        "hessian": h,
        "hessian_diagonal": h.diagonal(dim1=-2, dim2=-1),
        "laplacian": h.diagonal(dim1=-2, dim2=-1).sum(-1),
    }[name]
    with warnings.catch_warnings():  # the Taylor mode cannot see through vmap: nested AD, warned
        warnings.simplefilter("ignore", tj.FallbackWarning)
        got = getattr(tj, name)(torch.func.vmap(_single), _X, batch_dim=0, mode=mode)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "mode",
    [pytest.param(m) for m in ("auto", "rev", "fwd")],
)
def test_jacobian_of_a_torch_func_gradient(mode: str) -> None:
    want = torch.func.jacrev(torch.func.grad(_energy))(_X[0])
    with warnings.catch_warnings():  # the Taylor mode cannot see through grad: nested AD, warned
        warnings.simplefilter("ignore", tj.FallbackWarning)
        got = tj.jacobian(torch.func.grad(_energy), _X[0], mode=mode)
    torch.testing.assert_close(got, want)


_LINALG = {
    "det": lambda s: torch.linalg.det(s.reshape(2, 2)),
    "logdet": lambda s: torch.logdet(
        s.reshape(2, 2) @ s.reshape(2, 2).T + torch.eye(2, dtype=s.dtype)
    ),
    "solve": lambda s: torch.linalg.solve(s.reshape(2, 2), torch.ones(2, dtype=s.dtype)).sum(),
    "inv": lambda s: torch.linalg.inv(s.reshape(2, 2)).sum(),
    "cholesky": lambda s: torch.linalg.cholesky(
        s.reshape(2, 2) @ s.reshape(2, 2).T + torch.eye(2, dtype=s.dtype)
    ).sum(),
}


@pytest.mark.parametrize(
    ("op", "name", "mode"),
    [
        pytest.param(op, n, m, id=f"{op}-{n}-{m}")
        for op in _LINALG
        for n in ("hessian", "hessian_diagonal", "laplacian")
        for m in ("auto", "rev", "fwd")
    ],
)
def test_second_order_through_linalg(op: str, name: str, mode: str) -> None:
    s = torch.tensor([0.5, -1.0, 2.0, 0.7], dtype=torch.float64)
    f = _LINALG[op]
    h = torch.autograd.functional.hessian(f, s)  # reverse over reverse, no torchjac
    want = {"hessian": h, "hessian_diagonal": h.diagonal(), "laplacian": h.diagonal().sum()}[name]
    taylor = name != "hessian"  # a full Hessian of 4 inputs is planned as nested AD here
    if (
        op in ("det", "logdet", "solve") and mode == "auto" and taylor
    ):  # NOTE [unreliable nested forward]
        with pytest.warns(tj.FallbackWarning, match="unreliable"):
            got = getattr(tj, name)(f, s, mode=mode)
    else:
        got = getattr(tj, name)(f, s, mode=mode)
    torch.testing.assert_close(got, want)
