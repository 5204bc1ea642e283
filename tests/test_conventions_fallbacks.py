"""Fallbacks: at most one FallbackWarning per call, naming the function; results still exact."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from conventions_cases import FUNCTIONAL, _unchanged
from graph_cases import ItemSin
from torch import Tensor, nn

import torchjac as tj


class _NewExp(torch.autograd.Function):
    """exp with a backward but neither a jvp nor a vmap rule."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.exp()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * x.exp()


class _OldExp(torch.autograd.Function):
    """exp in the classic style (``forward(ctx, x)``, no ``setup_context``): torch.func refuses it,
    nested ``torch.autograd.grad`` differentiates it twice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.exp()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * x.exp()


def _exp_oracle(name: str, x: Tensor) -> Tensor:
    def f(x: Tensor) -> Tensor:
        return x.exp().sum(-1) * x[..., 0]

    h = torch.func.vmap(torch.func.hessian(f))(x)
    return {
        "jacobian": torch.func.vmap(torch.func.jacrev(f))(x),
        "hessian": h,
        "hessian_diagonal": h.diagonal(dim1=-2, dim2=-1),
        "laplacian": h.diagonal(dim1=-2, dim2=-1).sum(-1),
    }[name]


def _run_custom(fn: type[torch.autograd.Function], name: str, mode: str) -> None:
    x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)

    def f(x: Tensor) -> Tensor:
        return fn.apply(x).sum(-1) * x[..., 0]

    with _unchanged((x,)):
        got = getattr(tj, name)(f, x, batch_dim=0, mode=mode)
    torch.testing.assert_close(got, _exp_oracle(name, x))


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_fallback_warns_at_most_once(name: str, mode: str) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _run_custom(_NewExp, name, mode)
    assert all(issubclass(w.category, tj.FallbackWarning) for w in record), record
    # reverse rows of `jacobian` need neither forward AD nor vmap over the function
    assert len(record) == (0 if (name, mode) == ("jacobian", "rev") else 1), record
    for w in record:
        assert re.match(rf"{name}\b", str(w.message)), str(w.message)


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_classic_autograd_function_is_differentiated(name: str, mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tj.FallbackWarning)  # a fallback is allowed here
        _run_custom(_OldExp, name, mode)


class _Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.a = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(ItemSin.apply(x * self.a))


@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("name", ["jac", "gramian", "param_jacobian", "ntk"])
def test_graph_and_module_fallbacks_warn_at_most_once(name: str, batch_dim: Any) -> None:
    x = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(4, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if name in ("jac", "gramian"):
            xr = x.clone().requires_grad_(True)
            got = getattr(tj, name)(ItemSin.apply(xr), xr, batch_dim=batch_dim, mode="rev")
            j = torch.diag_embed(x.cos()) if batch_dim == 0 else torch.diag(x.cos().flatten())
            j = j if batch_dim == 0 else j.reshape(4, 3, 4, 3)
            want = j if name == "jac" else (j * j if batch_dim == 0 else j.pow(2))
            torch.testing.assert_close(got, want)
        elif name == "param_jacobian":
            got = tj.param_jacobian(_Breaks().double(), x, batch_dim=batch_dim)
            assert list(got) == ["a", "lin.weight", "lin.bias"]
        else:
            tj.ntk(_Breaks().double(), x, batch_dim=0 if batch_dim is None else batch_dim)
    assert len(record) <= 1, [str(w.message) for w in record]
    for w in record:
        assert issubclass(w.category, tj.FallbackWarning)
        assert re.match(rf"{name}\b", str(w.message)), str(w.message)


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("mode", ["auto", "fwd"])
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_no_grad_block_is_a_constant_in_every_mode(name: str, mode: str, chunk_size: Any) -> None:
    """NOTE [forward mode and no_grad]: a value computed under ``torch.no_grad()`` is a constant
    for autograd (rows); forward mode differentiated through it, so jvp columns (jacobian
    ``fwd``/``auto``) and forward over reverse (``mode="fwd"``) were off by its share (0.1 to
    0.2): they fall back to reverse mode, with one FallbackWarning."""
    w = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)

    def f(x: Tensor) -> Tensor:
        with torch.no_grad():
            s = x.sum(-1, keepdim=True)
        return (x @ w.T).tanh() * s

    x = torch.linspace(-0.5, 0.7, 9, dtype=torch.float64).reshape(3, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = getattr(tj, name)(f, x, batch_dim=0, mode=mode, chunk_size=chunk_size)
    want = getattr(tj, name)(f, x, batch_dim=0, mode="rev")
    torch.testing.assert_close(got, want)
    fallbacks = [c for c in caught if issubclass(c.category, tj.FallbackWarning)]
    assert len(fallbacks) == 1 if mode == "fwd" else len(fallbacks) <= 1
