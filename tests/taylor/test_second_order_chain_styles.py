"""NOTE [chain from operations]: the Taylor chain for every way a chain model is written, and
the general path wherever the recording cannot prove a chain (float64 torch.func oracles)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import record_answers, second_order_oracle
from torch import Tensor, nn

import torchjac as tj
from torchjac._engine.core.fast import fast_paths
from torchjac._engine.taylor import taylor_chain

DTYPE = torch.float64
NAMES = ["jacobian", "hessian", "hessian_diagonal", "laplacian"]


def _mlp(widths: tuple[int, ...] = (3, 8, 8, 2), act: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(widths[0], widths[1])]
    for a, b in itertools.pairwise(widths[1:]):
        layers += [act(), nn.Linear(a, b)]
    return nn.Sequential(*layers).to(DTYPE)


class Functional(nn.Module):
    """A module class with its own parameters and a functional forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.w1 = nn.Parameter(torch.randn(8, 3, dtype=DTYPE) / 2)
        self.b1 = nn.Parameter(torch.randn(8, dtype=DTYPE))
        self.w2 = nn.Parameter(torch.randn(2, 8, dtype=DTYPE) / 3)
        self.register_buffer("mean", torch.tensor([0.1, -0.2, 0.3], dtype=DTYPE))
        self.register_buffer("std", torch.tensor([1.5, 0.5, 2.0], dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        h = (x - self.mean) / self.std
        h = F.silu(h @ self.w1.T + self.b1)
        return 2.0 * F.linear(h, self.w2) + 1.0


class Loop(nn.Module):
    """A ``ModuleList`` loop with ``torch.tanh`` between the layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in [(3, 6), (6, 6), (6, 1)])
        self.to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)


def _styles() -> dict[str, Callable[[Tensor], Tensor]]:
    net, loop = _mlp(), Loop()
    gelu = _mlp((3, 5, 4), nn.GELU)

    def closure(x: Tensor) -> Tensor:
        return net(x)[..., 1]

    return {
        "module class, functional forward": Functional(),
        "ModuleList loop": Loop(),
        "lambda squeeze": lambda x: loop(x).squeeze(-1),
        "closure selecting an output": closure,
        "lambda permuting outputs": lambda x: net(x)[..., [1, 0]],
        "partial": functools.partial(lambda m, x: m(x), gelu),
        "wrapper module": nn.Sequential(nn.Identity(), net),  # a Sequential holding a Sequential
    }


STYLES = list(_styles())


def _per_sample(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda r: f(r.unsqueeze(0))[0]


_oracle = second_order_oracle


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    yield record_answers(monkeypatch, taylor_chain, "recorded_chain")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shape", [(5, 3), (1, 3), (3,)], ids=["B=5", "B=1", "unbatched"])
def test_every_style_takes_the_chain_and_is_exact(
    style: str, name: str, shape: tuple[int, ...], recorded: list[bool]
) -> None:
    f = _styles()[style]
    x = torch.randn(shape, dtype=DTYPE)
    batched = len(shape) == 2
    kwargs = {"batch_dim": 0} if batched else {}
    got = getattr(tj, name)(f, x, **kwargs)
    torch.testing.assert_close(got, _oracle(name, f, x, batched))
    if style != "wrapper module":  # a plain Sequential is read from its layers, not recorded
        assert recorded and all(recorded)


def _residual(net: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda x: net[2](torch.tanh(net[0](x)) + torch.tanh(net[0](x)).sin())


class _Double(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return 2 * x

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: Tensor) -> None:
        return None

    @staticmethod
    def backward(ctx: object, g: Tensor) -> Tensor:
        return 2 * g

    @staticmethod
    def jvp(ctx: object, t: Tensor) -> Tensor:
        return 2 * t


def _declining() -> dict[str, tuple[Callable[[Tensor], Tensor], bool]]:
    """Functions the recording must not take for a chain: (func, batched)."""
    net = _mlp((3, 6, 6, 2))
    w = torch.randn(2, 6, dtype=DTYPE)

    def weight_from_x(x: Tensor) -> Tensor:  # an operand that depends on x
        return F.linear(torch.tanh(net[0](x)), w * x.sum())

    def weight_written(x: Tensor) -> Tensor:  # an operand changed after its step
        v = net[2].weight.detach().clone()
        h = F.linear(torch.tanh(net[0](x)), v)
        v.mul_(0.5)
        return torch.tanh(h)

    def in_no_grad(x: Tensor) -> Tensor:
        h = torch.tanh(net[0](x))
        with torch.no_grad():
            h = h * 1.0
        return net[2](h)

    def script_between(x: Tensor) -> Tensor:
        return net[2](_scripted(torch.tanh(net[0](x))))

    return {
        "residual": (_residual(net), True),
        "custom autograd.Function": (lambda x: net[2](_Double.apply(torch.tanh(net[0](x)))), True),
        "weight computed from x": (weight_from_x, False),
        "weight written after its step": (weight_written, True),
        "no_grad block": (in_no_grad, True),
        "TorchScript between layers": (script_between, True),
    }


@torch.jit.script
def _scripted(h: Tensor) -> Tensor:
    return h * h


@pytest.mark.filterwarnings("ignore::torchjac.FallbackWarning")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", list(_declining()))
def test_what_is_not_a_proven_chain_takes_the_general_path(
    case: str, name: str, recorded: list[bool]
) -> None:
    f, batched = _declining()[case]
    if case == "weight written after its step" and name == "hessian":
        name = "laplacian"  # nested AD (the full Hessian's plan here) refuses the written weight
    x = torch.randn((4, 3) if batched else (3,), dtype=DTYPE)
    kwargs = {"batch_dim": 0} if batched else {}
    got = getattr(tj, name)(f, x, **kwargs)
    assert not any(recorded)
    with fast_paths(False):
        torch.testing.assert_close(got, getattr(tj, name)(f, x, **kwargs))
    if case != "no_grad block":  # forward and reverse AD read a no_grad block differently
        torch.testing.assert_close(got, _oracle(name, _reference(case, f), x, batched))


def _reference(case: str, f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if case != "weight written after its step":
        return f
    net = _mlp((3, 6, 6, 2))  # the step read the weight before the write
    return lambda x: torch.tanh(F.linear(torch.tanh(net[0](x)), net[2].weight))


@pytest.mark.parametrize("select", ["flip", "other sample"])
def test_a_selection_across_samples_is_never_a_chain(select: str, recorded: list[bool]) -> None:
    net = _mlp()
    f = (lambda x: net(x).flip(0)) if select == "flip" else (lambda x: net(x)[[1, 0, 2]])
    with pytest.raises(tj.BatchCouplingError, match="laplacian"):
        tj.laplacian(f, torch.randn(3, 3, dtype=DTYPE), batch_dim=0)
    assert not any(recorded)


class _InPlace(nn.Module):
    """A chain whose activations write into their input (``Tensor.tanh_``, ``inplace=True``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = nn.Linear(3, 6).to(DTYPE), nn.Linear(6, 2).to(DTYPE)
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if self.how == "tanh_":
            h = h.tanh_()
        elif self.how == "relu inplace":
            h = F.relu(h, inplace=True)
        else:  # the second activation rewrites the first one's kept output
            h = torch.sin(h).relu_()
        return self.b(h)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("style", ["module class, functional forward", "ModuleList loop"])
def test_the_chain_starts_from_the_values_the_recording_kept(
    style: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NOTE [recorded values]: no forward of the chain's own
    def no_forward(*args: object) -> None:
        raise AssertionError("the chain ran its own forward")

    monkeypatch.setattr(taylor_chain, "_forward", no_forward)
    f = _styles()[style]
    x = torch.randn(4, 3, dtype=DTYPE)
    got = getattr(tj, name)(f, x, batch_dim=0)
    torch.testing.assert_close(got, _oracle(name, f, x, True))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["tanh_", "relu inplace", "sin then relu_"])
def test_values_written_in_place_are_not_used(
    how: str, name: str, recorded: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    forwards: list[int] = []
    run = taylor_chain._forward
    monkeypatch.setattr(taylor_chain, "_forward", lambda *a: forwards.append(1) or run(*a))
    f = _InPlace(how)
    x = torch.randn(5, 3, dtype=DTYPE)
    got = getattr(tj, name)(f, x, batch_dim=0)
    torch.testing.assert_close(got, _oracle(name, f, x, True))
    assert recorded and all(recorded) and forwards  # a chain, from its own forward


@pytest.mark.parametrize("name", NAMES)
def test_a_weight_written_through_data_during_the_call_is_read_as_the_step_read_it(
    name: str, recorded: list[bool]
) -> None:
    net = _mlp((3, 6, 6, 2))
    w = net[2].weight

    def through_data(x: Tensor) -> Tensor:  # no version counter sees these writes
        h = torch.tanh(net[0](x))
        w.data.mul_(2)
        y = torch.tanh(net[2](h))
        w.data.div_(2)
        return net[4](y)

    def as_it_ran(x: Tensor) -> Tensor:
        h = torch.tanh(net[0](x))
        return net[4](torch.tanh(F.linear(h, 2 * w, net[2].bias)))

    x = torch.randn(4, 3, dtype=DTYPE)
    before = w.detach().clone()
    got = getattr(tj, name)(through_data, x, batch_dim=0)
    torch.testing.assert_close(got, _oracle(name, as_it_ran, x, True))
    assert recorded and all(recorded)
    assert torch.equal(w, before)


class _Addmm(nn.Module):
    """``torch.addmm`` and ``Tensor.addmm`` for the linear maps, negations between them."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp((3, 6, 2))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.net[0], self.net[2]
        h = -torch.tanh(torch.addmm(a.bias, x, a.weight.T))
        return -b.bias.addmm(h, b.weight.T)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(5, 3), (1, 3)], ids=["B=5", "B=1"])
def test_addmm_and_negation_are_steps_of_a_chain(
    name: str, shape: tuple[int, ...], recorded: list[bool]
) -> None:
    f = _Addmm()
    x = torch.randn(shape, dtype=DTYPE)
    got = getattr(tj, name)(f, x, batch_dim=0)
    torch.testing.assert_close(got, _oracle(name, f, x, True))
    assert recorded and all(recorded)
