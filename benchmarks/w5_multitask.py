"""W5 and W5b (seed 004): Jacobian and Gramian of 16 task losses w.r.t. a shared trunk.

Trunk MLP 128→512→512 (ReLU), 16 linear heads 512→1, N=256, one MSE loss per task. W5: the
Jacobian of the 16 losses w.r.t. the trunk parameters, ``[16, *p]`` per parameter (328,704
columns). W5b: its Gramian ``J Jᵀ`` (``[16, 16]``), which TorchJD's docs (seed 004) compute by
materialising J first. References in float64 from ``torch.func.jacrev``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import torchjac as tj
from benchmarks._common import as_double, flat_cat, mlp, randn
from benchmarks._harness import Case, Strategy, Workload

__all__ = ["WORKLOADS"]

TASKS = 16


class MultiTask(nn.Module):
    """A shared trunk and ``tasks`` linear heads; ``forward`` returns the ``[tasks]`` losses."""

    def __init__(self, sizes: list[int], tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(mlp(sizes, nn.ReLU, seed=10), nn.ReLU())
        self.heads = mlp([sizes[-1], tasks], nn.ReLU, seed=11)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        predictions = self.heads(self.trunk(x))  # [N, tasks]: one output per head
        return ((predictions - y) ** 2).mean(dim=0)


def _problem(small: bool) -> tuple[MultiTask, Tensor, Tensor, str]:
    sizes = [32, 64, 64] if small else [128, 512, 512]
    n = 32 if small else 256
    model = MultiTask(sizes, TASKS)
    x, y = randn(n, sizes[0], seed=12), randn(n, TASKS, seed=13)
    p = sum(q.numel() for q in model.trunk.parameters())
    size = f"trunk MLP {'→'.join(map(str, sizes))} ReLU + {TASKS} heads, N={n}, P={p}"
    return model, x, y, size


def _reference_jacobian(model: MultiTask, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    double = as_double(model)
    trunk = {f"trunk.{k}": v.detach() for k, v in double.trunk.named_parameters()}
    jd = jacrev(lambda q: functional_call(double, q, (x.double(), y.double())))(trunk)
    return tuple(jd.values())


def _loop(losses: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    return tuple(torch.stack(z) for z in zip(*rows))


def _batched(losses: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
    return torch.autograd.grad(losses, params, eye, is_grads_batched=True)


def _torchjd(losses: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    from torchjd.autojac import jac

    return jac(losses, params)


def _gram(jacobians: tuple[Tensor, ...]) -> Tensor:
    j = flat_cat(jacobians, jacobians[0].shape[0])
    return j @ j.T


def _build_w5(small: bool) -> Case:
    model, x, y, size = _problem(small)
    params = list(model.trunk.parameters())

    def setup() -> Tensor:
        return model(x, y)

    strategies = [
        Strategy("autograd.grad loop over losses", lambda ls: _loop(ls, params), setup),
        Strategy("autograd.grad is_grads_batched", lambda ls: _batched(ls, params), setup),
        Strategy("torchjd.autojac.jac", lambda ls: _torchjd(ls, params), setup, ("torchjd",)),
        Strategy(
            "tj.jac(losses, trunk params)", lambda ls: tj.jac(ls, params), setup, torchjac=True
        ),
    ]
    return Case(_reference_jacobian(model, x, y), strategies, f"{size}: J [16, P]")


def _autogram(model: MultiTask, x: Tensor, y: Tensor) -> Strategy:
    from torchjd.autogram import Engine

    twin = copy.deepcopy(model)  # the engine hooks its modules: keep them off the shared model
    engine = Engine(twin.trunk, batch_dim=None)
    return Strategy(
        "torchjd.autogram.Engine (batch_dim=None)",
        lambda ls: engine.compute_gramian(ls),
        lambda: twin(x, y),
    )


def _build_w5b(small: bool) -> Case:
    model, x, y, size = _problem(small)
    params = list(model.trunk.parameters())
    reference = _gram(_reference_jacobian(model, x, y))

    def setup() -> Tensor:
        return model(x, y)

    strategies: list[Strategy] = [
        Strategy("autograd loop, then J Jᵀ", lambda ls: _gram(_loop(ls, params)), setup),
        Strategy("is_grads_batched, then J Jᵀ", lambda ls: _gram(_batched(ls, params)), setup),
        Strategy(
            "torchjd.autojac.jac, then J Jᵀ",
            lambda ls: _gram(_torchjd(ls, params)),
            setup,
            ("torchjd",),
        ),
    ]
    try:
        strategies.append(_autogram(model, x, y))
    except ImportError:
        strategies.append(Strategy("torchjd.autogram.Engine", _none, requires=("torchjd",)))
    strategies.append(
        Strategy(
            "tj.gramian(losses, trunk params)",
            lambda ls: tj.gramian(ls, params),
            setup,
            torchjac=True,
        )
    )
    return Case(reference, strategies, f"{size}: J Jᵀ [16, 16]")


def _none(_: Any) -> None:
    return None


WORKLOADS = [
    Workload("W5", "Jacobian of 16 task losses w.r.t. a shared trunk (seed 004)", _build_w5),
    Workload("W5b", "Gramian J Jᵀ of the 16 task losses (seed 004)", _build_w5b),
]
