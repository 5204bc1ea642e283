"""``tj.jac`` and ``tj.gramian``: layout (rows, then columns), containers, graph options."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import randn
from torch import Tensor
from torch.func import jacrev, vmap

import torchjac as tj


def _f(x: Tensor, w: Tensor) -> Tensor:
    """[2, 3] output of x [4] and w [2, 2]."""
    a = torch.outer(w.sin().sum(1), x[:3]) + x.sum() * w.sum()
    return a * x[3]


def test_jac_one_output_rows_then_columns(gen: torch.Generator) -> None:
    x, w = randn(4, gen=gen, grad=True), randn(2, 2, gen=gen, grad=True)
    y = _f(x, w)
    jx, jw = tj.jac(y, (x, w), retain_graph=True)
    ox, ow = jacrev(_f, argnums=(0, 1))(x.detach(), w.detach())
    assert jx.shape == (2, 3, 4) and jw.shape == (2, 3, 2, 2)
    torch.testing.assert_close(jx, ox)
    torch.testing.assert_close(jw, ow)
    for mode in ("rev", "fwd"):
        torch.testing.assert_close(tj.jac(y, x, mode=mode, retain_graph=True), ox)


def test_jac_sequence_of_outputs_concatenates_rows(gen: torch.Generator) -> None:
    x = randn(3, gen=gen, grad=True)
    y1, y2, y3 = x[:2] * 2, torch.outer(x, x)[:2, :1] ** 2, (x**3).sum()
    got = tj.jac([y1, y2, y3], x)
    assert isinstance(got, Tensor) and got.shape == (5, 3)

    def cat(x: Tensor) -> Tensor:
        return torch.cat(
            [(x[:2] * 2), (torch.outer(x, x)[:2, :1] ** 2).reshape(-1), (x**3).sum().reshape(1)]
        )

    torch.testing.assert_close(got, jacrev(cat)(x.detach()))


def test_jac_jac_outputs_left_multiplies(gen: torch.Generator) -> None:
    x, w = randn(4, gen=gen, grad=True), randn(2, 2, gen=gen, grad=True)
    y = _f(x, w)
    v = randn(5, 2, 3, gen=gen)
    got = tj.jac(y, x, v, retain_graph=True)
    full = jacrev(_f)(x.detach(), w.detach())
    assert got.shape == (5, 4)
    torch.testing.assert_close(got, torch.einsum("kab,abi->ki", v, full))
    # sequence of outputs: one [k] + y_i.shape factor each, rows summed
    y2 = x.prod().reshape(())
    v2 = randn(5, gen=gen)
    got2 = tj.jac([y, y2], x, [v, v2])
    want2 = torch.einsum("kab,abi->ki", v, full) + v2[:, None] * jacrev(torch.prod)(x.detach())
    torch.testing.assert_close(got2, want2)


@pytest.mark.parametrize("batch_dim", [0, 1, -1])
def test_jac_batch_dim_is_batch_first(gen: torch.Generator, batch_dim: int) -> None:
    # x [4, B=3] at dim 1, y [2, B, 5] at dim 1 (batch_dim=-1 uses x [B, 4] and y [5, B]).
    b = 3
    if batch_dim == 1:
        x = randn(4, b, gen=gen, grad=True)
        a = randn(2, 5, 4, gen=gen)

        def f(x: Tensor) -> Tensor:
            return torch.einsum("cdi,ib->cbd", a, x.tanh())

    elif batch_dim == 0:
        x = randn(b, 4, gen=gen, grad=True)
        a = randn(2, 5, 4, gen=gen)

        def f(x: Tensor) -> Tensor:
            return torch.einsum("cdi,bi->bcd", a, x.tanh())

    else:
        x = randn(4, b, gen=gen, grad=True)
        a = randn(5, 4, gen=gen)

        def f(x: Tensor) -> Tensor:
            return a @ x.tanh()  # [5, B]

    y = f(x)
    got = tj.jac(y, x, batch_dim=batch_dim)
    full = jacrev(f)(x.detach())  # y.shape + x.shape
    yd, xd = batch_dim % y.dim(), batch_dim % x.dim()
    # take the diagonal over the two batch dims, batch first
    moved = full.movedim((yd, y.dim() + xd), (0, 1))
    want = torch.diagonal(moved, dim1=0, dim2=1).movedim(-1, 0)
    out_rest = [s for i, s in enumerate(y.shape) if i != yd]
    in_rest = [s for i, s in enumerate(x.shape) if i != xd]
    assert got.shape == tuple([b, *out_rest, *in_rest])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["tensor", "list", "tuple", "dict", "generator"])
def test_jac_container_follows_inputs(gen: torch.Generator, kind: str) -> None:
    a, c = randn(3, gen=gen, grad=True), randn(2, gen=gen, grad=True)
    y = torch.cat([a.sin(), c.cos() * a[0]])
    inputs: Any
    if kind == "tensor":
        got = tj.jac(y, a)
        assert isinstance(got, Tensor) and got.shape == (5, 3)
        return
    if kind == "dict":
        inputs = {"z": c, "a": a}  # not alphabetical: order of the mapping
        got = tj.jac(y, inputs)
        assert type(got) is dict and list(got) == ["z", "a"]
        assert got["z"].shape == (5, 2) and got["a"].shape == (5, 3)
        return
    inputs = {"list": [a, c], "tuple": (a, c), "generator": (t for t in (a, c))}[kind]
    got = tj.jac(y, inputs)
    assert type(got) is tuple and len(got) == 2
    assert got[0].shape == (5, 3) and got[1].shape == (5, 2)


def test_jac_allow_unused(gen: torch.Generator) -> None:
    a, c = randn(3, gen=gen, grad=True), randn(2, gen=gen, grad=True)
    with pytest.raises(ValueError, match=r"jac\b.*inputs\[1\]"):
        tj.jac(a * 2, [a, c], retain_graph=True)
    ja, jc = tj.jac(a * 2, [a, c], allow_unused=True)
    torch.testing.assert_close(ja, 2 * torch.eye(3, dtype=a.dtype))
    assert jc.shape == (3, 2) and not jc.any()


def test_jac_create_graph_differentiable(gen: torch.Generator) -> None:
    x = randn(3, gen=gen, grad=True)
    j = tj.jac(x**3, x, create_graph=True)
    assert j.requires_grad
    (g,) = torch.autograd.grad(j.sum(), x)
    torch.testing.assert_close(g, 6 * x.detach())


def test_gramian_rows_plus_rows(gen: torch.Generator) -> None:
    x, w = randn(4, gen=gen, grad=True), randn(2, 2, gen=gen, grad=True)
    y = _f(x, w)
    got = tj.gramian(y, (x, w), retain_graph=True)
    ox, ow = jacrev(_f, argnums=(0, 1))(x.detach(), w.detach())
    jfull = torch.cat([ox.reshape(6, -1), ow.reshape(6, -1)], 1)
    assert got.shape == (2, 3, 2, 3)
    torch.testing.assert_close(got, (jfull @ jfull.T).reshape(2, 3, 2, 3))
    dict_got = tj.gramian(y, {"w": w, "x": x}, retain_graph=True)
    assert isinstance(dict_got, Tensor)  # summed over inputs: one Tensor
    torch.testing.assert_close(dict_got, got)
    seq = tj.gramian([y, x.sum()], x)
    jx = torch.cat([ox.reshape(6, 4), torch.ones(1, 4, dtype=x.dtype)])
    assert seq.shape == (7, 7)
    torch.testing.assert_close(seq, jx @ jx.T)


def test_gramian_batch_dim(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen, grad=True)
    a = randn(2, 5, 3, gen=gen)
    y = torch.einsum("cdi,bi->bcd", a, x.tanh())  # [B, 2, 5]
    got = tj.gramian(y, x, batch_dim=0)
    assert got.shape == (4, 2, 5, 2, 5)
    j = vmap(jacrev(lambda s: torch.einsum("cdi,i->cd", a, s.tanh())))(x.detach())
    torch.testing.assert_close(got, torch.einsum("bcdi,befi->bcdef", j, j))


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_gramian_sequence_per_sample(gen: torch.Generator, mode: str) -> None:
    x = randn(4, 3, gen=gen, grad=True)
    w = randn(3, 3, gen=gen)
    got = tj.gramian([torch.tanh(x @ w), (x**2).sum(-1)], x, batch_dim=0, mode=mode)

    def per(s: Tensor) -> Tensor:
        return torch.cat([torch.tanh(s @ w), (s**2).sum().reshape(1)])

    j = vmap(jacrev(per))(x.detach())  # [B, m=4, 3]
    assert got.shape == (4, 4, 4)
    torch.testing.assert_close(got, j @ j.transpose(1, 2))


@pytest.mark.parametrize("name", ["jac", "gramian"])
def test_retain_graph_keeps_the_graph(gen: torch.Generator, name: str) -> None:
    x = randn(3, gen=gen, grad=True)
    y = x.sin() * x.sum()
    getattr(tj, name)(y, x, retain_graph=True)
    (g,) = torch.autograd.grad(y.sum(), x)  # the graph is still there
    torch.testing.assert_close(g, jacrev(lambda x: (x.sin() * x.sum()).sum())(x.detach()))
