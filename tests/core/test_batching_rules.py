"""NOTE [wrong batching rules]: rows by batched passes agree with one cotangent at a time where
one of torch's two vmaps has a wrong batching rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import torchjac as tj
from torchjac._engine.core import lean_vmap

D = torch.float64


def _rows_one_at_a_time(y: Tensor, x: Tensor) -> Tensor:
    eye = torch.eye(y.numel(), dtype=y.dtype).reshape(-1, *y.shape)
    return torch.stack([torch.autograd.grad(y, x, e, retain_graph=True)[0] for e in eye])


def _points() -> Tensor:
    return torch.randn(4, 3, dtype=D, generator=torch.Generator().manual_seed(5))


def test_jac_of_cdist() -> None:
    # functorch's rule of _cdist_backward: rows off by 0.97 (torch.func.jacrev too)
    x = _points().requires_grad_(True)
    y = torch.cdist(x, x.detach() + 1)
    want = _rows_one_at_a_time(y, x).reshape(*y.shape, *x.shape)
    torch.testing.assert_close(tj.jac(y, x, retain_graph=True), want)
    j = want.reshape(16, 12)
    torch.testing.assert_close(tj.gramian(y, x), (j @ j.T).reshape(4, 4, 4, 4))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_jacobian_rows_of_cdist(chunk_size: int | None) -> None:
    def f(u: Tensor) -> Tensor:
        return torch.cdist(u, u + 1.0)

    x = _points()
    leaf = x.clone().requires_grad_(True)
    want = _rows_one_at_a_time(f(leaf), leaf).reshape(4, 4, 4, 3)
    torch.testing.assert_close(tj.jacobian(f, x, mode="rev", chunk_size=chunk_size), want)


def test_a_graph_wrong_for_both_vmaps_is_a_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # no graph of torch 2.13 holds ops wrong for both (cdist has no double backward): stand-ins
    x = _points().requires_grad_(True)
    y = F.group_norm(x.reshape(1, 4, 3), 2).sin()
    want = _rows_one_at_a_time(y, x)
    wrong = {"functorch": frozenset({"SinBackward0"}), "legacy": frozenset({"ViewBackward0"})}
    monkeypatch.setattr(lean_vmap, "_WRONG", wrong)
    monkeypatch.setattr(lean_vmap, "_last", [None, frozenset()])
    cots = [torch.eye(12, dtype=D).reshape(12, *y.shape)]
    assert lean_vmap.batch_way([y]) == "loop"
    assert lean_vmap.batch_way([y], prefer="legacy") == "loop"
    (got,) = lean_vmap.batched_grad([y], [x], cots, True, False)
    torch.testing.assert_close(got, want)
    (got,) = lean_vmap.batched_grad([y], [x], cots, False, False)  # the last row frees the graph
    torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(y.sum(), x)


def test_the_verdict_is_kept_for_the_last_graph_only() -> None:
    x = _points().requires_grad_(True)
    y1 = torch.cdist(x, x.detach() + 1)
    y2 = x.sin()
    assert lean_vmap.batch_way([y1]) == "legacy"
    assert lean_vmap.batch_way([y2]) == "functorch"
    assert lean_vmap.batch_way([y1]) == "legacy"
    assert lean_vmap.batch_way([y1], prefer="legacy") == "legacy"  # the verdict kept, either way
    z = F.group_norm(x.reshape(1, 4, 3), 2)
    (g,) = torch.autograd.grad(z.sin().sum(), x, create_graph=True)
    assert lean_vmap.batch_way([g], prefer="legacy") == "functorch"


def test_jac_keeps_the_verdict_of_its_validation_walk() -> None:
    x = _points().requires_grad_(True)
    y = torch.cdist(x, x.detach() + 1)
    lean_vmap._last[:] = [None, frozenset()]
    tj.jac(y, x, retain_graph=True)
    assert lean_vmap._last[1] == frozenset({"functorch"})  # its batching rule is wrong there
    # torch 2.4 makes a new node object at each access (the key then never matches: a new walk)
    if torch.torch_version.TorchVersion(torch.__version__) >= "2.13":
        assert lean_vmap._last[0] == lean_vmap._key([y.grad_fn])
