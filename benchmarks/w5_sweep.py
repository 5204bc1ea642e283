"""W5c and W5d (seed 004, issue 21): the Gramian of task losses over a sweep, and the whole step.

W5c: ``J Jᵀ`` of ``m`` task losses w.r.t. a shared trunk 64→w→w (ReLU) with a linear head per
task, on ``N`` samples, for m ∈ {4, 16, 64} × N ∈ {32, 256} × w ∈ {64, 512}: torchjac's
``gramian`` against TorchJD's ``autojac.jac`` then ``J Jᵀ``, TorchJD's ``autogram.Engine`` and
``autograd.grad(is_grads_batched=True)`` then ``J Jᵀ``. W5d: the multi-task training step that
TorchJD's Engine serves, timed whole: forward, the Gramian of the losses, weights from it (each
task's gradient scaled to norm 1, ``w = 1/sqrt(diag G)``: cheap, so the step is about the
Gramian), and one ``losses.backward(w)`` through the kept graph. References in float64.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
from torch import Tensor, nn

import torchjac as tj
from benchmarks._common import as_double, flat_cat, mlp, randn
from benchmarks._harness import Case, Strategy, Workload

__all__ = ["SWEEP", "WORKLOADS"]

SWEEP = [(m, n, w) for w, n, m in itertools.product((64, 512), (32, 256), (4, 16, 64))]
D_IN = 64


class Tasks(nn.Module):
    """A shared trunk ``d→w→w`` (ReLU) and one linear head per task; returns the ``[m]`` losses."""

    def __init__(self, d: int, w: int, m: int) -> None:
        super().__init__()
        self.trunk = mlp([d, w, w], nn.ReLU, seed=50)
        self.heads = mlp([w, m], nn.ReLU, seed=51)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return ((self.heads(torch.relu(self.trunk(x))) - y) ** 2).mean(dim=0)


def _problem(m: int, n: int, w: int) -> tuple[Tasks, Tensor, Tensor]:
    return Tasks(D_IN, w, m), randn(n, D_IN, seed=52), randn(n, m, seed=53)


def _reference_gramian(model: Tasks, x: Tensor, y: Tensor) -> Tensor:
    double = as_double(model)
    params = list(double.trunk.parameters())
    losses = double(x.double(), y.double())
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    j = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
    return j @ j.T


def _gram(jacobians: tuple[Tensor, ...]) -> Tensor:
    j = flat_cat(jacobians, jacobians[0].shape[0])
    return j @ j.T


def _batched(losses: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
    return torch.autograd.grad(losses, params, eye, is_grads_batched=True)


def _engine(model: Tasks) -> tuple[Tasks, Callable[[Tensor], Tensor]]:
    from torchjd.autogram import Engine

    twin = copy.deepcopy(model)  # the engine hooks its modules: keep them off the shared model
    engine = Engine(twin.trunk, batch_dim=None)
    return twin, engine.compute_gramian


def _build_cell(m: int, n: int, w: int) -> Callable[[bool], Case]:
    def build(small: bool) -> Case:
        mm, nn_, ww = (min(m, 4), min(n, 8), min(w, 16)) if small else (m, n, w)
        model, x, y = _problem(mm, nn_, ww)
        params = list(model.trunk.parameters())

        def setup() -> Tensor:
            return model(x, y)

        def torchjd_jac(ls: Tensor) -> Tensor:
            from torchjd.autojac import jac

            return _gram(jac(ls, params))

        strategies = [
            Strategy("is_grads_batched, then J Jᵀ", lambda ls: _gram(_batched(ls, params)), setup),
            Strategy("torchjd.autojac.jac, then J Jᵀ", torchjd_jac, setup, ("torchjd",)),
        ]
        try:
            twin, compute = _engine(model)
            strategies.append(
                Strategy("torchjd.autogram.Engine", compute, lambda: twin(x, y), ("torchjd",))
            )
        except ImportError:
            pass
        strategies.append(
            Strategy(
                "tj.gramian(losses, trunk)", lambda ls: tj.gramian(ls, params), setup, torchjac=True
            )
        )
        size = f"trunk {D_IN}→{ww}→{ww}, m={mm} losses, N={nn_}: J Jᵀ [{mm}, {mm}]"
        return Case(_reference_gramian(model, x, y), strategies, size)

    return build


def _step(model: Tasks, x: Tensor, y: Tensor, gramian: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """One multi-task step: losses, G, w = 1/sqrt(diag G), ``losses.backward(w)``."""
    for p in model.parameters():
        p.grad = None
    losses = model(x, y)
    g = gramian(losses)
    weights = 1 / g.diagonal().sqrt().clamp_min(1e-12)
    losses.backward(weights)
    return [p.grad for p in model.trunk.parameters()]  # type: ignore[misc]


def _build_step(small: bool) -> Case:
    m, n, w = (4, 8, 16) if small else (16, 128, 256)
    model, x, y = _problem(m, n, w)
    double = as_double(model)
    ref_g = _reference_gramian(model, x, y)
    dparams = list(double.trunk.parameters())
    ref = torch.autograd.grad(double(x.double(), y.double()), dparams, 1 / ref_g.diagonal().sqrt())
    ours = copy.deepcopy(model)
    trunk = list(ours.trunk.parameters())
    peer = copy.deepcopy(model)
    peer_trunk = list(peer.trunk.parameters())

    def batched_step(_: None) -> list[Tensor]:
        return _step(peer, x, y, lambda ls: _gram(torch.autograd.grad(
            ls, peer_trunk, torch.eye(m), retain_graph=True, is_grads_batched=True)))  # fmt: skip

    strategies = [Strategy("is_grads_batched, J Jᵀ, backward", batched_step)]
    try:
        twin, compute = _engine(model)
        strategies.append(
            Strategy("torchjd.autogram.Engine step", lambda _: _step(twin, x, y, compute))
        )
    except ImportError:
        pass
    strategies.append(
        Strategy(
            "tj.gramian step (retain_graph=True)",
            lambda _: _step(ours, x, y, lambda ls: tj.gramian(ls, trunk, retain_graph=True)),
            torchjac=True,
        )
    )
    size = f"trunk 64→{w}→{w}, m={m} losses, N={n}: forward, G, weights, backward"
    return Case(tuple(ref), strategies, size)


WORKLOADS = [
    Workload(
        "W5c",
        f"Gramian of m={m} task losses, N={n}, width {w} (the multi-task sweep)",
        _build_cell(m, n, w),
    )
    for m, n, w in SWEEP
] + [Workload("W5d", "The multi-task step: Gramian, weights, backward", _build_step)]
