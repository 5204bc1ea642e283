"""``create_graph=True``: gradients of derivatives with respect to parameters and inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import randn
from test_functional import MODES, mlp
from torch import Tensor
from torch.func import hessian, vmap

import torchjac as tj


def test_pinn_residual_loss_parameter_gradient(gen: torch.Generator) -> None:
    net = mlp(gen, (2, 8, 8, 1))
    xt = randn(6, 2, gen=gen)
    lap = tj.laplacian(net, xt, batch_dim=0, create_graph=True)
    jac = tj.jacobian(net, xt, batch_dim=0, create_graph=True)
    loss = ((jac[:, 0, 1] - lap[:, 0]) ** 2).mean()
    params = list(net.parameters())[:-1]  # derivatives do not depend on the last bias
    got = torch.autograd.grad(loss, params)

    x = xt.clone().requires_grad_(True)
    u = net(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap_ref = sum(
        torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2)
    )
    ref_loss = ((du[:, 1] - lap_ref) ** 2).mean()
    ref = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(got, ref)
    assert all(p.grad is None for p in net.parameters())


def _oracle(fn: str, net: Any, x: Tensor) -> Tensor:
    """``fn``'s per-sample result by torch.func (differentiable, like the input and net)."""
    h = vmap(hessian(net))(x)
    return {
        "hessian": h,
        "hessian_diagonal": h.diagonal(dim1=-2, dim2=-1),
        "laplacian": h.diagonal(dim1=-2, dim2=-1).sum(-1),
        "jacobian": vmap(torch.func.jacrev(net))(x),
    }[fn]


@pytest.mark.parametrize("fn", ["hessian", "hessian_diagonal", "laplacian", "jacobian"])
def test_create_graph_parameter_gradients_every_front_door(gen: torch.Generator, fn: str) -> None:
    net = mlp(gen, (3, 6, 2))
    x = randn(4, 3, gen=gen)
    params = list(net.parameters())[:-1]
    got = getattr(tj, fn)(net, x, batch_dim=0, create_graph=True)
    plain = getattr(tj, fn)(net, x, batch_dim=0)
    assert not plain.requires_grad
    ref = _oracle(fn, net, x)
    torch.testing.assert_close(got, ref)
    w = torch.linspace(-1, 1, got.numel(), dtype=got.dtype).view_as(got)
    grads = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    refs = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for g, r in zip(grads, refs):
        if r is None:
            assert g is None or bool((g == 0).all())
        else:
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", ["jacobian", "hessian", "hessian_diagonal", "laplacian"])
def test_create_graph_input_gradients(gen: torch.Generator, fn: str, mode: str) -> None:
    net = mlp(gen, (3, 6, 2))
    x = randn(4, 3, gen=gen, grad=True)
    ref = _oracle(fn, net, x)
    got = getattr(tj, fn)(net, x, batch_dim=0, mode=mode, create_graph=True)
    (g,) = torch.autograd.grad((got**2).sum(), x)
    (r,) = torch.autograd.grad((ref**2).sum(), x)
    torch.testing.assert_close(g, r)
    assert x.grad is None
