"""NOTE [batch proof]: a function proven per sample skips the coupling check; nothing else does.

Every coupled function below routes its coupling through ops that keep a batch dimension
somewhere (in-place writes, item assignment, transposes, reductions, concatenation, indexing,
elementwise ops of misaligned operands): each must still raise ``BatchCouplingError``, on a
batch small enough for every pair and on a large one. Per-sample functions built from the same
ops are proven (``func`` is called once) and agree with ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import randn
from torch import Tensor
from torch.func import jacrev, vmap

import torchjac as tj


def _inplace_mean(x: Tensor) -> Tensor:
    y = x * 1.0
    y += y.mean(0)
    return y.tanh()


def _setitem_other_sample(x: Tensor) -> Tensor:
    y = x * 1.0
    y[0] = y[1] * 2
    return y.sin()


def _where_flipped(x: Tensor) -> Tensor:
    return torch.where(x > 0, x, x.flip(0)).exp()


COUPLED: dict[str, Callable[[Tensor], Tensor]] = {
    "in-place add of a batch mean": _inplace_mean,
    "item assignment from another sample": _setitem_other_sample,
    "transpose of a square batch": lambda x: x.transpose(0, 1).tanh(),
    "permute of a square batch": lambda x: x.permute(1, 0) * 2.0,
    "transpose back after a reduction": lambda x: x.t().cumsum(1).t(),
    "sum over the batch, kept": lambda x: x.sum(0, keepdim=True) + x,
    "concatenation along the batch": lambda x: torch.cat([x[1:], x[:1]]).sin(),
    "outer product of samples": lambda x: (x[:, None] * x[None, :]).sum(1),
    "matmul of a batch matrix": lambda x: (
        torch.ones(x.shape[0], x.shape[0], dtype=x.dtype) @ x.tanh()
    ),
    "division by misaligned jets": lambda x: x / (x.t() + 9.0),
    "elementwise with a rolled batch": lambda x: x * x.roll(1, 0),
    "where with a flipped batch": _where_flipped,
    "linear over the batch": lambda x: F.linear(x.t(), x.new_ones(x.shape[0], x.shape[0])).t(),
    "stack then sum over the batch": lambda x: torch.stack([x, x], 1).sum(0)[0] + x,
}


@pytest.mark.parametrize("name", list(COUPLED))
@pytest.mark.parametrize("b", [4, 16])
@pytest.mark.parametrize("fn", [tj.jacobian, tj.laplacian, tj.hessian_diagonal, tj.hessian])
def test_coupling_through_batch_keeping_ops_is_caught(name: str, b: int, fn) -> None:  # type: ignore[no-untyped-def]
    x = randn(b, b, gen=torch.Generator().manual_seed(b))
    if "square" not in name and "misaligned" not in name and "linear" not in name:
        x = x[:, : 2 if fn is tj.hessian else 4].contiguous()  # hessian: Taylor mode for D <= 2
    with pytest.raises(tj.BatchCouplingError, match="coupled"):
        fn(COUPLED[name], x, batch_dim=0, mode="fwd" if fn is tj.jacobian else "auto")


def _pinn(x: Tensor, t: Tensor) -> Tensor:
    h = torch.cat([x, t], dim=1)
    w = torch.linspace(-1, 1, 24, dtype=x.dtype).view(8, 3)
    h = F.layer_norm(torch.tanh(F.linear(h, w)), (8,))
    h = h.unsqueeze(1).transpose(1, 2).squeeze(-1)  # squeeze: not tracked, a missed proof only
    return h


_W = torch.linspace(-1, 1, 16, dtype=torch.float64).view(4, 4)
PER_SAMPLE: dict[str, Callable[..., Tensor]] = {
    "mlp": lambda x: F.linear(torch.tanh(F.linear(x, _W * 0.3)), _W[:2]),
    "reductions and views": lambda x: (
        x.reshape(x.shape[0], 2, 2).sum(1).sin() * x[:, :2].mean(-1, keepdim=True)
    ),
    "transpose and permute back": lambda x: x.t().exp().permute(1, 0) / (x.cos() + 2),
    "split and stack": lambda x: torch.stack(x.split(2, dim=1), 1).flatten(1).tanh(),
    "narrow, select, chunk": lambda x: (
        x.narrow(1, 1, 2) * x.select(1, 0).unsqueeze(-1) + x.chunk(2, 1)[0]
    ),
    "in-place and item assignment of constants": lambda x: _inplace_const(x),
}


def _inplace_const(x: Tensor) -> Tensor:
    y = x.sin()
    y *= 2.0
    y[:, 0] = 1.0
    return y


@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_per_sample_functions_are_proven_and_exact(name: str) -> None:
    func = PER_SAMPLE[name]
    calls = []

    def counted(x: Tensor) -> Tensor:
        calls.append(1)
        return func(x)

    x = randn(16, 4, gen=torch.Generator().manual_seed(3), dtype=torch.float64)
    f64 = lambda r: func(r.unsqueeze(0)).squeeze(0)  # noqa: E731
    with torch.no_grad():
        got = tj.laplacian(lambda r: counted(r).sum(-1), x, batch_dim=0)
    h = vmap(jacrev(jacrev(lambda r: f64(r).sum(-1))))(x)
    torch.testing.assert_close(got, h.diagonal(dim1=-2, dim2=-1).sum(-1))
    assert len(calls) == 1  # proven: no check pass
    calls.clear()
    torch.testing.assert_close(
        tj.jacobian(counted, x, batch_dim=0, mode="fwd"), vmap(jacrev(f64))(x)
    )
    assert len(calls) == 1


def test_unproven_per_sample_function_is_checked_once_and_exact() -> None:
    calls = []

    def f(x: Tensor, t: Tensor) -> Tensor:
        calls.append(1)
        return _pinn(x, t)

    x, t = randn(16, 2, gen=torch.Generator().manual_seed(4)), randn(16, 1)
    got = tj.jacobian(f, (x, t), batch_dim=0, mode="fwd")
    assert len(calls) == 2  # the squeeze loses the proof: one check pass
    single = lambda a, b: _pinn(a.unsqueeze(0), b.unsqueeze(0)).squeeze(0)  # noqa: E731
    ref = vmap(jacrev(single, argnums=(0, 1)))(x, t)
    torch.testing.assert_close(got, ref)


def _copy_flipped(x: Tensor) -> Tensor:
    y = x * 1.0
    y.copy_(x.flip(0))
    return y.sin()


def _write_through(alias: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def f(x: Tensor) -> Tensor:
        y = x.sin()
        alias(y).add_(alias(x.flip(0)))  # the alias is y itself, or a view of it
        return y

    return f


# (function, input shape, batch_dim): keyword spellings, in-place ops without an out-of-place
# twin, and in-place writes through calls that return the tensor itself or a view of it
SPELLINGS: dict[str, tuple[Callable[..., Tensor], tuple[int, ...], int]] = {
    "stack(axis=-1)": (lambda x: torch.stack([x, x.sin()], axis=-1), (1, 1, 2), -1),
    "unsqueeze(axis=-1)": (lambda x: x.unsqueeze(axis=-1).transpose(0, 1).sin(), (2, 2), 0),
    "sum(keepdims=True)": (lambda x: x.sum(0, keepdims=True).t() * x, (1, 2), 1),
    "mean(keepdims=True), 3-D": (
        lambda x: torch.mean(x, 0, keepdims=True).transpose(1, 2).exp(),
        (1, 2, 2),
        -1,
    ),
    "chunk(axis=1)": (lambda x: x.chunk(2, axis=1)[1] * x, (1, 2), 1),
    "cat(axis=1) of reversed chunks": (
        lambda x: torch.cat(x.chunk(2, axis=1)[::-1], axis=1).sin(),
        (1, 2),
        1,
    ),
    "copy_ from another sample": (_copy_flipped, (2, 1), 0),
    "add_ through contiguous()": (_write_through(lambda t: t.contiguous()), (2, 1), 0),
    "add_ through double()": (_write_through(lambda t: t.double()), (2, 1), 0),
    "add_ through .mT": (_write_through(lambda t: t.mT), (2, 1), 0),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
@pytest.mark.parametrize("fn", [tj.jacobian, tj.laplacian, tj.hessian_diagonal, tj.hessian])
def test_coupling_through_other_spellings_is_caught(name: str, fn) -> None:  # type: ignore[no-untyped-def]
    func, shape, bd = SPELLINGS[name]
    x = randn(*shape, gen=torch.Generator().manual_seed(5))
    with pytest.raises(tj.BatchCouplingError, match="coupled"):
        fn(func, x, batch_dim=bd, mode="fwd" if fn is tj.jacobian else "auto")


def _zeroed(x: Tensor) -> Tensor:
    y = x.sin()
    y.zero_()
    return y + x


KEYWORDS: dict[str, Callable[[Tensor], Tensor]] = {
    "cat(tensors=...)": lambda x: torch.cat(tensors=[x, x.sin()], dim=1),
    "sum(input=...)": lambda x: torch.sum(input=x.sin(), dim=1, keepdim=True) * x,
    "transpose(input=...)": lambda x: torch.transpose(input=x.exp(), dim0=0, dim1=1).t(),
    "zero_": _zeroed,
}


@pytest.mark.parametrize("name", list(KEYWORDS))
def test_tensors_by_keyword_and_zero_are_exact(name: str) -> None:
    func = KEYWORDS[name]
    x = randn(3, 2, gen=torch.Generator().manual_seed(6))
    single = lambda r: func(r.unsqueeze(0)).squeeze(0)  # noqa: E731
    torch.testing.assert_close(tj.jacobian(func, x, mode="fwd"), torch.func.jacrev(func)(x))
    got = tj.jacobian(func, x, batch_dim=0, mode="fwd")
    torch.testing.assert_close(got, vmap(jacrev(single))(x))
    diag = vmap(torch.func.hessian(single))(x).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(func, x, batch_dim=0), diag)


def test_common_layers_are_proven_and_batchnorm_in_training_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torchjac._engine.taylor import taylor_run

    checks: list[int] = []
    original = taylor_run._check_pass
    monkeypatch.setattr(taylor_run, "_check_pass", lambda *a: (checks.append(1), original(*a))[1])
    torch.manual_seed(0)
    net = (
        torch.nn.Sequential(
            torch.nn.Linear(3, 8),
            torch.nn.LayerNorm(8),
            torch.nn.Tanh(),
            torch.nn.Linear(8, 8),
            torch.nn.GELU(),
            torch.nn.BatchNorm1d(8),
            torch.nn.Linear(8, 2),
        )
        .double()
        .eval()
    )

    def f(x: Tensor, t: Tensor) -> Tensor:
        return net(torch.cat([x, t], dim=-1))

    x, t = randn(16, 2), randn(16, 1)
    for fn in (tj.jacobian, tj.laplacian, tj.hessian_diagonal, tj.hessian):
        fn(f, (x, t), batch_dim=0)
    assert checks == []  # every layer keeps the batch: no check pass
    net.train()
    with pytest.raises(tj.BatchCouplingError):
        tj.laplacian(f, (x, t), batch_dim=0)
    assert checks == [1]
