"""NOTE [parameter chain from operations]: a chain written as a module class, a ``ModuleList``
loop, a module around a model or with functional activations runs the parameter chain as its
``nn.Sequential`` does, exactly (float64 ``torch.func`` oracles, shapes of 1 included); a
forward that is not a chain (a residual, a transformed weight, another geometry, a pool, a
custom ``Function``, a ``no_grad`` block) takes the captured graph, exactly too."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import randn, record_answers
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import torchjac as tj
from torchjac._engine.core import fast
from torchjac._engine.modules import ntk_kernel, param_probes
from torchjac._engine.modules.layers import model_state
from torchjac._engine.modules.param_chain_ops import recorded_layers


class CNN(nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(width, 2, 3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(2 * 3 * 3, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.c1(x))
        x = torch.tanh(self.c2(x)).contiguous()
        return self.fc(self.drop(x.reshape(x.shape[0], -1)))


class Loop(nn.Module):
    def __init__(self, sizes: tuple[int, ...], act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


class Around(nn.Module):
    def __init__(self, net: nn.Module, how: str) -> None:
        super().__init__()
        self.net, self.how = net, how

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x)
        if self.how == "slice everything":
            return y[..., :]
        if self.how == "a residual":
            return y + x
        if self.how == "a transformed weight":
            return F.linear(y, 2 * self.net.layers[0].weight[:, : y.shape[-1]])
        if self.how == "a sum over the batch":
            return y.sum(0, keepdim=True)
        if self.how == "no_grad":
            with torch.no_grad():
                return y * 1
        raise AssertionError(self.how)


class OtherStride(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)

    def forward(self, x: Tensor) -> Tensor:  # the module's stride is 1
        return F.conv2d(x, self.c.weight, self.c.bias, stride=2).flatten(1)


class Pooled(CNN):
    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.max_pool2d(F.relu(self.c1(x)), 1)[:, :2, :3, :3].flatten(1))


class _Twice(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def, override]
        pass

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[no-untyped-def, override]
        return g * 2


class Custom(Loop):
    def forward(self, x: Tensor) -> Tensor:
        return self.layers[1](_Twice.apply(torch.tanh(self.layers[0](x))))


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(3)
        return build().double().eval()

    return make


CHAINS = {
    "a CNN module class": (_seeded(CNN), (1, 9, 9)),
    "width-1 convolutions": (_seeded(lambda: CNN(1)), (1, 9, 9)),
    "a ModuleList loop, torch.tanh": (_seeded(lambda: Loop((3, 5, 4, 2), torch.tanh)), (3,)),
    "x.relu() and a GELU": (
        _seeded(lambda: Loop((3, 4, 2), lambda t: F.gelu(t.relu()))),
        (3,),
    ),
    "width-1 layers, in-place relu": (
        _seeded(lambda: Loop((1, 1, 1), lambda t: F.relu(t, inplace=True))),
        (1,),
    ),
    "a module slicing a chain": (
        _seeded(lambda: Around(Loop((3, 4, 2), F.silu), "slice everything")),
        (3,),
    ),
}
NOT_CHAINS = {
    how: (_seeded(lambda how=how: Around(Loop((3, 3, 3), torch.tanh), how)), (3,))
    for how in ("a residual", "a transformed weight", "no_grad")
}
NOT_CHAINS.update(
    {
        "another stride than the module's": (_seeded(OtherStride), (1, 7, 7)),
        "a max pool": (_seeded(Pooled), (1, 9, 9)),
        "a custom Function": (_seeded(lambda: Custom((3, 4, 2), torch.tanh)), (3,)),
    }
)


@pytest.fixture
def chained(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    return record_answers(monkeypatch, param_probes, "param_chain")


@pytest.fixture
def ntk_chained(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    return record_answers(monkeypatch, ntk_kernel, "param_chain")


def _oracle(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    one = lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)  # noqa: E731
    return vmap(jacrev(one), (None, 0))(params, x)  # type: ignore[no-any-return]


def _check_ntk(model: nn.Module, x: Tensor) -> None:
    rows = torch.cat([j.flatten(2) for j in _oracle(model, x).values()], dim=2)  # [N, c, P]
    n, c = rows.shape[:2]
    want = (rows.flatten(0, 1) @ rows.flatten(0, 1).T).reshape(n, c, n, c)
    torch.testing.assert_close(tj.ntk(model, x), want, rtol=1e-10, atol=1e-12)


def _check(model: nn.Module, x: Tensor) -> None:
    want = _oracle(model, x)
    got = tj.param_jacobian(model, x, batch_dim=0)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("batch", [5, 1])
@pytest.mark.parametrize("name", list(CHAINS))
def test_chains_in_every_style_run_the_chain_exactly(
    gen: torch.Generator, chained: list[bool], ntk_chained: list[bool], name: str, batch: int
) -> None:
    build, shape = CHAINS[name]
    model, x = build(), randn(batch, *shape, gen=gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    _check(model, x)
    assert chained[-1] is True
    _check_ntk(model, x)
    assert ntk_chained[-1] is True
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with fast.fast_paths(False):
        _check(model, x)
        _check_ntk(model, x)
    assert chained[-1] is False and ntk_chained[-1] is False


@pytest.mark.parametrize("name", list(NOT_CHAINS))
def test_other_forwards_take_the_captured_graph_exactly(
    gen: torch.Generator, chained: list[bool], name: str
) -> None:
    build, shape = NOT_CHAINS[name]
    model, x = build(), randn(4, *shape, gen=gen)
    assert recorded_layers(model, model_state(model, []), x) is None
    _check(model, x)
    _check_ntk(model, x)
    assert True not in chained


def test_a_sum_over_the_batch_is_not_a_chain(gen: torch.Generator) -> None:
    model = _seeded(lambda: Around(Loop((3, 3, 3), torch.tanh), "a sum over the batch"))()
    x = randn(4, 3, gen=gen)
    assert recorded_layers(model, model_state(model, []), x) is None
    with pytest.raises(
        ValueError, match=r"mismatched batch sizes .* output has 1 but its inputs have 4"
    ):
        tj.param_jacobian(model, x, batch_dim=0)


def test_the_layers_are_the_models_own_modules(gen: torch.Generator) -> None:
    model = CHAINS["a CNN module class"][0]()
    x = randn(2, 1, 9, 9, gen=gen)
    layers = recorded_layers(model, model_state(model, ["fc.weight"]), x)
    assert layers is not None
    kinds = [type(m) for m in layers]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.Tanh, nn.Flatten, nn.Linear]
    assert layers[0] is model.c1 and layers[2] is model.c2 and layers[5] is model.fc
