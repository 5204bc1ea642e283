"""The function API leaves the user's model as it found it and differentiates one random draw.

NOTE [one draw per call], NOTE [module state] (``_engine/core/func_state.py``); every case runs with
the fast paths on and off (NOTE [fast paths]).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

import torchjac as tj
from torchjac._engine.core.fast import fast_paths
from torchjac._engine.core.func_state import reachable_modules

SECOND = ["hessian", "hessian_diagonal", "laplacian"]
FUNCTIONAL = ["jacobian", *SECOND]


@pytest.fixture(params=[True, False], ids=["fast", "general"])
def fast(request: pytest.FixtureRequest) -> Iterator[bool]:
    with fast_paths(request.param):
        yield request.param


def _storages(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _same(model: nn.Module, before: dict[str, Tensor]) -> bool:
    now = model.state_dict(keep_vars=True)
    return all(torch.equal(now[k].detach(), v) for k, v in before.items())


@pytest.mark.parametrize("name", FUNCTIONAL)
@pytest.mark.parametrize("widths", [(1, 16, 1), (3, 1), (1, 1), (2, 1, 3)], ids=str)
@pytest.mark.parametrize("batched", [True, False], ids=["B=1", "unbatched"])
def test_width_one_layers_are_never_written(
    name: str, widths: tuple[int, ...], batched: bool, fast: bool
) -> None:
    # the first Linear's transposed weight is contiguous when a dimension is 1: a view of it
    # must never be scaled in place (it was, on one sample)
    layers: list[nn.Module] = [nn.Linear(widths[0], widths[1]).double()]
    for a, b in itertools.pairwise(widths[1:]):
        layers += [nn.Tanh(), nn.Linear(a, b).double()]
    u = nn.Sequential(*layers)
    x = torch.full((1, widths[0]) if batched else (widths[0],), 0.3, dtype=torch.float64)
    before = _snapshot(u)
    kwargs = {"batch_dim": 0} if batched else {}
    first = getattr(tj, name)(u, x, **kwargs)
    second = getattr(tj, name)(u, x, **kwargs)
    assert _same(u, before)
    assert torch.equal(first, second)
    for p in u.parameters():
        assert _storages(first) != _storages(p)


@pytest.mark.parametrize("shape", [(3,), (1, 3)], ids=["unbatched", "B=1"])
def test_jacobian_of_a_linear_map_is_not_its_weight(shape: tuple[int, ...], fast: bool) -> None:
    lin = nn.Linear(3, 1).double()
    net = nn.Sequential(lin)
    x = torch.randn(shape, dtype=torch.float64)
    J = tj.jacobian(net, x, **({"batch_dim": 0} if len(shape) == 2 else {}))
    weight = lin.weight.detach().clone()
    J.zero_()
    assert torch.equal(lin.weight.detach(), weight)  # zeroing J left the model alone


def _dropout_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(2, 64), nn.Dropout(0.5), nn.Linear(64, 3)).double().train()


@pytest.mark.filterwarnings("ignore::torchjac.FallbackWarning")
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
def test_dropout_gives_the_jacobian_of_one_draw(mode: str, chunk_size: int | None) -> None:
    net = _dropout_net()
    x = torch.randn(2, dtype=torch.float64)
    rng = torch.get_rng_state()
    J = tj.jacobian(net, x, mode=mode, chunk_size=chunk_size)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(J, _one_draw(net, x, rng))  # the draw a plain call makes now
    assert torch.equal(torch.get_rng_state(), rng)


def _one_draw(net: nn.Module, x: Tensor, rng: Tensor) -> Tensor:
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        mask = net[1](torch.ones(64, dtype=torch.float64))  # the mask, scaled
    w1, w2 = net[0].weight.detach(), net[2].weight.detach()
    return w2 @ (mask[:, None] * w1)


@pytest.mark.filterwarnings("ignore::torchjac.FallbackWarning")
@pytest.mark.parametrize("name", SECOND)
def test_dropout_second_derivatives_are_one_draw(name: str) -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 1))
    net = net.double().train()
    x = torch.randn(5, 2, dtype=torch.float64)
    rng = torch.get_rng_state()
    got = getattr(tj, name)(net, x, batch_dim=0)
    assert torch.equal(torch.get_rng_state(), rng)
    net_eval = _frozen_mask(net, rng, x.shape[0])
    ref = getattr(tj, name)(net_eval, x, batch_dim=0)
    torch.testing.assert_close(got, ref)


def _frozen_mask(net: nn.Module, rng: Tensor, batch: int) -> Callable[[Tensor], Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        mask = net[1](torch.ones(batch, 16, dtype=torch.float64))

    def f(x: Tensor) -> Tensor:
        return net[3](net[2](net[0](x) * mask))

    return f


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))


class _Holder:
    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, x: Tensor) -> Tensor:
        return self.net(x)


def _styles(net: nn.Module) -> dict[str, Callable[[Tensor], Tensor]]:
    def closure(x: Tensor) -> Tensor:
        return net(x)[..., :1]

    return {
        "module": net,
        "lambda": lambda x: net(x).sin(),
        "closure": closure,
        "partial": functools.partial(lambda m, x: m(x), net),
        "method": net.forward,
        "object": _Holder(net),
    }


@pytest.mark.filterwarnings("ignore::torchjac.FallbackWarning")
@pytest.mark.parametrize("style", ["module", "lambda", "closure", "partial", "method", "object"])
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_batchnorm_statistics_are_restored(name: str, style: str, fast: bool) -> None:
    net = _bn_net().double().train()
    before = _snapshot(net)
    func = _styles(net)[style]
    x = torch.randn(5, 3, dtype=torch.float64)
    getattr(tj, name)(func, x)  # the whole batch is one sample: exact
    assert _same(net, before)
    with pytest.raises(tj.BatchCouplingError, match=name):  # the batch statistic couples
        getattr(tj, name)(func, x, batch_dim=0)
    assert _same(net, before)
    assert net.training


@pytest.mark.parametrize("name", FUNCTIONAL)
def test_buffers_are_restored_when_func_raises(name: str) -> None:
    net = _bn_net().double().train()
    before = _snapshot(net)

    def failing(x: Tensor) -> Tensor:
        y = net(x)
        raise RuntimeError("user code failed")
        return y

    with pytest.raises(RuntimeError, match="user code failed"):
        getattr(tj, name)(failing, torch.randn(5, 3, dtype=torch.float64))
    assert _same(net, before)


def test_unchanged_buffers_keep_their_version() -> None:
    # a buffer is written back only where it changed: a graph that saved it stays usable
    net = _bn_net().double().eval()
    versions = [b._version for b in net.buffers()]
    tj.jacobian(net, torch.randn(5, 3, dtype=torch.float64), batch_dim=0)
    assert [b._version for b in net.buffers()] == versions


def test_reachable_modules_follow_the_ways_models_are_wrapped() -> None:
    net = _bn_net()
    for style, func in _styles(net).items():
        assert any(m is net for m in reachable_modules(func)), style
    assert reachable_modules(lambda x: x.sin()) == []


def test_the_counting_pass_never_writes_the_input() -> None:
    x = torch.randn(4, 6, dtype=torch.float64)
    before = x.clone()

    def writes(x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            x.mul_(2)  # harmless on a copy; on the user's tensor it would change the input
        return x.sin()

    tj.jacobian(writes, x, batch_dim=0)
    assert torch.equal(x, before)
