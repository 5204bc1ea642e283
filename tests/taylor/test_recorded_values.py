"""NOTE [recorded values]: the chain starts from the values its recording computed, with copies
of the operands as each step read them; against float64 torch.func oracles, for forwards that
write in place, reuse or view their weights, select outputs, draw random numbers, or change
their weights between calls — and the user's module is left as found."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import second_order_oracle
from torch import Tensor, nn

import torchjac as tj
from torchjac._engine.taylor import taylor_chain

DTYPE = torch.float64
NAMES = ["jacobian", "hessian", "hessian_diagonal", "laplacian"]
Forward = Callable[["Net", Tensor], Tensor]


_oracle = second_order_oracle


@dataclass
class Path:
    """Per call: whether the recording proved a chain, and whether the chain ran its own forward
    (the recorded values were dropped)."""

    chains: list[bool]
    forwards: list[int]

    @property
    def values(self) -> bool:  # a proven chain, from the recorded values
        return bool(self.chains) and all(self.chains) and not self.forwards

    @property
    def own_forward(self) -> bool:  # a proven chain, from its own forward
        return bool(self.chains) and all(self.chains) and bool(self.forwards)


@pytest.fixture
def path(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    p = Path([], [])
    record, forward = taylor_chain.recorded_chain, taylor_chain._forward

    def spy_record(*args: object) -> object:
        chain = record(*args)  # type: ignore[arg-type]
        p.chains.append(chain is not None)
        return chain

    def spy_forward(*args: object) -> object:
        p.forwards.append(1)
        return forward(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(taylor_chain, "recorded_chain", spy_record)
    monkeypatch.setattr(taylor_chain, "_forward", spy_forward)
    yield p


class Net(nn.Module):
    """Two Linear layers (``a``: 3 → 6, ``b``: 6 → 2), normalisation buffers, and a forward
    given as a function of the module."""

    def __init__(self, forward: Forward, widths: tuple[int, int, int] = (3, 6, 2)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(widths[0], widths[1]).to(DTYPE)
        self.b = nn.Linear(widths[1], widths[2]).to(DTYPE)
        self.register_buffer("mean", torch.randn(widths[0], dtype=DTYPE))
        self.register_buffer("std", torch.rand(widths[0], dtype=DTYPE) + 0.5)
        self.fwd = forward

    def forward(self, x: Tensor) -> Tensor:
        return self.fwd(self, x)


def _iadd(s: Net, x: Tensor) -> Tensor:
    h = x @ s.a.weight.T
    h += s.a.bias
    return s.b(torch.tanh(h))


def _read_twice(s: Net, x: Tensor) -> Tensor:
    h = s.a(x)
    return s.b(torch.tanh(h) + torch.sin(h))


def _stored(s: Net, x: Tensor) -> Tensor:  # intermediates kept on the module
    s.h = torch.tanh(s.a(x))
    s.y = s.b(s.h)
    return s.y


# forwards the chain takes from the recorded values
VALUES: dict[str, Forward] = {
    "tanh twice": lambda s, x: s.b(torch.tanh(torch.tanh(s.a(x)))),
    "normalised input": lambda s, x: s.b(torch.tanh(s.a((x - s.mean) / s.std))),
    "scale and shift after": lambda s, x: 3.0 * s.b(torch.sigmoid(s.a(x) / 2)) - 1,
    "x @ W.T + b": lambda s, x: s.b(F.silu(x @ s.a.weight.T + s.a.bias)),
    "matmul by W.t()": lambda s, x: s.b(torch.exp(torch.matmul(x, s.a.weight.t()) + s.a.bias)),
    "activation of the input": lambda s, x: s.b(torch.tanh(s.a(torch.sin(x)))),
    "ends with an activation": lambda s, x: torch.cos(s.b(torch.tanh(s.a(x)))),
    "gelu": lambda s, x: s.b(F.gelu(s.a(x))),
    "softplus across its threshold": lambda s, x: s.b(
        F.softplus(3 * s.a(x), beta=2.0, threshold=1.0)
    ),
    "nn.Softplus": lambda s, x: s.b(nn.Softplus(0.5, 0.3)(3 * s.a(x))),
    "relu": lambda s, x: s.b(torch.relu(s.a(x))),
    "dropout in eval": lambda s, x: s.b(F.dropout(torch.tanh(s.a(x)), 0.5, training=False)),
    "dropout p=0, in place": lambda s, x: s.b(F.dropout(torch.tanh(s.a(x)), 0.0, True, True)),
    "scaled by a bias": lambda s, x: s.b(torch.tanh(s.a(x)) * s.a.bias),
    "divided by a bias": lambda s, x: s.b(torch.tanh(s.a(x)) / s.a.bias),
    "intermediates stored on self": _stored,
    "[..., 0]": lambda s, x: s.b(torch.tanh(s.a(x)))[..., 0],
    "[..., [1, 0]]": lambda s, x: s.b(torch.tanh(s.a(x)))[..., [1, 0]],
    "narrow": lambda s, x: s.b(torch.tanh(s.a(x))).narrow(-1, 1, 1),
}
# forwards whose values were written in place: the chain's own forward
OWN_FORWARD: dict[str, Forward] = {
    "nn.ReLU(inplace=True)": lambda s, x: s.b(nn.ReLU(inplace=True)(s.a(x))),
    "F.silu(inplace=True)": lambda s, x: s.b(F.silu(s.a(x), inplace=True)),
    "tanh_ then sin": lambda s, x: s.b(torch.sin(s.a(x).tanh_())),
    "cos then relu_": lambda s, x: s.b(torch.cos(s.a(x)).relu_()),
}
# not a chain: the general path
GENERAL: dict[str, Forward] = {
    "h += b": _iadd,
    "mul_ after a linear map": lambda s, x: s.b(torch.tanh(s.a(x).mul_(2))),
    "clamp_": lambda s, x: s.b(torch.tanh(s.a(x).clamp_(-0.5, 0.5))),
    "one activation read twice": _read_twice,
    "gelu, tanh approximation": lambda s, x: s.b(F.gelu(s.a(x), approximate="tanh")),
    "1 - h": lambda s, x: s.b(1 - torch.tanh(s.a(x))),
    "a float32 shift": lambda s, x: s.b(torch.tanh(s.a(x)) + torch.ones(6)),
}


def _state(m: nn.Module) -> list[tuple[str, Tensor, bool, Tensor | None, int]]:
    return [
        (n, t.detach().clone(), t.requires_grad, None if t.grad is None else t.grad.clone(), id(t))
        for n, t in itertools.chain(m.named_parameters(), m.named_buffers())
    ]


def _assert_as_found(m: nn.Module, before: list[tuple[str, Tensor, bool, Tensor | None, int]]):
    for (n, t, rg, g, i), (n2, t2, rg2, g2, i2) in zip(before, _state(m), strict=True):
        assert (n, rg, i) == (n2, rg2, i2)
        assert torch.equal(t, t2), n
        assert (g is None) == (g2 is None) and (g is None or torch.equal(g, g2)), n


def _check(name: str, m: nn.Module, shape: tuple[int, ...]) -> None:
    batched = len(shape) == 2
    x = torch.randn(shape, dtype=DTYPE)
    x0, before = x.clone(), _state(m)
    got = getattr(tj, name)(m, x, **({"batch_dim": 0} if batched else {}))
    _assert_as_found(m, before)
    assert torch.equal(x, x0)
    torch.testing.assert_close(got, _oracle(name, m, x, batched))


@pytest.mark.parametrize("case", list(VALUES))
def test_chains_from_the_recorded_values(case: str, path: Path) -> None:
    m = Net(VALUES[case])
    for name in NAMES:
        _check(name, m, (4, 3))
    _check("hessian", m, (3,))
    assert path.values


@pytest.mark.parametrize("case", list(OWN_FORWARD))
def test_values_written_in_place_give_the_chains_own_forward(case: str, path: Path) -> None:
    m = Net(OWN_FORWARD[case])
    for name in ["jacobian", "hessian"]:
        _check(name, m, (4, 3))
    assert path.own_forward


@pytest.mark.filterwarnings("ignore::torchjac.FallbackWarning")
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap of clamp_
@pytest.mark.parametrize("case", list(GENERAL))
def test_what_is_not_a_chain_is_exact_on_the_general_path(case: str, path: Path) -> None:
    _check("hessian_diagonal", Net(GENERAL[case]), (4, 3))
    assert not any(path.chains)


class Shared(nn.Module):
    """One Linear applied twice, weights read through views (transposed, expanded, strided)."""

    def __init__(self, view: str) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.wt = nn.Parameter(torch.randn(3, 4, dtype=DTYPE))  # stored transposed
        self.row = nn.Parameter(torch.randn(1, 4, dtype=DTYPE))
        self.big = nn.Parameter(torch.randn(6, 8, dtype=DTYPE))
        self.m = nn.Linear(4, 4).to(DTYPE)
        self.out = nn.Linear(4, 2).to(DTYPE)
        self.view = view

    def forward(self, x: Tensor) -> Tensor:
        w = {"transposed": self.wt.T, "expanded": self.row.T.expand(4, 3)}.get(self.view)
        w = self.big[:3, ::2].T if w is None else w
        h = torch.tanh(F.linear(x, w))
        h = torch.tanh(self.m(torch.sin(self.m(h))))
        return self.out(h)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("view", ["transposed", "expanded", "strided"])
def test_shared_layers_and_weight_views(view: str, name: str, path: Path) -> None:
    _check(name, Shared(view), (4, 3))
    assert path.values


def test_a_shared_weight_written_through_data_between_its_uses(path: Path) -> None:
    # each use as it read the weight (the copies of NOTE [recorded values])
    m = Shared("transposed")
    w = m.m.weight

    def f(x: Tensor) -> Tensor:
        h = torch.tanh(m.m(torch.tanh(F.linear(x, m.wt.T))))
        w.data.mul_(2)
        h = torch.tanh(m.m(h))
        w.data.div_(2)
        return m.out(h)

    def as_it_ran(x: Tensor) -> Tensor:
        h = torch.tanh(m.m(torch.tanh(F.linear(x, m.wt.T))))
        return m.out(torch.tanh(F.linear(h, 2 * w, m.m.bias)))

    x = torch.randn(4, 3, dtype=DTYPE)
    before = w.detach().clone()
    for name in NAMES:
        got = getattr(tj, name)(f, x, batch_dim=0)
        torch.testing.assert_close(got, _oracle(name, as_it_ran, x, True))
    assert torch.equal(w, before) and path.values


class Width1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a, self.m, self.b = (nn.Linear(i, o).to(DTYPE) for i, o in [(1, 4), (4, 1), (1, 1)])

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.m(torch.sin(2.0 * self.a(x))))) + 0.5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(4, 1), (1, 1), (1,)], ids=["B=4", "B=1", "[D]"])
def test_layers_of_width_one(shape: tuple[int, ...], name: str, path: Path) -> None:
    _check(name, Width1(), shape)
    assert path.values


@pytest.mark.parametrize("shape", [(5, None), (1, None), (None, None)], ids=["B=5", "B=1", "[D]"])
@pytest.mark.parametrize("d, r", [(2, 1), (2, 3), (3, 1), (4, 2), (5, 2)])
def test_full_hessians_for_every_pair_plan(
    d: int, r: int, shape: tuple[int | None, ...], path: Path
) -> None:
    # _accumulate: one broadcast sum (R·D² < 9), per-sample products, one direction at a time
    net = nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 4), nn.Softplus(), nn.Linear(4, r))
    net = net.to(DTYPE)
    m = Net(lambda s, x: net(x))
    m.net = net  # reached by the call (NOTE [module state])
    b = shape[0]
    _check("hessian", m, (d,) if b is None else (b, d))
    assert path.values


def test_float32_model_and_inputs(path: Path) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))  # float32
    m = Net(lambda s, x: 2 * net(x))
    m.net = net
    wide = copy.deepcopy(net).to(DTYPE)
    x = torch.randn(4, 3)
    for name in NAMES:
        got = getattr(tj, name)(m, x, batch_dim=0)
        assert got.dtype == torch.float32
        ref = _oracle(name, lambda v: 2 * wide(v), x.to(DTYPE), True)
        torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-5)
    assert path.values


def test_results_follow_the_weights_of_a_training_loop(path: Path) -> None:
    m = Net(lambda s, x: s.b(torch.tanh(s.a(x))))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = torch.randn(4, 3, dtype=DTYPE)
    previous = None
    for _ in range(3):
        for name in NAMES:
            _check(name, m, (4, 3))  # with .grad set from the second round on
        got = tj.hessian(m, x, batch_dim=0)
        assert previous is None or not torch.allclose(got, previous)
        previous = got
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    assert path.values


def test_frozen_parameters(path: Path) -> None:
    m = Net(lambda s, x: s.b(torch.tanh(s.a(x))))
    m.requires_grad_(False)
    for name in NAMES:
        _check(name, m, (4, 3))
    assert path.values


def test_stored_intermediates_are_left_as_the_call_computed_them(path: Path) -> None:
    m = Net(_stored)
    x = torch.randn(4, 3, dtype=DTYPE)
    for name in NAMES:
        getattr(tj, name)(m, x, batch_dim=0)
        torch.testing.assert_close(m.h, torch.tanh(m.a(x)).detach(), rtol=0, atol=0)
        torch.testing.assert_close(m.y, m.b(m.h).detach(), rtol=0, atol=0)
    assert path.values


def test_a_random_scale_is_the_draw_of_a_plain_call(path: Path) -> None:
    # NOTE [one draw per call]: the recorded values are those of the draw a plain call makes
    m = Net(lambda s, x: s.b(torch.tanh(s.a(x) * torch.rand(6, dtype=DTYPE))))
    x = torch.randn(4, 3, dtype=DTYPE)
    for name in NAMES:
        torch.manual_seed(7)
        state = torch.get_rng_state()
        got = getattr(tj, name)(m, x, batch_dim=0)
        assert torch.equal(torch.get_rng_state(), state)
        mask = torch.rand(6, dtype=DTYPE)
        ref = _oracle(name, lambda v, mask=mask: m.b(torch.tanh(m.a(v) * mask)), x, True)
        torch.testing.assert_close(got, ref)
    assert path.values


def _wide() -> nn.Module:
    """A chain with a weight of more than ``_COPY_NUMEL`` elements (260² > 2¹⁶)."""
    torch.manual_seed(4)
    layers = [nn.Linear(3, 260), nn.Tanh(), nn.Linear(260, 260), nn.Tanh(), nn.Linear(260, 2)]
    net = nn.Sequential(*layers).to(DTYPE)
    m = Net(lambda s, x: net(x))
    m.net = net
    return m


@pytest.mark.parametrize("shape", [(4, 3), (3,), (32, 3)], ids=["B=4", "[D]", "B=32"])
def test_a_large_weight_is_copied_only_for_many_samples(shape: tuple[int, ...], path: Path) -> None:
    # below 32 samples the chain reads it as it is and runs its own forward
    m = _wide()
    for name in ["jacobian", "laplacian"]:
        _check(name, m, shape)
    assert path.values if shape == (32, 3) else path.own_forward


@pytest.mark.filterwarnings("ignore::torchjac.FallbackWarning")
def test_a_large_weight_written_through_data_during_the_call(path: Path) -> None:
    # not copied: the chain's own forward differs from the recorded output (the general path)
    m = _wide()
    w = m.net[2].weight

    def f(x: Tensor) -> Tensor:
        h = m.net[2](torch.tanh(m.net[0](x)))
        w.data.mul_(2)
        y = m.net[4](torch.tanh(h))
        w.data.div_(2)
        return y

    x = torch.randn(4, 3, dtype=DTYPE)
    got = tj.laplacian(f, x, batch_dim=0)
    torch.testing.assert_close(got, _oracle("laplacian", m, x, True))
    assert path.own_forward
