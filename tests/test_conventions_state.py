"""No global state changes: grad mode, RNG, inputs and model stay put, even on errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conventions_cases import FUNCTIONAL, _net, _poly, _unchanged
from torch import Tensor, nn

import torchjac as tj


def _graph_case(name: str, batch: int, coupled: bool) -> tuple[Callable[[], Any], tuple[Tensor]]:
    x = torch.linspace(-1.0, 1.0, batch * 3, dtype=torch.float64).reshape(batch, 3)
    x.requires_grad_(True)
    with torch.enable_grad():
        y = _poly(x - x.mean(0) if coupled else x)
    return (lambda: getattr(tj, name)(y, x, batch_dim=0)), (x,)


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("batch", [3, 12])  # 12 > 8: the coupling check samples pairs
@pytest.mark.parametrize("name", ["jac", "gramian"])
def test_graph_calls_keep_state(name: str, batch: int, grad_enabled: bool) -> None:
    call, tensors = _graph_case(name, batch, coupled=False)
    with torch.set_grad_enabled(grad_enabled), _unchanged(tensors):
        call()
    call, tensors = _graph_case(name, batch, coupled=True)
    with (
        torch.set_grad_enabled(grad_enabled),
        _unchanged(tensors),
        pytest.raises(tj.BatchCouplingError, match=name),
    ):
        call()


def _coupled(x: Tensor) -> Tensor:
    return (x - x.mean(0)).sin()


def _raising(x: Tensor) -> Tensor:
    raise RuntimeError("user code failed")


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("batch", [3, 12])
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional_calls_keep_state(name: str, batch: int, grad_enabled: bool) -> None:
    fn = getattr(tj, name)
    x = torch.linspace(-1.0, 1.0, batch * 3, dtype=torch.float64).reshape(batch, 3)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)  # closed over, needs grad
    with torch.set_grad_enabled(grad_enabled), _unchanged((x, w)):
        fn(lambda x: _poly(x * w), x, batch_dim=0)
        fn(lambda x: _poly(x * w), x)
    with (
        torch.set_grad_enabled(grad_enabled),
        _unchanged((x, w)),
        pytest.raises(tj.BatchCouplingError, match=name),
    ):
        fn(_coupled, x, batch_dim=0)
    with (
        torch.set_grad_enabled(grad_enabled),
        _unchanged((x, w)),
        pytest.raises(RuntimeError, match="user code failed"),
    ):
        fn(_raising, x)
    assert w.grad is None


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("batch", [3, 12])
@pytest.mark.parametrize("name", ["param_jacobian", "ntk"])
def test_module_calls_keep_state(name: str, batch: int, grad_enabled: bool) -> None:
    fn = getattr(tj, name)
    x = torch.linspace(-1.0, 1.0, batch * 3, dtype=torch.float64).reshape(batch, 3)
    net = _net()
    for p in net.parameters():  # existing .grad must stay as it is
        p.grad = torch.full_like(p, 0.25)
    net.lin1.bias.grad = None
    with torch.set_grad_enabled(grad_enabled), _unchanged((x,), net):
        fn(net, x, batch_dim=0)
        if name == "param_jacobian":
            fn(net, x)
    net.train()  # BatchNorm in train mode couples the samples
    with (
        torch.set_grad_enabled(grad_enabled),
        _unchanged((x,), net),
        pytest.raises(tj.BatchCouplingError, match=name),
    ):
        fn(net, x, batch_dim=0)


class _Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("forward failed")


@pytest.mark.parametrize("name", ["param_jacobian", "ntk"])
def test_module_call_that_raises_keeps_state(name: str) -> None:
    net = _Fails()
    x = torch.ones(2, 3, dtype=torch.float64)
    with _unchanged((x,), net), pytest.raises(RuntimeError, match="forward failed"):
        getattr(tj, name)(net, x, batch_dim=0)


@pytest.mark.parametrize("name", ["param_jacobian", "ntk"])
def test_module_dropout_keeps_rng_and_training(name: str) -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().train()
    x = torch.ones(2, 3, dtype=torch.float64)
    with _unchanged((x,), net):
        getattr(tj, name)(net, x, batch_dim=0)


@pytest.mark.parametrize("params", [None, ["lin1.weight"]])
def test_full_jacobian_of_a_training_model_keeps_buffers_and_flags(params: Any) -> None:
    """Without batch_dim a BatchNorm in train mode is fine, but its running stats stay put."""
    net = _net(train=True)
    net.lin1.requires_grad_(False)
    x = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(4, 3)
    with _unchanged((x,), net):
        got = tj.param_jacobian(net, x, params=params)
    names = ["lin1.weight"] if params else [n for n, p in net.named_parameters() if p.requires_grad]
    assert list(got) == names


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
@pytest.mark.parametrize("kind", ["plain", "leaf", "non-leaf"])
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_func_writing_into_its_argument(name: str, kind: str, mode: str, chunk_size: Any) -> None:
    """func may write into its argument (as a plain call may): the derivative is that of the
    function it computes, and the user's input stays put. The reverse trace called func on the
    input itself (a leaf raised, a non-leaf was written), chunks of jvp on a primal sharing the
    input's storage (written, silently, then differentiated at the moved point)."""
    fn = getattr(tj, name)
    base = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
    base.requires_grad_(kind != "plain")
    x = base * 1.0 if kind == "non-leaf" else base

    def writes(x: Tensor) -> Tensor:
        x.mul_(2.0)
        return _poly(x)

    before, version = x.detach().clone(), x._version
    got = fn(writes, x, batch_dim=0, mode=mode, chunk_size=chunk_size)
    assert torch.equal(x.detach(), before) and x._version == version
    want = fn(lambda x: _poly(2.0 * x), x.detach(), batch_dim=0)
    torch.testing.assert_close(got, want)
