"""W3 and W3b (seeds 001, 003): per-sample Jacobians of a model's output w.r.t. its parameters.

W3: MLP 64→256→256→10 ReLU, N=32 → ``[32, 10, *p]`` for every parameter (84,994 parameters).
W3b: a small CNN (Conv2d 1→8 and 8→16, 3×3 stride 2, ReLU, Linear 784→10), 1×28×28, N=32.
Reference: float64 ``jacrev`` of ``functional_call`` over the whole batch (the parameters are
shared, so the batch Jacobian is the per-sample Jacobian). The "floor" row copies a tensor of the
result's size: no method can write its result faster.
"""

from __future__ import annotations

import copy
import itertools
from math import sqrt
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import torchjac as tj
from benchmarks._common import as_double, fork_rng, mlp, module_styles, plain_params, randn
from benchmarks._harness import Case, Strategy, Workload

__all__ = ["WORKLOADS"]


def _cnn(small: bool) -> nn.Sequential:
    with fork_rng(40):
        c1, c2 = (4, 8) if small else (8, 16)
        return nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, 10),
        )


def _seed_double_loop(model: nn.Module, x: Tensor) -> list[Tensor]:
    # Seed 003's autograd reference: one backward per (n, c).
    fs = model(x)
    params = list(model.parameters())
    jacobians = [torch.zeros(fs.shape + p.shape) for p in params]
    for n, c in itertools.product(range(fs.shape[0]), range(fs.shape[1])):
        grads_n_c = torch.autograd.grad(fs[n, c], params, retain_graph=True)
        for param_idx, param_grad in enumerate(grads_n_c):
            jacobians[param_idx][n, c, :] = param_grad
    return jacobians


def _backpack_batchgrad(model: nn.Module, x: Tensor) -> list[Tensor]:
    from backpack import backpack, extensions

    fs = model(x)
    jacobians = [torch.zeros(fs.shape + p.shape) for p in model.parameters()]
    for c in range(fs.shape[1]):
        with backpack(extensions.BatchGrad(), retain_graph=True):
            fs[:, c].sum().backward(retain_graph=True)
        for param_idx, param in enumerate(model.parameters()):
            jacobians[param_idx][:, c, :] = param.grad_batch  # type: ignore[attr-defined]
    return jacobians


def _backpack_sqrt_ggn(model: nn.Module, loss_func: nn.Module, x: Tensor) -> list[Tensor]:
    from backpack import backpack, extensions

    fs = model(x)
    loss = loss_func(fs, torch.zeros_like(fs))
    with backpack(extensions.SqrtGGNExact()):
        loss.backward()
    return [
        p.sqrt_ggn_exact.transpose(0, 1) / sqrt(2)  # type: ignore[attr-defined]
        for p in model.parameters()
    ]


def _backpack_strategies(model: nn.Module, x: Tensor) -> list[Strategy]:
    try:
        from backpack import extend
    except ImportError:
        names = ("BackPACK BatchGrad, looped over C", "BackPACK SqrtGGNExact (÷√2)")
        return [Strategy(n, lambda _: None, requires=("backpack",)) for n in names]
    twin = extend(copy.deepcopy(model))  # extend() changes modules: keep it off the shared model
    loss_func = extend(nn.MSELoss(reduction="sum"))
    return [
        Strategy("BackPACK BatchGrad, looped over C", lambda _: _backpack_batchgrad(twin, x)),
        Strategy("BackPACK SqrtGGNExact (÷√2)", lambda _: _backpack_sqrt_ggn(twin, loss_func, x)),
    ]


def _torchjd(model: nn.Module, x: Tensor) -> list[Tensor]:
    from torchjd.autojac import jac

    fs = model(x)
    return [j.view(fs.shape + j.shape[1:]) for j in jac(fs, list(model.parameters()))]


def _vmap_jacrev(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    params = plain_params(model)

    def single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    return vmap(jacrev(single), (None, 0))(params, x)  # type: ignore[no-any-return]


def _jacrev_batch(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    params = plain_params(model)
    return jacrev(lambda p: functional_call(model, p, (x,)))(params)  # type: ignore[no-any-return]


def _case(model: nn.Sequential, x: Tensor, size: str) -> Case:
    reference = _jacrev_batch(as_double(model), x.double())
    n_bytes = sum(r.numel() for r in reference.values()) * 4
    source = torch.randn(n_bytes // 4)
    target = torch.empty_like(source)
    as_float = {k: v.float() for k, v in reference.items()}

    def copy_floor(_: Any) -> dict[str, Tensor]:
        target.copy_(source)
        return as_float

    strategies = [
        Strategy("torch.func vmap(jacrev(functional_call))", lambda _: _vmap_jacrev(model, x)),
        Strategy("torch.func jacrev over the whole batch", lambda _: _jacrev_batch(model, x)),
        *_backpack_strategies(model, x),
        Strategy("torchjd.autojac.jac", lambda _: _torchjd(model, x), requires=("torchjd",)),
        Strategy("seed 003: autograd double loop", lambda _: _seed_double_loop(model, x)),
        Strategy(
            "tj.param_jacobian(model, X, batch_dim=0)",
            lambda _: tj.param_jacobian(model, x, batch_dim=0),
            torchjac=True,
        ),
        *(
            Strategy(
                f"tj.param_jacobian, {style}",
                lambda _, g=g: tj.param_jacobian(g, x, batch_dim=0),  # type: ignore[misc]
                torchjac=True,
            )
            for style, g in module_styles(model)
        ),
        Strategy(f"floor: copy {n_bytes / 2**20:.0f} MiB (not a method)", copy_floor, floor=True),
    ]
    return Case(reference, strategies, size)


def _build_mlp(small: bool) -> Case:
    sizes = [16, 32, 32, 10] if small else [64, 256, 256, 10]
    n = 8 if small else 32
    model = mlp(sizes, nn.ReLU, seed=41)
    x = randn(n, sizes[0], seed=42)
    p = sum(q.numel() for q in model.parameters())
    return _case(model, x, f"MLP {'→'.join(map(str, sizes))} ReLU, N={n}, P={p}: [{n}, 10, *p]")


def _build_cnn(small: bool) -> Case:
    model = _cnn(small)
    n = 8 if small else 32
    x = randn(n, 1, 28, 28, seed=43)
    p = sum(q.numel() for q in model.parameters())
    return _case(model, x, f"CNN 2×Conv2d + Linear, 1×28×28, N={n}, P={p}: [{n}, 10, *p]")


WORKLOADS = [
    Workload("W3", "per-sample parameter Jacobian, MLP (seeds 001, 003)", _build_mlp),
    Workload("W3b", "per-sample parameter Jacobian, small CNN (seed 003)", _build_cnn),
]
