"""``hessian``, ``hessian_diagonal``, ``laplacian`` against closed forms and ``torch.func``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randn
from test_functional import MODES, mlp
from torch import Tensor
from torch.func import hessian, vmap

import torchjac as tj


def closed_form(x: Tensor) -> Tensor:
    return x.sin().sum(-1) + x.sum(-1) ** 2


@pytest.mark.parametrize("mode", MODES)
def test_closed_form_diagonal_and_laplacian(gen: torch.Generator, mode: str) -> None:
    x = randn(5, 4, gen=gen)
    diag = tj.hessian_diagonal(closed_form, x, batch_dim=0, mode=mode)
    torch.testing.assert_close(diag, 2 - x.sin())
    lap = tj.laplacian(closed_form, x, batch_dim=0, mode=mode)
    torch.testing.assert_close(lap, (2 - x.sin()).sum(-1))
    full = tj.hessian(closed_form, x, batch_dim=0, mode=mode)
    torch.testing.assert_close(full, 2 + torch.diag_embed(-x.sin()))


def pinn_field(xt: Tensor) -> Tensor:
    """u(x, t) = [sin x · e^{-t}, x² t, x³] per sample."""
    x, t = xt[:, 0], xt[:, 1]
    return torch.stack([x.sin() * (-t).exp(), x**2 * t, x**3], dim=1)


def pinn_hessian(xt: Tensor) -> Tensor:
    x, t = xt[:, 0], xt[:, 1]
    h = torch.zeros(len(x), 3, 2, 2, dtype=xt.dtype)
    e = (-t).exp()
    h[:, 0] = torch.stack([-x.sin() * e, -x.cos() * e, -x.cos() * e, x.sin() * e], 1).view(-1, 2, 2)
    h[:, 1, 0, 0], h[:, 1, 0, 1], h[:, 1, 1, 0] = 2 * t, 2 * x, 2 * x
    h[:, 2, 0, 0] = 6 * x
    return h


@pytest.mark.parametrize("mode", MODES)
def test_pinn_field_closed_forms(gen: torch.Generator, mode: str) -> None:
    xt = randn(7, 2, gen=gen)
    h = pinn_hessian(xt)
    torch.testing.assert_close(tj.hessian(pinn_field, xt, batch_dim=0, mode=mode), h)
    diag = h.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(pinn_field, xt, batch_dim=0, mode=mode), diag)
    torch.testing.assert_close(tj.laplacian(pinn_field, xt, batch_dim=0, mode=mode), diag.sum(-1))


def general_ops(x: Tensor) -> Tensor:
    """Ops without a cheap rule (general nested-AD rule) mixed with ruled ones."""
    y = F.softplus(x @ torch.linspace(-1, 1, 12, dtype=x.dtype).view(3, 4)).pow(3)
    z = F.layer_norm(x.exp() * x, (3,))
    return torch.cat([y.sum(-1, keepdim=True), z, F.gelu(x).prod(-1, keepdim=True)], dim=-1)


@pytest.mark.parametrize("func", ["mlp", "general"])
def test_mlp_and_general_ops_match_torch_func(gen: torch.Generator, func: str) -> None:
    f = mlp(gen, (3, 6, 6, 2)) if func == "mlp" else general_ops
    x = randn(5, 3, gen=gen)
    h = vmap(hessian(f))(x)
    for mode in MODES:
        torch.testing.assert_close(tj.hessian(f, x, batch_dim=0, mode=mode), h)
        diag = tj.hessian_diagonal(f, x, batch_dim=0, mode=mode)
        torch.testing.assert_close(diag, h.diagonal(dim1=-2, dim2=-1))
        lap = tj.laplacian(f, x, batch_dim=0, mode=mode)
        torch.testing.assert_close(lap, h.diagonal(dim1=-2, dim2=-1).sum(-1))


def test_unbatched_several_inputs_nested_containers(gen: torch.Generator) -> None:
    a, b = randn(2, gen=gen), randn(3, gen=gen)

    def f(a: Tensor, b: Tensor) -> Tensor:
        return (a.sum() * b).tanh() * a.prod()

    ref = hessian(f, argnums=(0, 1))(a, b)
    for mode in MODES:
        got = tj.hessian(f, (a, b), mode=mode)
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(got[i][j], ref[i][j])
        diag = tj.hessian_diagonal(f, (a, b), mode=mode)
        torch.testing.assert_close(diag[0], ref[0][0].diagonal(dim1=-2, dim2=-1))
        torch.testing.assert_close(diag[1], ref[1][1].diagonal(dim1=-2, dim2=-1))
        lap = tj.laplacian(f, (a, b), mode=mode)
        torch.testing.assert_close(lap, diag[0].sum(-1) + diag[1].sum(-1))
    got_d = tj.hessian(lambda d: f(d["a"], d["b"]), {"a": a, "b": b})
    torch.testing.assert_close(got_d["b"]["a"], ref[1][0])


def test_chunked_and_looped_nested_ad_agree(gen: torch.Generator) -> None:
    f = mlp(gen, (3, 5, 2))
    x = randn(4, 3, gen=gen)
    h = vmap(hessian(f))(x)
    for chunk in (1, 4):
        torch.testing.assert_close(tj.hessian(f, x, batch_dim=0, mode="fwd", chunk_size=chunk), h)
