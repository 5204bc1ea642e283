"""Edge layouts: 0-d tensors, outputs per sample, create_graph via closures, has_aux."""

from __future__ import annotations

import pytest
import torch
from conftest import randn
from torch import Tensor
from torch.func import hessian, jacrev, vmap

import torchjac as tj


def test_zero_dim_inputs_and_outputs() -> None:
    x = torch.tensor(0.7, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    j = tj.jac(xr.sin(), xr)
    assert j.shape == () and torch.allclose(j, x.cos())
    assert tj.jacobian(torch.sin, x).shape == ()
    for name in ("hessian", "hessian_diagonal", "laplacian"):
        got = getattr(tj, name)(torch.sin, x)
        assert got.shape == (), name
        torch.testing.assert_close(got, -x.sin())
    # a 0-d output of a vector input: rows are empty, columns the input's
    v = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    assert tj.hessian(lambda v: (v**3).sum(), v).shape == (3, 3)
    assert tj.hessian_diagonal(lambda v: (v**3).sum(), v).shape == (3,)
    assert tj.laplacian(lambda v: (v**3).sum(), v).shape == ()


def _two_outputs(x: Tensor) -> list[Tensor]:
    return [x.sin() * x[..., :1], (x**2).sum(-1)]


def _cat_sample(s: Tensor) -> Tensor:
    return torch.cat([t.reshape(-1) for t in _two_outputs(s)])


@pytest.mark.parametrize("name", ["jac", "jacobian", "hessian", "hessian_diagonal", "laplacian"])
def test_sequence_outputs_with_batch_dim(gen: torch.Generator, name: str) -> None:
    x = randn(4, 3, gen=gen)
    if name == "jac":
        xr = x.clone().requires_grad_(True)
        got = tj.jac(_two_outputs(xr), xr, batch_dim=0)
    else:
        got = getattr(tj, name)(_two_outputs, x, batch_dim=0)
    jac = vmap(jacrev(_cat_sample))(x)  # [B, m=4, 3]
    hes = vmap(hessian(_cat_sample))(x)  # [B, 4, 3, 3]
    want = {
        "jac": jac,
        "jacobian": jac,
        "hessian": hes,
        "hessian_diagonal": hes.diagonal(dim1=-2, dim2=-1),
        "laplacian": hes.diagonal(dim1=-2, dim2=-1).sum(-1),
    }[name]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["jacobian", "hessian", "hessian_diagonal", "laplacian"])
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_functional_create_graph_reaches_closed_over_params(
    gen: torch.Generator, name: str, mode: str
) -> None:
    w = randn(3, 3, gen=gen, grad=True)
    x = randn(5, 3, gen=gen)

    def reduce(w: Tensor) -> Tensor:
        def g(s: Tensor) -> Tensor:
            return torch.tanh(s @ w)

        if name == "jacobian":
            return vmap(jacrev(g))(x).pow(2).sum()
        h = vmap(hessian(g))(x)
        d = h.diagonal(dim1=-2, dim2=-1)
        return {"hessian": h, "hessian_diagonal": d, "laplacian": d.sum(-1)}[name].pow(2).sum()

    got = getattr(tj, name)(
        lambda x: torch.tanh(x @ w), x, batch_dim=0, mode=mode, create_graph=True
    )
    assert got.requires_grad
    (g,) = torch.autograd.grad(got.pow(2).sum(), w)
    torch.testing.assert_close(g, torch.func.grad(reduce)(w.detach()))


@pytest.mark.parametrize("name", ["jacobian", "hessian", "hessian_diagonal", "laplacian"])
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_has_aux_returns_result_and_aux(name: str, batch_dim: int | None) -> None:
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)

    def f(x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y = (x**3).sum(-1) * x[:, 0]
        return y, {"y": y.detach()}

    got = getattr(tj, name)(f, x, has_aux=True, batch_dim=batch_dim)
    assert type(got) is tuple and len(got) == 2
    result, aux = got
    assert type(aux) is dict and list(aux) == ["y"]
    torch.testing.assert_close(aux["y"], f(x)[0])
    torch.testing.assert_close(result, getattr(tj, name)(lambda x: f(x)[0], x, batch_dim=batch_dim))


@pytest.mark.parametrize("name", ["jacobian", "hessian", "hessian_diagonal", "laplacian"])
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_aux_carries_no_graph_whichever_plan_ran(
    name: str, mode: str, batch_dim: int | None
) -> None:
    lin = torch.nn.Linear(3, 2).double()
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)

    def f(x: Tensor) -> tuple[Tensor, dict[str, object]]:
        y = torch.tanh(lin(x))[..., 0]
        return y, {"y": y * 2, "sum": [x.sum(), 3]}

    _, aux = getattr(tj, name)(f, x, has_aux=True, batch_dim=batch_dim, mode=mode)
    assert not aux["y"].requires_grad and aux["y"].grad_fn is None
    assert not aux["sum"][0].requires_grad and aux["sum"][1] == 3
    torch.testing.assert_close(aux["y"], f(x)[1]["y"].detach())
