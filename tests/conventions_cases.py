"""Shared by the conventions tests: front-door groups, a BatchNorm net, a no-state-change check."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

FUNCTIONAL = ("jacobian", "hessian", "hessian_diagonal", "laplacian")


ALL = ("jac", "gramian", *FUNCTIONAL, "param_jacobian", "ntk")


class _Net(nn.Module):
    """Linear -> BatchNorm -> tanh -> Linear, counting its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.lin2 = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin2(torch.tanh(self.bn(self.lin1(x))))


def _net(dtype: torch.dtype = torch.float64, train: bool = False) -> _Net:
    torch.manual_seed(3)
    net = _Net().to(dtype)
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.train(train)


def _poly(x: Tensor) -> Tensor:
    return (x**3).sum(-1, keepdim=True) * x.sin()


def _tensors(result: Any) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in _tensors(v)]
    return [t for v in result for t in _tensors(v)]


def _module_state(model: nn.Module) -> dict[str, Any]:
    return {
        "training": [m.training for m in model.modules()],
        "params": [
            (n, p, type(p), p.requires_grad, p.detach().clone())
            for n, p in model.named_parameters()
        ],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
        "hooks": [
            len(m._forward_hooks)
            + len(m._forward_pre_hooks)
            + len(m._backward_hooks)
            + len(m._backward_pre_hooks)
            + len(m._state_dict_hooks)
            for m in model.modules()
        ],
    }


def _assert_same(before: Any, after: Any) -> None:
    if isinstance(before, Tensor):
        assert isinstance(after, Tensor)
        assert before.dtype == after.dtype and before.shape == after.shape
        assert torch.equal(before, after)
    elif isinstance(before, dict):
        assert before.keys() == after.keys()
        for k in before:
            _assert_same(before[k], after[k])
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after)
        for a, b in zip(before, after):
            _assert_same(a, b)
    elif isinstance(before, nn.Parameter | type):
        assert before is after
    else:
        assert before == after


@contextmanager
def _unchanged(tensors: tuple[Tensor, ...] = (), model: nn.Module | None = None) -> Iterator[None]:
    """Global grad mode, RNG state, the tensors' values / flags / .grad, the module's state."""
    grad_mode = torch.is_grad_enabled()
    rng = torch.random.get_rng_state()
    flags = [(t.requires_grad, t.is_leaf, t.grad, t.detach().clone()) for t in tensors]
    state = None if model is None else _module_state(model)
    try:
        yield
    finally:
        assert torch.is_grad_enabled() == grad_mode, "grad mode changed"
        assert torch.equal(torch.random.get_rng_state(), rng), "global RNG state changed"
        for t, (rg, leaf, grad, val) in zip(tensors, flags):
            assert t.requires_grad == rg and t.is_leaf == leaf, "requires_grad changed"
            assert t.grad is grad, ".grad of an input changed"
            assert torch.equal(t.detach(), val), "an input was mutated"
        if model is not None:
            _assert_same(state, _module_state(model))
