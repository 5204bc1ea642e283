"""In-place writes through aliases, in-place ops by keyword, and in-place ops under the Taylor
tape (second review of NOTE [batch proof]): coupled functions raise, per-sample ones are exact.

The Taylor mode holds copies where torch has views: an op that returns its input itself or a
view of it must mark both as aliased, so that a later in-place write stops the Taylor mode
instead of reaching only one of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import randn, second_order_oracle
from torch import Tensor
from torch.func import hessian, jacrev, vmap

import torchjac as tj

FNS = [tj.jacobian, tj.laplacian, tj.hessian_diagonal, tj.hessian]

ALIASES: dict[str, Callable[[Tensor], Tensor]] = {
    "positive()": lambda t: t.positive(),
    "unary plus": lambda t: +t,
    "cpu()": lambda t: t.cpu(),
    "conj()": lambda t: t.conj(),
    "dropout in eval": lambda t: F.dropout(t, 0.5, False),
    "broadcast_to": lambda t: t.broadcast_to(t.shape),
    "einsum identity": lambda t: torch.einsum("ij->ij", t),
}


def _through(alias: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def f(x: Tensor) -> Tensor:
        y = x.sin()
        alias(y).add_(alias(x.flip(0)))
        return y

    return f


def _mode(fn) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"mode": "fwd"} if fn is tj.jacobian else {}


@pytest.mark.parametrize("name", list(ALIASES))
@pytest.mark.parametrize("fn", FNS)
def test_coupling_written_through_an_alias_is_caught(name: str, fn) -> None:  # type: ignore[no-untyped-def]
    x = randn(3, 1, gen=torch.Generator().manual_seed(0))
    with pytest.raises(tj.BatchCouplingError):
        fn(_through(ALIASES[name]), x, batch_dim=0, **_mode(fn))


def _clamp_by_keyword(x: Tensor) -> Tensor:
    y = x.sin()
    torch.clamp_(input=y, min=x.flip(0))
    return y


def mul(a: Tensor, b: Tensor) -> Tensor:
    """A user's function that takes part in the torch-function protocol and is named ``mul``."""
    if torch.overrides.has_torch_function((a, b)):
        return torch.overrides.handle_torch_function(mul, (a, b), a, b)
    return a * b.flip(0)


@pytest.mark.parametrize("fn", FNS)
@pytest.mark.parametrize("func", [_clamp_by_keyword, lambda x: mul(x.sin(), x)])
def test_coupling_by_keyword_target_or_a_homonym_is_caught(fn, func) -> None:  # type: ignore[no-untyped-def]
    x = randn(3, 1, gen=torch.Generator().manual_seed(1))
    with pytest.raises(tj.BatchCouplingError):
        fn(func, x, batch_dim=0, **_mode(fn))


def _scaled_through_positive(x: Tensor) -> Tensor:
    y = x.sin()
    y.positive().mul_(2)
    return y


def _sin_by_keyword(x: Tensor) -> Tensor:
    y = x.sin()
    torch.sin_(input=y)
    return y


def _inplace_after_a_second_order_source(x: Tensor) -> Tensor:
    y = x.sin()
    y.mul_(2)  # sin is a second-order source of the tape: the tape must not see the new value
    z = x * 3.0 - 1
    F.relu(z, inplace=True)
    w = z * 1.0
    w **= 2
    return y + w


def _shape_then_inplace(x: Tensor) -> Tensor:
    y = x.sin()
    y.mul_(float(y.shape[-1]) + 1)  # reading .shape marks nothing as aliased
    return y


@pytest.mark.parametrize(
    "func",
    [
        _scaled_through_positive,
        _sin_by_keyword,
        _inplace_after_a_second_order_source,
        _shape_then_inplace,
    ],
)
def test_in_place_values_are_exact(func: Callable[[Tensor], Tensor]) -> None:
    x = randn(3, 1, gen=torch.Generator().manual_seed(2))
    if func is _scaled_through_positive:  # a write through an alias: nested AD, warned
        with pytest.warns(tj.FallbackWarning, match="shares memory with a view"):
            tj.laplacian(func, x, batch_dim=0)
        warnings.simplefilter("ignore", tj.FallbackWarning)
    _every_order_agrees(func, x)


@torch.jit.script
def _doubled_in_place(h: Tensor) -> Tensor:
    h.mul_(2.0)
    return h


def _written_by_script(x: Tensor) -> Tensor:
    h = x.sin()
    _doubled_in_place(h)  # torch calls inside TorchScript reach no torch-function handler
    return (h * x).tanh()


def _written_unseen(x: Tensor) -> Tensor:
    h = x.sin()
    with torch._C.DisableTorchFunction():
        h.mul_(2.0)
    return (h * x).tanh()


@pytest.mark.filterwarnings("ignore::torchjac.FallbackWarning")
@pytest.mark.parametrize("func", [_written_by_script, _written_unseen])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "general"])
def test_a_write_the_taylor_mode_cannot_see_stops_it(
    func: Callable[[Tensor], Tensor], fast: bool
) -> None:
    # NOTE [taylor check]: found in review: the write changed the value, not its derivatives
    from torchjac._engine.core.fast import fast_paths

    x = randn(4, 3, gen=torch.Generator().manual_seed(3))
    with fast_paths(fast):
        _every_order_agrees(func, x, mode="auto")


class _Keeps(torch.nn.Module):
    """A model that keeps a detached activation, as feature extraction and logging do."""

    def __init__(self, data: bool) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)
        self.kept: list[Tensor] = []
        self.data = data

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        self.kept.append(h.data if self.data else h.detach())
        return self.b(h * h.detach())  # the detached factor is a constant


@pytest.mark.parametrize("data", [False, True], ids=["detach", "data"])
@pytest.mark.parametrize("fn", FNS)
def test_a_detached_value_is_a_plain_tensor(fn, data: bool) -> None:  # type: ignore[no-untyped-def]
    """``detach`` (or ``.data``) on a Jet gives a plain tensor: the value the model keeps is an
    ordinary tensor after the call (it was a Jet, carrying the Taylor coefficients, whose
    products with parameters no longer built a graph), and it is a constant for the
    derivatives."""
    torch.manual_seed(0)
    model = _Keeps(data).double()
    x = randn(3, 2, gen=torch.Generator().manual_seed(1))
    got = fn(model, x, batch_dim=0)
    kept = model.kept[-1]
    assert type(kept) is Tensor and type(kept * 2) is Tensor
    torch.testing.assert_close(kept, torch.tanh(model.a(x)).detach())
    assert torch.nn.Linear(4, 1).double()(kept).requires_grad

    def one(z: Tensor) -> Tensor:
        h = torch.tanh(model.a(z))
        return model.b(h * h.detach())

    second = vmap(hessian(one))(x)
    want = {
        tj.jacobian: vmap(jacrev(one))(x),
        tj.hessian: second,
        tj.hessian_diagonal: second.diagonal(dim1=-2, dim2=-1),
        tj.laplacian: second.diagonal(dim1=-2, dim2=-1).sum(-1),
    }[fn]
    torch.testing.assert_close(got, want)


def _written_from_a_scalar(width: int) -> Callable[[Tensor], Tensor]:
    m = randn(2, width, gen=torch.Generator().manual_seed(3))

    def f(x: Tensor) -> Tensor:
        h = torch.tanh(x @ m)
        g = h * 1.0
        g.copy_(torch.tensor(0.5, dtype=x.dtype))  # a 0-d source, broadcast over [B, width]
        return (h * (g + 1.0)).sum(-1)

    return f


@pytest.mark.parametrize("width", [3, 4, 5, 6])
def test_a_write_from_a_smaller_source_broadcasts_as_a_value(width: int) -> None:
    """An in-place write from a source of fewer dimensions broadcasts its coefficients as its
    value broadcasts: a 0-d source's stack ``[K]`` was aligned with the target's last dimension,
    which went through silently (and wrongly) when that dimension has ``K`` elements (3 for a
    first order in 2 inputs, 4 for a trace, 5 for a diagonal, 6 for a Hessian)."""
    func = _written_from_a_scalar(width)
    x = randn(4, 2, gen=torch.Generator().manual_seed(4))
    _every_order_agrees(func, x)


@pytest.mark.parametrize("width", [3, 4, 5, 6])
def test_an_item_assigned_from_a_smaller_value_broadcasts_as_a_value(width: int) -> None:
    """``h[1] = s`` with a 0-d ``s`` carrying derivatives: its stack ``[K]`` was aligned with the
    row's ``width`` elements, silently wrong when ``width == K`` (an unbatched input of 2:
    3 for a first order, 4 for a trace, 5 for a diagonal, 6 for a Hessian)."""
    m = randn(2, width, gen=torch.Generator().manual_seed(5))

    def f(x: Tensor) -> Tensor:
        h = torch.tanh(torch.stack([x @ m, (2 * x) @ m, x.sin() @ m])) * 1.0
        h[1] = (x**2).sum()
        return (h**2).sum()

    x = randn(2, gen=torch.Generator().manual_seed(6))
    _every_order_agrees(f, x, batched=False)


def _every_order_agrees(
    func: Callable[[Tensor], Tensor], x: Tensor, batched: bool = True, mode: str = "fwd"
) -> None:
    """``jacobian`` (in ``mode``), ``laplacian``, ``hessian_diagonal`` and ``hessian`` of ``func``
    at ``x`` (per sample when ``batched``) against ``torch.func``."""
    per = {"batch_dim": 0} if batched else {}
    for name in ("jacobian", "laplacian", "hessian_diagonal", "hessian"):
        got = getattr(tj, name)(func, x, **per, **({"mode": mode} if name == "jacobian" else {}))
        torch.testing.assert_close(got, second_order_oracle(name, func, x, batched), msg=name)
