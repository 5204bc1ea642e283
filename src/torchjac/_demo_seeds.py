"""The seed problems of ``torchjac demo``: each user's computation, their way and torchjac's.

Every problem returns two zero-argument callables computing the same tensors: the seed's own
method (the code of the forum thread or library doc, scaled up to a realistic size) and the
torchjac call that replaces it. Seeds: ``../shared/seeds`` of the project (000-004).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import jacobian as ag_jacobian

import torchjac as tj

__all__ = ["PROBLEMS", "Problem", "seed003_model"]

Thunk = Callable[[], Any]


@dataclass(frozen=True)
class Problem:
    """One demo row: ``build(small) -> (seed_way, torchjac_way, size)``."""

    seed: str
    title: str
    method: str
    build: Callable[[bool], tuple[Thunk, Thunk, str]]
    needs: str | None = None  # an optional package the seed's method uses


def _mlp(sizes: list[int], act: Callable[[], nn.Module], seed: int) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG
            lin = nn.Linear(sizes[i], sizes[i + 1])
        with torch.no_grad():
            bound = sizes[i] ** -0.5
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=gen) * 2 * bound - bound)
            lin.bias.copy_(torch.rand(lin.bias.shape, generator=gen) * 2 * bound - bound)
        layers += [lin, act()] if i < len(sizes) - 2 else [lin]
    return nn.Sequential(*layers)


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# Seed 000: the Jacobian of parameter gradients w.r.t. the model output. -----------------------
def _seed000_jacobian(input: Any, wrt: Any, create_graph: bool = False) -> list[Tensor]:
    flat_input = torch.cat([i.reshape(-1) for i in input])
    grad_ouputs = torch.eye(len(flat_input), device=input[0].device, dtype=input[0].dtype)
    jac = []
    for i in range(flat_input.numel()):
        jac.append(
            torch.autograd.grad(
                flat_input, wrt, grad_ouputs[i], retain_graph=True,
                create_graph=create_graph, allow_unused=True,
            )
        )  # fmt: skip
    return [torch.stack(z) for z in zip(*jac)]


def _p000(small: bool) -> tuple[Thunk, Thunk, str]:
    sizes, n = ([8, 16, 16, 2], 4) if small else ([16, 32, 32, 4], 16)
    model = _mlp(sizes, nn.Tanh, 0)
    x, t = _randn(n, sizes[0], seed=1), _randn(n, sizes[-1], seed=2)
    params = list(model.parameters())

    def seed_way() -> Tensor:
        outputs = model(x)
        loss = F.mse_loss(outputs, t)
        grad = _seed000_jacobian([loss], params, create_graph=True)
        return _seed000_jacobian(grad, [outputs])[0]

    def torchjac_way() -> Tensor:
        outputs = model(x)
        loss = F.mse_loss(outputs, t)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return tj.jac(grads, [outputs])[0]

    p = sum(q.numel() for q in params)
    return seed_way, torchjac_way, f"MLP {'→'.join(map(str, sizes))}, N={n}: [{p}, {n}, 4]"


# Seed 001: the Jacobian of the output w.r.t. the parameters, by "deparameterising". -----------
def _set_nested(obj: Any, names: list[str], value: Any, delete: bool = False) -> None:
    for name in names[:-1]:
        obj = getattr(obj, name)
    if delete:
        delattr(obj, names[-1])
    else:
        setattr(obj, names[-1], value)


def _seed001_compute_jacobian(model: nn.Module, x: Tensor) -> list[Tensor]:
    jac_model = copy.deepcopy(model)  # the seed works on a copy, deleting the Parameters
    all_names = [name for name, _ in jac_model.named_parameters()]
    all_params = [p.detach().requires_grad_() for p in jac_model.parameters()]
    for name in all_names:
        _set_nested(jac_model, name.split("."), None, delete=True)
    for name, p in zip(all_names, all_params):
        _set_nested(jac_model, name.split("."), p)
    jacobians = []
    for i, (name, param) in enumerate(zip(all_names, all_params)):

        def param_as_input_func(param: Tensor, name: str = name) -> Tensor:
            _set_nested(jac_model, name.split("."), param)
            return jac_model(x)

        jacobians.append(ag_jacobian(param_as_input_func, param, strict=i == 0, vectorize=i > 0))
        _set_nested(jac_model, name.split("."), param)
    return jacobians


def _p001(small: bool) -> tuple[Thunk, Thunk, str]:
    sizes, n = ([3, 5, 5, 5, 2], 2) if small else ([10, 64, 64, 64, 4], 16)
    model = _mlp(sizes, nn.ReLU, 10)
    x = _randn(n, sizes[0], seed=11)

    def torchjac_way() -> list[Tensor]:
        return list(tj.param_jacobian(model, x, batch_dim=0).values())

    size = f"MLP {'→'.join(map(str, sizes))} ReLU, N={n}: [{n}, {sizes[-1]}, *p]"
    return lambda: _seed001_compute_jacobian(model, x), torchjac_way, size


# Seed 002: batch-respecting Jacobian, and the PINN's second derivatives. ----------------------
def _p002(small: bool) -> tuple[Thunk, Thunk, str]:
    d_in, hidden, d_out, b = (5, 2, 10, 3) if small else (16, 128, 16, 128)
    f = nn.Sequential(_mlp([d_in, hidden, d_out], nn.Sigmoid, 20))
    x = _randn(b, d_in, seed=21)

    def seed_way() -> Tensor:  # the full [B, out, B, in] Jacobian, then its batch diagonal
        return ag_jacobian(f, x).diagonal(dim1=0, dim2=2).permute(2, 0, 1)

    size = f"MLP {d_in}→{hidden}→{d_out} sigmoid, B={b}: [{b}, {d_out}, {d_in}]"
    return seed_way, lambda: tj.jacobian(f, x, batch_dim=0), size


def _p002_pinn(small: bool) -> tuple[Thunk, Thunk, str]:
    sizes, b = ([2, 8, 3], 4) if small else ([2, 32, 32, 3], 16)
    f = _mlp(sizes, nn.Tanh, 22)
    x = _randn(b, 2, seed=23)

    def compute_u_x(z: Tensor) -> Tensor:
        u_x = ag_jacobian(f, z, create_graph=True)
        return torch.diagonal(u_x, dim1=0, dim2=2).permute(2, 0, 1)

    def seed_way() -> Tensor:  # the thread's compute_u_xx
        u_xx = ag_jacobian(compute_u_x, x)
        u_xx = torch.diagonal(u_xx, dim1=0, dim2=3).permute(3, 0, 1, 2)
        return torch.diagonal(u_xx, dim1=2, dim2=3)

    size = f"PINN MLP {'→'.join(map(str, sizes))} tanh, B={b}: u_xx [{b}, 3, 2]"
    return seed_way, lambda: tj.hessian_diagonal(f, x, batch_dim=0), size


# Seed 003: per-sample Jacobians [N, C, *p] (autograd double loop, BackPACK). -------------------
def seed003_model(small: bool = True) -> tuple[nn.Sequential, Tensor]:
    """Seed 003's MLP and input (its exact sizes when ``small``: N=15, 10→7→5)."""
    n, d_in, hidden, c = (15, 10, 7, 5) if small else (32, 64, 128, 10)
    gen = torch.Generator().manual_seed(30)
    return _mlp([d_in, hidden, c], nn.ReLU, 31), torch.rand(n, d_in, generator=gen)


def _seed003_autograd(model: nn.Module, x: Tensor) -> list[Tensor]:
    fs = model(x)
    jacobians = [torch.zeros(fs.shape + p.shape) for p in model.parameters()]
    for n, c in itertools.product(range(fs.shape[0]), range(fs.shape[1])):
        grads_n_c = torch.autograd.grad(fs[n, c], list(model.parameters()), retain_graph=True)
        for param_idx, param_grad in enumerate(grads_n_c):
            jacobians[param_idx][n, c, :] = param_grad
    return jacobians


def _tj003(model: nn.Module, x: Tensor) -> Thunk:
    return lambda: list(tj.param_jacobian(model, x, batch_dim=0).values())


def _p003(small: bool) -> tuple[Thunk, Thunk, str]:
    model, x = seed003_model(small)
    size = f"MLP {x.shape[1]}→{model[0].out_features}→{model[2].out_features} ReLU, N={len(x)}"
    return lambda: _seed003_autograd(model, x), _tj003(model, x), size


def _p003_backpack(small: bool) -> tuple[Thunk, Thunk, str]:
    from math import sqrt

    from backpack import backpack, extend, extensions

    model, x = seed003_model(small)
    twin = extend(copy.deepcopy(model))
    loss_func = extend(nn.MSELoss(reduction="sum"))

    def seed_way() -> list[Tensor]:
        fs = twin(x)
        loss = loss_func(fs, torch.zeros_like(fs))
        with backpack(extensions.SqrtGGNExact()):
            loss.backward()
        return [p.sqrt_ggn_exact.transpose(0, 1) / sqrt(2) for p in twin.parameters()]

    return seed_way, _tj003(model, x), _p003(small)[2]


# Seed 004: multi-task Jacobians (TorchJD's jac) and their Gramian. -----------------------------
def _p004_losses(small: bool) -> tuple[Callable[[], Tensor], list[Tensor], str]:
    sizes, n, tasks = ([8, 16, 16], 8, 4) if small else ([64, 256, 256], 128, 16)
    trunk = _mlp(sizes, nn.ReLU, 40)
    heads = _mlp([sizes[-1], tasks], nn.ReLU, 41)
    x, y = _randn(n, sizes[0], seed=42), _randn(n, tasks, seed=43)

    def losses() -> Tensor:
        return ((heads(torch.relu(trunk(x))) - y) ** 2).mean(0)

    size = f"trunk {'→'.join(map(str, sizes))}, {tasks} task losses, N={n}"
    return losses, list(trunk.parameters()), size


def _p004(small: bool) -> tuple[Thunk, Thunk, str]:
    from torchjd.autojac import jac

    losses, params, size = _p004_losses(small)
    return lambda: jac(losses(), params), lambda: tj.jac(losses(), params), size + ": J"


def _p004_gramian(small: bool) -> tuple[Thunk, Thunk, str]:
    from torchjd.autojac import jac

    losses, params, size = _p004_losses(small)

    def seed_way() -> Tensor:
        jacobians = jac(losses(), params)
        matrix = torch.concat([j.flatten(1) for j in jacobians], dim=1)
        return matrix @ matrix.T

    return seed_way, lambda: tj.gramian(losses(), params), size + ": J Jᵀ"


PROBLEMS = (
    Problem("000", "d(param grads)/d(output)", "row loop, autograd.grad", _p000),
    Problem("001", "d(output)/d(params)", "deparameterise + functional.jacobian", _p001),
    Problem("002", "per-sample input Jacobian", "full Jacobian + diagonal", _p002),
    Problem(
        "002", "PINN u_xx (Hessian diagonal)", "compute_u_xx (nested full Jacobians)", _p002_pinn
    ),
    Problem("003", "per-sample d(output)/d(params)", "autograd double loop", _p003),
    Problem(
        "003", "per-sample d(output)/d(params)", "BackPACK SqrtGGNExact", _p003_backpack, "backpack"
    ),
    Problem("004", "multi-task Jacobian", "torchjd.autojac.jac", _p004, "torchjd"),
    Problem("004", "multi-task Gramian", "torchjd jac, then J Jᵀ", _p004_gramian, "torchjd"),
)
