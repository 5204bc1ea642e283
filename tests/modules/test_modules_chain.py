"""Per-sample parameter Jacobians of plain layer chains (NOTE [parameter chain]) against
``vmap(jacrev(functional_call))`` in float64, where the chain must not apply, and the scattered
convolution input gradient (NOTE [convolution input gradient]) against torch's."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable

import pytest
import torch
from conftest import randn, record_answers
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import torchjac as tj
from torchjac._engine.kernel.conv_grad import conv_input_grad, scatter_input_grad
from torchjac._engine.modules import param_probes


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(5)
        return build().double()

    return make


def _tied() -> nn.Module:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b, nn.Sigmoid(), nn.Linear(4, 2))


def _frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    return model


# name -> (model, per-sample input shape)
CHAINS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "tanh MLP": (_seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))), (4,)),
    "small CNN, stride 2": (
        _seeded(
            lambda: nn.Sequential(
                nn.Conv2d(1, 3, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(3, 4, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 3 * 3, 5),
            )
        ),
        (1, 10, 10),
    ),
    "convolutions torch computes (stride 1, many channels, groups, dilation)": (
        _seeded(
            lambda: nn.Sequential(
                nn.Conv2d(2, 20, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(20, 4, (2, 3), stride=(1, 2), dilation=(2, 1), groups=2),
                nn.Tanh(),
                nn.Conv2d(4, 4, 3, stride=2, groups=4, bias=False),
                nn.Flatten(),
                nn.Linear(4 * 3, 3),
            )
        ),
        (2, 9, 8),
    ),
    "Conv1d, strides and dilation": (
        _seeded(
            lambda: nn.Sequential(
                nn.Conv1d(2, 4, 3, stride=2, padding=1),
                nn.Softplus(beta=2.0),
                nn.Conv1d(4, 3, 2, stride=3, dilation=2, padding=2),
                nn.GELU(),
                nn.Flatten(),
                nn.Linear(3 * 3, 2),
            )
        ),
        (2, 13),
    ),
    "a convolution last (rows over channels and positions)": (
        _seeded(lambda: nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Tanh(), nn.Conv2d(2, 2, 2))),
        (1, 7, 7),
    ),
    "nested, Identity, eval Dropout, no bias": (
        _seeded(
            lambda: nn.Sequential(
                nn.Sequential(nn.Linear(4, 5, bias=False), nn.Identity(), nn.Dropout(0.5).eval()),
                nn.Sigmoid(),
                nn.Linear(5, 2),
            )
        ),
        (4,),
    ),
    "Linear over a sequence": (
        _seeded(lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))),
        (3, 4),
    ),
    "tied weights": (_seeded(_tied), (4,)),
    "a frozen weight": (_seeded(_frozen), (4,)),
    "linear only": (_seeded(lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))), (4,)),
}


@pytest.fixture
def chained(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per per-sample call, whether the chain answered."""
    return record_answers(monkeypatch, param_probes, "param_chain")


def _oracle(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    wanted = {n: params[n].detach() for n in names}
    fixed = {n: p.detach() for n, p in params.items() if n not in wanted}

    def one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, {**fixed, **p}, (xi.unsqueeze(0),)).squeeze(0)

    return vmap(jacrev(one), (None, 0))(wanted, x)  # type: ignore[no-any-return]


def _check(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", list(CHAINS))
def test_matches_torch_func(gen: torch.Generator, chained: list[bool], name: str) -> None:
    build, shape = CHAINS[name]
    model = build()
    x = randn(5, *shape, gen=gen)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    want = _oracle(model, x, names)
    _check(tj.param_jacobian(model, x, batch_dim=0), want)
    _check(tj.param_jacobian(model, x, batch_dim=0, chunk_size=1), want)
    assert chained == [True, True]


def test_requested_subset_and_frozen_by_name(gen: torch.Generator, chained: list[bool]) -> None:
    model = CHAINS["a frozen weight"][0]()
    x = randn(4, 4, gen=gen)
    names = ["0.weight", "2.bias"]
    _check(tj.param_jacobian(model, x, params=names, batch_dim=0), _oracle(model, x, names))
    assert chained == [True]


def test_float32_agrees_with_the_captured_graph(
    gen: torch.Generator, chained: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = CHAINS["small CNN, stride 2"][0]().float()
    x = randn(6, 1, 10, 10, gen=gen, dtype=torch.float32)
    got = tj.param_jacobian(model, x, batch_dim=0)
    monkeypatch.setattr(param_probes, "param_chain", lambda *a: None)
    want = tj.param_jacobian(model, x, batch_dim=0)
    assert chained == [True]
    for name in want:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_model_left_as_it_was(gen: torch.Generator) -> None:
    model = CHAINS["small CNN, stride 2"][0]()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    x = randn(3, 1, 10, 10, gen=gen, grad=True)
    tj.param_jacobian(model, x, batch_dim=0)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]
        assert type(p) is nn.Parameter
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].weight.grad is None and x.grad is None and model.training


def _hooked() -> nn.Module:
    model = CHAINS["tanh MLP"][0]()
    model[1].register_forward_hook(lambda m, a, out: out * 2)
    return model


class _Unlisted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


NOT_CHAINS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "a forward hook": (_hooked, (4,)),
    "GELU with the tanh approximation": (
        _seeded(
            lambda: nn.Sequential(nn.Linear(4, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 1))
        ),
        (4,),
    ),
    "an activation without a rule": (
        _seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.LeakyReLU(), nn.Linear(6, 1))),
        (4,),
    ),
    "a LayerNorm": (
        _seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 1))),
        (4,),
    ),
    "padding='same'": (
        _seeded(lambda: nn.Sequential(nn.Conv1d(1, 2, 3, padding="same"), nn.Flatten())),
        (1, 5),
    ),
    "circular padding": (
        _seeded(lambda: nn.Sequential(nn.Conv1d(1, 2, 3, padding=1, padding_mode="circular"))),
        (1, 5),
    ),
    "a module outside the proof": (
        _seeded(lambda: nn.Sequential(nn.Linear(4, 3), _Unlisted())),
        (4,),
    ),
}


@pytest.mark.parametrize("name", list(NOT_CHAINS))
def test_other_models_take_the_captured_graph(
    gen: torch.Generator, chained: list[bool], name: str
) -> None:
    build, shape = NOT_CHAINS[name]
    model = build()
    x = randn(4, *shape, gen=gen)
    names = [n for n, _ in model.named_parameters()]
    _check(tj.param_jacobian(model, x, batch_dim=0), _oracle(model, x, names))
    assert chained in ([False], [])  # [] where the proof already declined


def test_mixed_dtypes_take_the_captured_graph(gen: torch.Generator, chained: list[bool]) -> None:
    model = CHAINS["tanh MLP"][0]()
    x = randn(3, 4, gen=gen)
    model[2].float()
    with pytest.raises(RuntimeError):  # the model itself cannot run: no answer from the chain
        tj.param_jacobian(model, x, batch_dim=0)
    assert chained == [False]


def test_float16_takes_the_captured_graph(gen: torch.Generator, chained: list[bool]) -> None:
    model = CHAINS["tanh MLP"][0]()
    x = randn(3, 4, gen=gen)
    want = _oracle(model, x, [n for n, _ in model.named_parameters()])
    got = tj.param_jacobian(model.half(), x.half(), batch_dim=0)
    assert chained == [False]
    for name in want:
        assert got[name].dtype == torch.float16
        torch.testing.assert_close(got[name].double(), want[name], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_takes_the_captured_graph(
    gen: torch.Generator, chained: list[bool], monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """The backward pass here would not repeat autocast's casts: same result as the graph's."""
    model = CHAINS["tanh MLP"][0]().float()
    x = randn(4, 4, gen=gen, dtype=torch.float32)
    with torch.autocast("cpu", dtype=dtype):
        got = tj.param_jacobian(model, x, batch_dim=0)
        monkeypatch.setattr(param_probes, "param_chain", lambda *a: None)
        want = tj.param_jacobian(model, x, batch_dim=0)
    assert chained == [False]
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


@pytest.mark.parametrize("chain", [True, False], ids=["chain", "graph"])
@pytest.mark.parametrize("case", ["empty batch", "zero-wide input"])
def test_empty_sizes(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, chain: bool, case: str
) -> None:
    """An empty batch, or a Linear with no inputs: zeros of the right shape (``-1`` in a
    reshape of no elements is ambiguous)."""
    width = 0 if case == "zero-wide input" else 4
    with warnings.catch_warnings():  # torch's init warns of a weight with no elements
        warnings.simplefilter("ignore", UserWarning)
        model = _seeded(lambda: nn.Sequential(nn.Linear(width, 5), nn.Tanh(), nn.Linear(5, 3)))()
    x = randn(0 if case == "empty batch" else 2, width, gen=gen)
    if not chain:
        monkeypatch.setattr(param_probes, "param_chain", lambda *a: None)
    got = tj.param_jacobian(model, x, batch_dim=0)
    want = _oracle(model, x, [n for n, _ in model.named_parameters()]) if x.shape[0] else None
    for name, p in model.named_parameters():
        assert got[name].shape == (x.shape[0], 3, *p.shape)
        if want is not None:
            torch.testing.assert_close(got[name], want[name])


def _random_geometry(rng: random.Random) -> tuple[Tensor, Tensor, Tensor, tuple, int] | None:
    """``(x, w, g, geometry, groups)``: padding up to 3 (taps wholly in it too), strides past
    the kernel (input positions no tap reaches), groups; ``None`` where conv2d has no output."""
    groups = rng.choice([1, 1, 2, 3])
    c_in, c_out = rng.randint(1, 3) * groups, rng.randint(1, 3) * groups
    kernel = (rng.randint(1, 4), rng.randint(1, 4))
    geometry = tuple(tuple(rng.randint(lo, 3) for _ in range(2)) for lo in (1, 0, 1))
    x = torch.randn(2, c_in, rng.randint(1, 11), rng.randint(1, 11), dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, *kernel, dtype=torch.float64)
    try:
        y = nn.functional.conv2d(x, w, None, *geometry, groups)
    except RuntimeError:  # the kernel does not fit the padded input
        return None
    return x, w, torch.randn_like(y), geometry, groups


@pytest.mark.parametrize("seed", range(8))
def test_scattered_input_gradient_matches_torch(seed: int) -> None:
    rng = random.Random(seed)
    done = 0
    while done < 25:
        case = _random_geometry(rng)
        if case is None:
            continue
        x, w, g, geometry, groups = case
        want = torch.nn.grad.conv2d_input(x.shape, w, g, *geometry, groups)
        got = scatter_input_grad(g, w, tuple(x.shape[2:]), geometry, groups)  # type: ignore[arg-type]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        chosen = conv_input_grad(g, w, tuple(x.shape[2:]), geometry, groups)  # type: ignore[arg-type]
        torch.testing.assert_close(chosen, want, rtol=1e-10, atol=1e-12)
        done += 1


def test_a_misshaped_bias_gives_the_models_own_error(gen: torch.Generator) -> None:
    """The chains check the bias's shape: a model torch cannot run fails as its own call does."""
    model = CHAINS["tanh MLP"][0]()
    model[2].bias = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    x = randn(2, 4, gen=gen)
    with pytest.raises(RuntimeError) as own:
        model(x)
    for call in (
        lambda: tj.param_jacobian(model, x, batch_dim=0),
        lambda: tj.jacobian(model, x, batch_dim=0),
    ):
        with pytest.raises(RuntimeError) as err:
            call()
        assert str(own.value) in str(err.value)


def test_max_memory_chunks_the_probes(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk size counts what one probe's backward pass allocates, scatter taps included."""
    sizes: list[int] = []
    choose = param_probes.choose_chunk_size

    def spy(*args):  # type: ignore[no-untyped-def]
        sizes.append(choose(*args))
        return sizes[-1]

    monkeypatch.setattr(param_probes, "choose_chunk_size", spy)
    model = CHAINS["small CNN, stride 2"][0]()
    x = randn(4, 1, 10, 10, gen=gen)
    want = _oracle(model, x, [n for n, _ in model.named_parameters()])
    _check(tj.param_jacobian(model, x, batch_dim=0), want)
    _check(tj.param_jacobian(model, x, batch_dim=0, max_memory="40KiB"), want)
    assert sizes[0] == 5 and 1 <= sizes[1] < 5
