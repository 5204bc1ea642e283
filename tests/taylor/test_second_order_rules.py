"""Second-order rules for activations, normalisations and in-place writes against ``torch.func``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randn
from test_functional import _one_fallback
from torch import Tensor
from torch.func import hessian

import torchjac as tj


def _writes_through_a_view(x: Tensor) -> Tensor:
    h = x * 2
    v = h[:, 0]
    h.mul_(3)  # v sees this write
    return (v * h.sum(-1)).sin()


def _item_assignment(x: Tensor) -> Tensor:
    y = x.clone()
    y[:, 0] = 0.5 * x[:, 1] ** 2
    return y.tanh().sum(-1)


def _inplace_relu(x: Tensor) -> Tensor:
    h = F.linear(x, torch.linspace(-1, 1, 15, dtype=x.dtype).view(5, 3))
    torch.relu_(h)
    return (h**2).sum(-1) + h.exp().sum(-1)


@pytest.mark.parametrize("func", [_writes_through_a_view, _item_assignment, _inplace_relu])
def test_in_place_writes_are_followed_or_handed_to_nested_ad(gen: torch.Generator, func) -> None:  # type: ignore[no-untyped-def]
    x = randn(4, 3, gen=gen)
    h = torch.stack([hessian(lambda r: func(r.unsqueeze(0))[0])(x[b]) for b in range(4)])
    diag = h.diagonal(dim1=-2, dim2=-1)
    aliased = func is _writes_through_a_view
    for fn, ref in [(tj.hessian_diagonal, diag), (tj.laplacian, diag.sum(-1))]:
        if aliased:  # the Taylor mode cannot follow a write through a view: nested AD
            with pytest.warns(tj.FallbackWarning, match="view") as record:
                got = fn(func, x, batch_dim=0)
            _one_fallback(record)
        else:
            got = fn(func, x, batch_dim=0)
        torch.testing.assert_close(got, ref)
    torch.testing.assert_close(tj.hessian(func, x, batch_dim=0, mode="rev"), h)


ACTIVATIONS = {
    "softplus_beta_threshold": lambda x: F.softplus(x, 2.0, 5.0).sum(-1),
    "gelu": lambda x: F.gelu(x).sum(-1),
    "gelu_tanh_general_rule": lambda x: F.gelu(x, approximate="tanh").sum(-1),
    "pow_1.5": lambda x: (x.abs() + 1).pow(1.5).sum(-1),
    "cube": lambda x: (x**3).sum(-1),
    "square_times_sum": lambda x: torch.square(x).sum(-1) * x.sum(-1),
    "silu_product": lambda x: F.silu(x).prod(-1),
    "sigmoid_log_relu": lambda x: (x.sigmoid() + F.relu(x) + 1).log().cos().sum(-1),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_rules_match_torch_func(gen: torch.Generator, name: str) -> None:
    f = ACTIVATIONS[name]
    x = 4 * randn(6, 3, gen=gen)
    h = torch.stack([hessian(lambda r: f(r.unsqueeze(0))[0])(x[b]) for b in range(6)])
    diag = h.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(f, x, batch_dim=0), diag)
    torch.testing.assert_close(tj.laplacian(f, x, batch_dim=0), diag.sum(-1))
    rest = x[:, 2:]
    got = tj.hessian(lambda r: f(torch.cat([r, rest], dim=-1)), x[:, :2], batch_dim=0)
    torch.testing.assert_close(got, _h2(f, x))


def _h2(f, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    """Hessians in the first two coordinates (a two-input problem: full Taylor jets)."""
    rest = x[:, 2:]

    def g(r: Tensor, b: int) -> Tensor:
        return f(torch.cat([r, rest[b]]).unsqueeze(0))[0]

    return torch.stack([hessian(lambda r, b=b: g(r, b))(x[b, :2]) for b in range(x.shape[0])])


def _affine(n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.linspace(0.5, 1.5, n, dtype=dtype), torch.linspace(-0.3, 0.3, n, dtype=dtype)


NORMS = {
    "F.layer_norm": lambda x: F.layer_norm(x, (8,), *_affine(8, x.dtype)).exp().sum(-1),
    "torch.layer_norm": lambda x: torch.layer_norm(x, (8,)).tanh().sum(-1),
    "F.instance_norm": lambda x: (
        F.instance_norm(
            x.view(-1, 2, 4), weight=_affine(2, x.dtype)[0], bias=_affine(2, x.dtype)[1]
        )
        .sin()
        .flatten(1)
        .sum(-1)
    ),
    "torch.batch_norm_eval": lambda x: (
        torch.batch_norm(
            x.view(-1, 2, 4),
            *_affine(2, x.dtype),
            *_affine(2, x.dtype)[::-1],
            False,
            0.1,
            1e-5,
            False,
        )
        .sin()
        .flatten(1)
        .sum(-1)
    ),
    "group_norm": lambda x: F.group_norm(x.view(-1, 4, 2), 2).tanh().flatten(1).sum(-1),
    "rms_norm": lambda x: F.rms_norm(x, (8,)).exp().sum(-1),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_normalisations_match_torch_func(gen: torch.Generator, name: str) -> None:
    """PyTorch's nested forward mode is wrong for some norms (pytorch#196700): decomposed."""
    f = NORMS[name]
    x = randn(5, 8, gen=gen)
    h = torch.stack([hessian(lambda r: f(r.unsqueeze(0))[0])(x[b]) for b in range(5)])
    diag = h.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(f, x, batch_dim=0), diag)
    torch.testing.assert_close(tj.laplacian(f, x, batch_dim=0), diag.sum(-1))


@pytest.mark.parametrize("lazy", [True, False], ids=["seed-linear", "written-first-order"])
def test_tape_sources_near_float32_range(lazy: bool) -> None:
    """NOTE [taylor tape]: ``g·φ''`` alone overflows float32 here (exp(80)·1e6), the diagonal
    does not (found in review: inf, and NaN for a zero direction). A written source is scaled by
    φ'' first; a broadcast one meets ``g·φ''`` in float64."""
    w1 = torch.tensor([[0.0, 1e-15]])
    b1, w2 = torch.tensor([80.0]), torch.tensor([[1e6]])

    def f(x: Tensor) -> Tensor:
        return F.linear(torch.exp(F.linear(x if lazy else x + 0.0, w1, b1)), w2)

    got = tj.hessian_diagonal(f, torch.zeros(3, 2), batch_dim=0)
    want = torch.tensor([0.0, 1e-24], dtype=torch.float64) * torch.tensor(80.0).double().exp()
    torch.testing.assert_close(got[:, 0].double(), want.expand(3, 2), rtol=1e-5, atol=0)


def test_inputs_without_elements_per_sample() -> None:
    """``[B, 0]`` inputs: empty derivatives, a zero Laplacian (found in review: an assertion)."""
    x = torch.zeros(3, 0, dtype=torch.float64)

    def f(x: Tensor) -> Tensor:
        return x.sum(-1, keepdim=True) + 1.0

    assert tj.jacobian(f, x, batch_dim=0).shape == (3, 1, 0)
    assert tj.hessian(f, x, batch_dim=0).shape == (3, 1, 0, 0)
    assert tj.hessian_diagonal(f, x, batch_dim=0).shape == (3, 1, 0)
    torch.testing.assert_close(tj.laplacian(f, x, batch_dim=0), torch.zeros(3, 1).double())


@pytest.mark.parametrize("batched", [True, False], ids=["batch", "one-sample"])
def test_linear_with_a_one_d_weight(gen: torch.Generator, batched: bool) -> None:
    """``F.linear(x, w)`` with a 1-d ``w`` drops the last dimension (found in review: an extra
    dimension, then a crash in ``hessian_diagonal``)."""
    w = randn(3, gen=gen)

    def f(x: Tensor) -> Tensor:
        return torch.tanh(F.linear(x, w))

    x = randn(4, 3, gen=gen) if batched else randn(3, gen=gen)
    kw = {"batch_dim": 0} if batched else {}
    want = torch.func.vmap(hessian(f))(x) if batched else hessian(f)(x)
    torch.testing.assert_close(tj.hessian(f, x, **kw), want)
    diag = want.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(f, x, **kw), diag)
    torch.testing.assert_close(tj.laplacian(f, x, **kw), diag.sum(-1))


def _aten_mul_(x: Tensor) -> Tensor:
    h = F.linear(x, torch.linspace(-1, 1, 15, dtype=x.dtype).view(5, 3))
    torch.ops.aten.mul_.Tensor(h, torch.tensor(2.0, dtype=x.dtype))
    return h.tanh().sum(-1)


def _aten_tanh_(x: Tensor) -> Tensor:
    h = x * torch.linspace(0.5, 1.5, 3, dtype=x.dtype)
    torch.ops.aten.tanh_.default(h)
    return (h * h.sin()).sum(-1)


def _aten_view_then_write(x: Tensor) -> Tensor:
    h = x * 2
    v = torch.ops.aten.select.int(h, 1, 0)
    h.mul_(3)  # v sees this write
    return (v * h.sum(-1)).sin()


@pytest.mark.filterwarnings("ignore::torchjac.FallbackWarning")
@pytest.mark.parametrize("func", [_aten_mul_, _aten_tanh_, _aten_view_then_write])
@pytest.mark.parametrize("name", ["jacobian", "hessian", "hessian_diagonal", "laplacian"])
def test_torch_ops_overloads_are_read_as_the_ops_they_name(
    gen: torch.Generator, name: str, func: object
) -> None:
    # ``torch.ops.aten.mul_.Tensor`` writes in place as ``Tensor.mul_`` does, ``select.int``
    # makes a view as ``Tensor.select`` does
    x = randn(4, 3, gen=gen)
    g = lambda r: func(r.unsqueeze(0))[0]  # type: ignore[operator]  # noqa: E731
    jac = torch.stack([torch.func.jacrev(g)(x[b]) for b in range(4)])
    h = torch.stack([hessian(g)(x[b]) for b in range(4)])
    diag = h.diagonal(dim1=-2, dim2=-1)
    ref = {"jacobian": jac, "hessian": h, "hessian_diagonal": diag, "laplacian": diag.sum(-1)}
    torch.testing.assert_close(getattr(tj, name)(func, x, batch_dim=0), ref[name])
