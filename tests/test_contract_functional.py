"""``jacobian``, ``hessian``, ``hessian_diagonal``, ``laplacian``: layouts and containers."""

from __future__ import annotations

import pytest
import torch
from conftest import randn
from torch import Tensor
from torch.func import hessian, jacfwd, jacrev, vmap

import torchjac as tj


def _g(x: Tensor, w: Tensor) -> Tensor:
    """[2] output of x [3] and w [2, 2]: smooth, every second derivative nonzero."""
    return torch.stack(
        [(x.sin() * w[0, 0]).sum() + (x**2).prod() * w[1].sum(), (x * w.sum()).exp().sum()]
    )


def test_jacobian_containers_and_values(gen: torch.Generator) -> None:
    x, w = randn(3, gen=gen), randn(2, 2, gen=gen)
    ox, ow = jacrev(_g, argnums=(0, 1))(x, w)
    single = tj.jacobian(lambda t: _g(t, w), x)
    assert isinstance(single, Tensor) and single.shape == (2, 3)
    torch.testing.assert_close(single, ox)
    for inputs in ((x, w), [x, w]):
        got = tj.jacobian(_g, inputs)
        assert type(got) is tuple and len(got) == 2
        assert got[0].shape == (2, 3) and got[1].shape == (2, 2, 2)
        torch.testing.assert_close(got[0], ox)
        torch.testing.assert_close(got[1], ow)
    got = tj.jacobian(lambda d: _g(d["x"], d["w"]), {"w": w, "x": x})
    assert type(got) is dict and list(got) == ["w", "x"]
    torch.testing.assert_close(got["x"], ox)
    torch.testing.assert_close(got["w"], ow)


def test_jacobian_sequence_outputs_and_aux(gen: torch.Generator) -> None:
    x = randn(3, gen=gen)

    def f(x: Tensor) -> tuple[list[Tensor], str]:
        return [x.sin(), (x**2).sum(), torch.outer(x, x)[:1]], "aux"

    jac, aux = tj.jacobian(f, x, has_aux=True)
    assert aux == "aux"
    assert jac.shape == (3 + 1 + 3, 3)

    def flat(x: Tensor) -> Tensor:
        return torch.cat([t.reshape(-1) for t in f(x)[0]])

    torch.testing.assert_close(jac, jacrev(flat)(x))


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_jacobian_batch_dim(gen: torch.Generator, mode: str) -> None:
    x, a = randn(4, 3, gen=gen), randn(2, 5, 3, gen=gen)

    def f(x: Tensor) -> Tensor:
        return torch.einsum("cdi,bi->bcd", a, x.tanh()) * x[:, :1, None]  # [B, 2, 5]

    got = tj.jacobian(f, x, batch_dim=0, mode=mode)
    assert got.shape == (4, 2, 5, 3)
    torch.testing.assert_close(got, vmap(jacrev(lambda s: f(s[None])[0]))(x))


def _h(x: Tensor) -> Tensor:
    """[2, 2] output of x [3]."""
    s = x.sin()
    return torch.stack([s * x[0] ** 2, (x**3).sum() * s.cos()])[:, :2]


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_hessian_layout(gen: torch.Generator, mode: str) -> None:
    x = randn(3, gen=gen)
    got = tj.hessian(_h, x, mode=mode)
    assert got.shape == (2, 2, 3, 3)
    torch.testing.assert_close(got, hessian(_h)(x))


def test_hessian_several_inputs_nested_containers(gen: torch.Generator) -> None:
    x, w = randn(3, gen=gen), randn(2, 2, gen=gen)
    want = hessian(_g, argnums=(0, 1))(x, w)
    got = tj.hessian(_g, (x, w))
    assert type(got) is tuple and all(type(r) is tuple and len(r) == 2 for r in got)
    assert got[0][1].shape == (2, 3, 2, 2) and got[1][0].shape == (2, 2, 2, 3)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(got[i][j], want[i][j])
    got_d = tj.hessian(lambda d: _g(d["x"], d["w"]), {"x": x, "w": w})
    assert type(got_d) is dict and list(got_d) == ["x", "w"]
    assert type(got_d["x"]) is dict and list(got_d["x"]) == ["x", "w"]
    torch.testing.assert_close(got_d["w"]["x"], want[1][0])


def test_hessian_batch_dim(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    got = tj.hessian(lambda x: _hb(x), x, batch_dim=0)
    assert got.shape == (4, 2, 3, 3)
    torch.testing.assert_close(got, vmap(hessian(lambda s: _hb(s[None])[0]))(x))


def _hb(x: Tensor) -> Tensor:
    """Batched [B, 2] output of x [B, 3]."""
    return torch.stack([(x.sin() * x[:, :1] ** 2).sum(1), (x**3).sum(1) * x[:, 1].cos()], 1)


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_hessian_diagonal_layout(gen: torch.Generator, mode: str) -> None:
    x = randn(3, gen=gen)
    got = tj.hessian_diagonal(_h, x, mode=mode)
    assert got.shape == (2, 2, 3)
    torch.testing.assert_close(got, torch.diagonal(hessian(_h)(x), dim1=-2, dim2=-1))


def test_hessian_diagonal_containers_and_batch(gen: torch.Generator) -> None:
    x, w = randn(3, gen=gen), randn(2, 2, gen=gen)
    want = hessian(_g, argnums=(0, 1))(x, w)
    got = tj.hessian_diagonal(_g, (x, w))
    assert type(got) is tuple and got[0].shape == (2, 3) and got[1].shape == (2, 2, 2)
    torch.testing.assert_close(got[0], torch.diagonal(want[0][0], dim1=-2, dim2=-1))
    torch.testing.assert_close(
        got[1], torch.diagonal(want[1][1].reshape(2, 4, 4), dim1=-2, dim2=-1).reshape(2, 2, 2)
    )
    got_d = tj.hessian_diagonal(lambda d: _g(d["x"], d["w"]), {"w": w, "x": x})
    assert type(got_d) is dict and list(got_d) == ["w", "x"]
    xb = randn(4, 3, gen=gen)
    gb = tj.hessian_diagonal(_hb, xb, batch_dim=0)
    assert gb.shape == (4, 2, 3)
    hb = vmap(hessian(lambda s: _hb(s[None])[0]))(xb)
    torch.testing.assert_close(gb, torch.diagonal(hb, dim1=-2, dim2=-1))


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_laplacian_layout(gen: torch.Generator, mode: str) -> None:
    x = randn(3, gen=gen)
    got = tj.laplacian(_h, x, mode=mode)
    assert got.shape == (2, 2)
    torch.testing.assert_close(got, torch.diagonal(hessian(_h)(x), dim1=-2, dim2=-1).sum(-1))


def test_laplacian_sums_over_all_inputs_and_batch(gen: torch.Generator) -> None:
    x, w = randn(3, gen=gen), randn(2, 2, gen=gen)
    want = hessian(_g, argnums=(0, 1))(x, w)
    lap = torch.diagonal(want[0][0], dim1=-2, dim2=-1).sum(-1) + torch.diagonal(
        want[1][1].reshape(2, 4, 4), dim1=-2, dim2=-1
    ).sum(-1)
    got = tj.laplacian(_g, (x, w))
    assert isinstance(got, Tensor) and got.shape == (2,)
    torch.testing.assert_close(got, lap)
    xb = randn(4, 3, gen=gen)
    gb = tj.laplacian(_hb, xb, batch_dim=0)
    assert gb.shape == (4, 2)
    hb = vmap(hessian(lambda s: _hb(s[None])[0]))(xb)
    torch.testing.assert_close(gb, torch.diagonal(hb, dim1=-2, dim2=-1).sum(-1))


def test_fwd_jacobian_matches_jacfwd(gen: torch.Generator) -> None:
    x = randn(3, gen=gen)
    torch.testing.assert_close(tj.jacobian(_h, x, mode="fwd"), jacfwd(_h)(x))
