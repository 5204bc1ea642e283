"""W6 and W6b: the empirical neural tangent kernel of an MLP and of a small CNN.

MLP 32→256→256→6 ReLU, N=64 → ``Θ[n, a, m, b] = <d f(x_n)_a / dθ, d f(x_m)_b / dθ>``, shape
``[64, 6, 64, 6]``. W6b: W3b's CNN (Conv2d 1→8 and 8→16, ReLU, Linear 784→10), N=32,
``[32, 10, 32, 10]``. Peers: the two methods of the ``torch.func`` NTK tutorial (Jacobian
contraction, NTK-vector products; not on W6b, where they take minutes) and TorchJD's
``autogram.Engine`` (Gramian of the output's Jacobian, accumulated per module). Each torchjac
row runs the model as an ``nn.Sequential``, a module class and a module slicing its output.
Reference: float64 Jacobian contraction.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

import torchjac as tj
from benchmarks._common import as_double, mlp, module_styles, plain_params, randn
from benchmarks._harness import Case, Strategy, Workload

__all__ = ["WORKLOADS"]

Params = dict[str, Tensor]


def _fnet_single(model: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    def f(params: Params, x: Tensor) -> Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    return f


def _jacobian_contraction(model: nn.Module, x: Tensor) -> Tensor:
    # The tutorial's `empirical_ntk_jacobian_contraction`, output laid out [N, o, N, o].
    params = plain_params(model)
    jac = vmap(jacrev(_fnet_single(model)), (None, 0))(params, x)
    flat = [j.flatten(2) for j in jac.values()]
    return sum(torch.einsum("Naf,Mbf->NaMb", j, j) for j in flat)  # type: ignore[return-value]


def _ntk_vps(model: nn.Module, x: Tensor) -> Tensor:
    # The tutorial's `empirical_ntk_ntk_vps` (compute="full"), output laid out [N, o, N, o].
    params = plain_params(model)
    func = _fnet_single(model)

    def get_ntk(x1: Tensor, x2: Tensor) -> Tensor:
        def func_x1(p: Params) -> Tensor:
            return func(p, x1)

        def func_x2(p: Params) -> Tensor:
            return func(p, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec: Tensor) -> Tensor:
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps  # type: ignore[no-any-return]

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
        return vmap(get_ntk_slice)(basis)  # type: ignore[no-any-return]

    result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x, x)  # [N, M, a, b]
    return result.permute(0, 2, 1, 3)


def _autogram(model: nn.Module, x: Tensor) -> Strategy:
    name = "torchjd.autogram.Engine (batch_dim=0)"
    try:
        from torchjd.autogram import Engine
    except ImportError:
        return Strategy(name, lambda _: None, requires=("torchjd",))
    twin = copy.deepcopy(model)  # the engine hooks its modules: keep them off the shared model
    engine = Engine(twin, batch_dim=0)
    n, o = x.shape[0], model(x[:1]).shape[1]

    def run(out: Tensor) -> Tensor:
        return engine.compute_gramian(out).reshape(n, o, n, o)

    return Strategy(name, run, lambda: twin(x))


def _case(model: nn.Sequential, x: Tensor, size: str, vps: bool = True) -> Case:
    reference = _jacobian_contraction(as_double(model), x.double())
    strategies = [
        Strategy(
            "torch.func tutorial: Jacobian contraction", lambda _: _jacobian_contraction(model, x)
        ),
        *(
            [Strategy("torch.func tutorial: NTK-vector products", lambda _: _ntk_vps(model, x))]
            if vps
            else []
        ),
        _autogram(model, x),
        Strategy("tj.ntk(model, X)", lambda _: tj.ntk(model, x), torchjac=True),
        *(
            Strategy(f"tj.ntk, {style}", lambda _, g=g: tj.ntk(g, x), torchjac=True)  # type: ignore[misc]
            for style, g in module_styles(model)
        ),
    ]
    return Case(reference, strategies, size)


def _build(small: bool) -> Case:
    sizes = [8, 32, 32, 6] if small else [32, 256, 256, 6]
    n = 16 if small else 64
    model = mlp(sizes, nn.ReLU, seed=60)
    x = randn(n, sizes[0], seed=61)
    o = sizes[-1]
    return _case(model, x, f"MLP {'→'.join(map(str, sizes))} ReLU, N={n}: [{n}, {o}, {n}, {o}]")


def _build_cnn(small: bool) -> Case:
    from benchmarks.w3_param_jacobian import _cnn

    n = 8 if small else 32
    model, x = _cnn(small), randn(n, 1, 28, 28, seed=62)
    return _case(
        model, x, f"W3b's CNN (2×Conv2d + Linear), 1×28×28, N={n}: [{n}, 10, {n}, 10]", False
    )


WORKLOADS = [
    Workload("W6", "empirical NTK", _build),
    Workload("W6b", "empirical NTK of a small CNN", _build_cnn),
]
