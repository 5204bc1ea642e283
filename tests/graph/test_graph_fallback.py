"""``tj.jac`` fallbacks: vmap -> loop and columns -> rows stay exact and warn exactly once."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import randn
from graph_cases import ItemSin, SavedSin
from torch import Tensor
from torch.autograd.function import once_differentiable

import torchjac as tj


class OnceSin(SavedSin):
    """``sin`` whose backward cannot be differentiated: no columns by double backward."""

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * x.cos()


def _problem(fn: type[torch.autograd.Function], gen: torch.Generator) -> tuple[Tensor, ...]:
    """10 outputs of 2 inputs: "auto" picks columns (2 double backwards < 10 rows)."""
    w, x = randn(10, 2, gen=gen), randn(2, gen=gen, grad=True)
    return w @ fn.apply(x), x, w * x.detach().cos()


def _one_fallback_warning(record: Any, match: str) -> None:
    messages = [str(r.message) for r in record]
    assert len(messages) == 1, messages
    assert record[0].category is tj.FallbackWarning
    assert messages[0].startswith("jac: ") and match in messages[0]


@pytest.mark.parametrize("chunk_size", [None, 3, 10])
def test_item_in_backward_falls_back_to_a_loop_once(chunk_size: int | None, gen) -> None:
    y, x, expected = _problem(ItemSin, gen)
    with pytest.warns(tj.FallbackWarning) as record:
        got = tj.jac(y, x, mode="rev", chunk_size=chunk_size)
    _one_fallback_warning(record, "item")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_plain_loop_needs_no_fallback(gen) -> None:
    y, x, expected = _problem(ItemSin, gen)
    got = tj.jac(y, x, mode="rev", chunk_size=1)  # warnings are errors in this test run
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_item_in_backward_per_sample(gen) -> None:
    x = randn(5, 3, gen=gen, grad=True)
    y = ItemSin.apply(x) * 2
    with pytest.warns(tj.FallbackWarning) as record:
        got = tj.jac(y, x, batch_dim=0, mode="rev", chunk_size=3)
    _one_fallback_warning(record, "item")
    torch.testing.assert_close(got, torch.diag_embed(2 * x.detach().cos()))


def test_columns_then_loop_still_warns_once(gen) -> None:
    y, x, expected = _problem(ItemSin, gen)
    with pytest.warns(tj.FallbackWarning) as record:
        got = tj.jac(y, x, mode="auto", chunk_size=3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    _one_fallback_warning(record, "")


@pytest.mark.parametrize("mode", ["auto", "fwd"])
def test_once_differentiable_columns_fall_back_to_rows(mode: str, gen) -> None:
    y, x, expected = _problem(OnceSin, gen)
    with pytest.warns(tj.FallbackWarning) as record:
        got = tj.jac(y, x, mode=mode)
    _one_fallback_warning(record, "rows")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class CutSin(SavedSin):
    """``sin`` whose backward leaves autograd (``detach``): its graph misses the cotangent."""

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g.detach() * x.cos()


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_a_backward_cut_from_its_cotangent_is_not_read_as_zero_columns(
    chunk_size: int | None, gen
) -> None:
    # J^T u still requires grad (through the second output), but not through the first one's u
    x = randn(3, gen=gen, grad=True)
    ys = [CutSin.apply(x) * 2, x**2]
    expected = torch.cat([torch.diag(2 * x.detach().cos()), torch.diag(2 * x.detach())])
    with pytest.warns(tj.FallbackWarning) as record:
        got = tj.jac(ys, x, mode="fwd", chunk_size=chunk_size)
    _one_fallback_warning(record, "not differentiable")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("door", ["jac", "gramian", "operator"])
def test_once_differentiable_beside_a_penalty_is_not_read_as_partial_columns(
    door: str, gen
) -> None:
    # the penalty's path reaches the cotangent, the custom Function's is silently cut: columns
    # would miss it, so they fall back to rows
    x = randn(3, gen=gen, grad=True)
    w = randn(4, 3, gen=gen)

    def outputs() -> Tensor:
        return w @ OnceSin.apply(x) + 0.1 * (x**2).sum()

    want = w * x.detach().cos() + 0.2 * x.detach()
    with pytest.warns(tj.FallbackWarning, match="not differentiable"):
        if door == "jac":
            got = tj.jac(outputs(), x, mode="fwd")
        elif door == "gramian":
            got = tj.gramian(outputs(), x, mode="fwd")
            want = want @ want.T
        else:
            v = randn(3, 2, gen=gen)
            got = tj.JacobianOperator.from_graph(outputs(), x) @ v
            want = want @ v
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


class DiffSin(SavedSin):
    """``sin`` with a differentiable backward of its own."""

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * x.cos()


def test_once_differentiable_upstream_of_the_input_keeps_the_columns(gen) -> None:
    # forces from an @once_differentiable backward (create_graph): its Error node lies upstream
    # of the input h, on no path from the outputs to h, so the columns need no fallback
    a, v = randn(3, gen=gen, grad=True), randn(3, gen=gen, grad=True)
    (h,) = torch.autograd.grad(OnceSin.apply(a), a, v, create_graph=True)
    w = randn(10, 3, gen=gen)
    y = w @ DiffSin.apply(h)
    want = w * h.detach().cos()
    for mode in ("fwd", "auto"):  # warnings are errors in this test run
        got = tj.jac(y, h, mode=mode, retain_graph=True)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_once_differentiable_rows_need_no_fallback(gen) -> None:
    y, x, expected = _problem(OnceSin, gen)
    torch.testing.assert_close(tj.jac(y, x, mode="rev"), expected, rtol=1e-12, atol=1e-12)


def test_a_failure_of_the_loop_too_is_raised_as_it_is(gen) -> None:
    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Tensor) -> Tensor:
            return x * 1

        @staticmethod
        def backward(ctx: Any, g: Tensor) -> Tensor:
            raise ArithmeticError("the user's own bug")

    x = randn(3, gen=gen, grad=True)
    with pytest.raises(ArithmeticError, match="the user's own bug"):
        tj.jac(Broken.apply(x) * 2, x, mode="rev", chunk_size=1)


class DetachedTwice(torch.autograd.Function):
    """``2 x`` whose backward leaves autograd (``detach``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        return 2 * g.detach()


@pytest.mark.parametrize("chunk_size", [None, 3, 1])
def test_a_cut_backward_of_one_input_is_not_hidden_by_another_input(
    chunk_size: int | None, gen
) -> None:
    # x2 reaches y2's dummy normally; x1's backward to y2 is cut: a probe chunk spanning both
    # inputs must not read x1's columns of y2 as zeros.
    x1, x2 = randn(3, gen=gen, grad=True), randn(3, gen=gen, grad=True)
    ys = [x1.sin(), DetachedTwice.apply(x1) + x2**2]
    a, b = x1.detach(), x2.detach()
    expected = torch.func.jacfwd(lambda a, b: torch.cat([a.sin(), 2 * a + b**2]), (0, 1))(a, b)
    with pytest.warns(tj.FallbackWarning) as record:
        got = tj.jac(ys, [x1, x2], mode="fwd", chunk_size=chunk_size)
    _one_fallback_warning(record, "columns by double backward failed, computed rows")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_torch_func_vmap_serves_where_functorch_primitives_are_missing(
    gen, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:  # type: ignore[no-untyped-def]
    # NOTE [lean vmap]: both ways of vmapping the probes give the same Jacobian, with an input
    # the outputs do not reach read as zeros on both
    from torchjac._engine.core import lean_vmap

    x, unused = randn(5, gen=gen).requires_grad_(True), randn(2, gen=gen).requires_grad_(True)
    y = torch.stack([x.sin().sum(), (x**2).prod(), x.tanh().mean()])
    calls = []
    vmap_first = lean_vmap.vmap_first

    def counted(fn):  # type: ignore[no-untyped-def]
        calls.append(lean_vmap._F is not None)
        return vmap_first(fn)

    monkeypatch.setattr(lean_vmap, "vmap_first", counted)
    kw: dict[str, Any] = {"mode": mode, "allow_unused": True, "chunk_size": 3}
    lean = tj.jac(y, [x, unused], retain_graph=True, **kw)
    monkeypatch.setattr(lean_vmap, "_F", None)
    plain = tj.jac(y, [x, unused], **kw)
    assert True in calls and False in calls  # the probes ran vectorised, both ways
    want = torch.func.jacrev(
        lambda a: torch.stack([a.sin().sum(), (a**2).prod(), a.tanh().mean()])
    )(x.detach())
    for got in (lean, plain):
        torch.testing.assert_close(got[0], want)
        torch.testing.assert_close(got[1], torch.zeros(3, 2, dtype=want.dtype))


@pytest.mark.filterwarnings("ignore::torchjac.FallbackWarning")
def test_group_norm_on_channels_last_falls_back_instead_of_freeing() -> None:
    """vmap cannot run ``group_norm``'s backward on a channels-last input (torch: ``NYI: querying
    is_contiguous inside of vmap``): the one pass that frees the graph must not be taken there,
    or its failure cannot be retried (it raised, ``retain_graph=False``)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 1), torch.nn.GroupNorm(2, 4), torch.nn.Tanh(), torch.nn.Flatten()
    )
    net = net.double().to(memory_format=torch.channels_last)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    params = list(net.parameters())
    want = torch.func.jacrev(
        lambda ps: torch.func.functional_call(net, dict(zip(dict(net.named_parameters()), ps)), x)
    )(tuple(p.detach() for p in params))
    rows = torch.cat([w.reshape(72, -1) for w in want], 1)
    losses = net(x)[:, :2]
    got = tj.jac(losses, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w[:, :2].reshape(4, -1).reshape(g.shape))
    losses = net(x).pow(2).sum(1)
    lw = torch.cat([(2 * net(x).detach().reshape(2, 36, 1) * rows.reshape(2, 36, -1)).sum(1)], 1)
    torch.testing.assert_close(tj.gramian(losses, params), lw @ lw.T)
