"""Hessian diagonals and Laplacians of plain Linear/activation chains (NOTE [taylor chain]):
against ``torch.func`` in float64, against the Taylor tape, and where the chain must not apply."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from conftest import randn, record_answers
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap

import torchjac as tj
from torchjac._engine.taylor import taylor_run


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(3)
        return build().double()

    return make


CHAINS: dict[str, Callable[[], nn.Module]] = {
    "tanh MLP": _seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))),
    "deep, three outputs": _seeded(
        lambda: nn.Sequential(
            nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 3)
        )
    ),
    "nested, Identity, no bias": _seeded(
        lambda: nn.Sequential(
            nn.Sequential(nn.Linear(4, 5, bias=False), nn.Identity(), nn.GELU()),
            nn.Sequential(nn.Linear(5, 5), nn.Softplus(beta=2.0, threshold=1.0)),
            nn.Linear(5, 2),
        )
    ),
    "activation first and last": _seeded(
        lambda: nn.Sequential(nn.Tanh(), nn.Linear(4, 3), nn.Sigmoid())
    ),
    "ReLU between curved layers": _seeded(
        lambda: nn.Sequential(
            nn.Linear(4, 6),
            nn.Tanh(),
            nn.Linear(6, 6),
            nn.ReLU(),
            nn.Linear(6, 6),
            nn.SiLU(),
            nn.Linear(6, 1),
        )
    ),
    "ReLU only": _seeded(lambda: nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))),
    "linear only": _seeded(lambda: nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))),
}


@pytest.fixture
def chained(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, per Taylor-mode call, whether the chain answered."""
    return record_answers(monkeypatch, taylor_run, "chain_taylor")


def _oracle(model: nn.Module, x: Tensor) -> Tensor:
    """``[B, R, D]`` Hessian diagonals by ``vmap(hessian)``."""
    h = vmap(hessian(lambda s: model(s.unsqueeze(0)).squeeze(0)))(x)
    return h.diagonal(dim1=-2, dim2=-1)


@pytest.mark.parametrize("name", list(CHAINS))
def test_matches_torch_func(gen: torch.Generator, chained: list[bool], name: str) -> None:
    model = CHAINS[name]()
    x = randn(7, 4, gen=gen)
    diag = _oracle(model, x)
    torch.testing.assert_close(tj.hessian_diagonal(model, x, batch_dim=0), diag)
    rows = diag.shape[1]
    want_lap = diag.sum(-1)
    torch.testing.assert_close(tj.laplacian(model, x, batch_dim=0), want_lap.reshape(7, rows))
    # a trace of more than two rows is the forward Laplacian's (one row for all outputs)
    assert chained == [True, rows <= 2]


@pytest.mark.parametrize("name", ["tanh MLP", "deep, three outputs"])
def test_unbatched_and_float32_agree_with_the_taylor_tape(
    gen: torch.Generator, chained: list[bool], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    model = CHAINS[name]().float()
    x = randn(5, 4, gen=gen, dtype=torch.float32)
    got = [tj.hessian_diagonal(model, x, batch_dim=0), tj.hessian_diagonal(model, x[2])]
    monkeypatch.setattr(taylor_run, "chain_taylor", lambda p, kind: None)
    want = [tj.hessian_diagonal(model, x, batch_dim=0), tj.hessian_diagonal(model, x[2])]
    assert chained == [True, True]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


class _Subclass(nn.Sequential):
    pass


def _hooked() -> nn.Module:
    model = CHAINS["tanh MLP"]()
    model[1].register_forward_hook(lambda m, a, out: out * 2)
    return model


NOT_CHAINS: dict[str, Callable[[], nn.Module]] = {
    "a forward hook": _hooked,
    "a Sequential subclass": _seeded(
        lambda: _Subclass(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    ),
    "GELU with the tanh approximation": _seeded(
        lambda: nn.Sequential(nn.Linear(4, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 1))
    ),
    "an unlisted module": _seeded(
        lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 1))
    ),
}


@pytest.mark.parametrize("name", list(NOT_CHAINS))
def test_other_models_take_the_taylor_mode(
    gen: torch.Generator, chained: list[bool], name: str
) -> None:
    model = NOT_CHAINS[name]()
    x = randn(6, 4, gen=gen)
    torch.testing.assert_close(tj.hessian_diagonal(model, x, batch_dim=0), _oracle(model, x))
    assert chained == [False]


def test_create_graph_takes_the_taylor_mode(gen: torch.Generator, chained: list[bool]) -> None:
    model = CHAINS["tanh MLP"]()
    x = randn(5, 4, gen=gen)
    lap = tj.laplacian(model, x, batch_dim=0, create_graph=True)
    assert lap.requires_grad and chained == [False]
    (g,) = torch.autograd.grad(lap.sum(), model[0].weight)
    assert torch.isfinite(g).all()


def test_a_non_finite_result_is_left_to_the_taylor_mode(chained: list[bool]) -> None:
    model = CHAINS["tanh MLP"]()
    x = torch.zeros(3, 4, dtype=torch.float64)
    x[1, 2] = float("nan")
    got = tj.hessian_diagonal(model, x, batch_dim=0)
    assert chained == [False]
    assert got[1].isnan().all() and torch.isfinite(got[[0, 2]]).all()


def test_the_model_is_left_as_it_was(gen: torch.Generator) -> None:
    model = CHAINS["deep, three outputs"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = randn(4, 4, gen=gen)
    tj.hessian_diagonal(model, x, batch_dim=0)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_dtype_mismatch_is_the_models_own_error(gen: torch.Generator) -> None:
    model = CHAINS["tanh MLP"]()  # float64
    with pytest.raises(RuntimeError, match="dtype"):
        tj.hessian_diagonal(model, randn(3, 4, gen=gen, dtype=torch.float32), batch_dim=0)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")  # Linear(0, 6)
@pytest.mark.parametrize("shape", [(0, 4), (3, 0)], ids=["no samples", "no input elements"])
def test_empty_batches_and_inputs_agree_with_the_taylor_tape(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int]
) -> None:
    # found while testing the chain: the tape's broadcast source could not reshape D = 0
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(shape[1], 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.zeros(shape, dtype=torch.float64)
    got = [tj.hessian_diagonal(model, x, batch_dim=0), tj.laplacian(model, x, batch_dim=0)]
    monkeypatch.setattr(taylor_run, "chain_taylor", lambda p, kind: None)
    want = [tj.hessian_diagonal(model, x, batch_dim=0), tj.laplacian(model, x, batch_dim=0)]
    for g, w in zip(got, want):
        assert g.shape == w.shape == (shape[0], 2, shape[1])[: g.dim()]
        assert torch.equal(g, w) and not g.any()


@pytest.mark.parametrize("name", list(CHAINS))
def test_jacobians_and_hessians_match_torch_func(
    gen: torch.Generator, chained: list[bool], name: str
) -> None:
    model = CHAINS[name]()
    x = randn(7, 4, gen=gen)
    single = lambda s: model(s.unsqueeze(0)).squeeze(0)  # noqa: E731
    got_j = tj.jacobian(model, x, batch_dim=0, mode="fwd")  # columns: the Taylor mode
    torch.testing.assert_close(got_j, vmap(jacrev(single))(x))
    torch.testing.assert_close(tj.hessian(model, x, batch_dim=0), vmap(hessian(single))(x))
    torch.testing.assert_close(tj.jacobian(model, x[3], mode="fwd"), jacrev(single)(x[3]))
    torch.testing.assert_close(tj.hessian(model, x[3]), hessian(single)(x[3]))
    assert chained == [True] * 4


def test_a_linear_chain_gives_a_jacobian_of_its_own_per_sample(gen: torch.Generator) -> None:
    model = CHAINS["linear only"]()
    jac = tj.jacobian(model, randn(3, 4, gen=gen), batch_dim=0, mode="fwd")
    assert jac.stride(0) != 0 and jac.is_contiguous()
    jac[0].zero_()  # each sample's block is its own memory
    assert jac[1].abs().sum() > 0


def test_hessians_beyond_the_pairs_at_once(gen: torch.Generator, chained: list[bool]) -> None:
    torch.manual_seed(3)  # D = 6 > _PAIRS_MAX_D: one batched product per direction
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Softplus()).double()
    x = randn(4, 6, gen=gen)
    want = vmap(hessian(lambda s: model(s.unsqueeze(0)).squeeze(0)))(x)
    torch.testing.assert_close(tj.hessian(model, x, batch_dim=0), want)
    assert chained == [True]


class _Doubling(Tensor):
    """A subclass whose Linear layers double their output."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out * 2 if func is torch.nn.functional.linear else out


def test_subclass_inputs_and_half_precision_take_the_taylor_mode(
    gen: torch.Generator, chained: list[bool]
) -> None:
    # found in review: a subclass's values met plain derivatives (a third, wrong answer), and
    # g·φ'' underflowed in float16 where the Taylor tape keeps it apart
    model = CHAINS["tanh MLP"]()
    x = randn(5, 4, gen=gen)
    tj.hessian_diagonal(model, x.as_subclass(_Doubling), batch_dim=0)
    tj.hessian_diagonal(model.half(), x.half(), batch_dim=0)
    assert chained == [False, False]


def test_a_declined_chain_plans_the_hessian_as_before(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # found in review: after the chain declined, the full Taylor jets (K = 1 + D + D(D+1)/2)
    # ran where the plan picks nested AD, and ignored max_memory
    from torchjac._engine.func import second

    kinds: list[str] = []
    taylor = second.taylor

    def spy(p, kind, check):  # type: ignore[no-untyped-def]
        kinds.append(kind)
        return taylor(p, kind, check)

    monkeypatch.setattr(second, "taylor", spy)
    torch.manual_seed(3)
    for act in (nn.GELU(approximate="tanh"), nn.Tanh()):
        model = nn.Sequential(nn.Linear(6, 5), act, nn.Linear(5, 1)).double()
        x = randn(4, 6, gen=gen)
        if isinstance(act, nn.Tanh):
            x[2, 0] = float("nan")  # a non-finite result: the chain declines at run time
        got = tj.hessian(model, x, batch_dim=0)
        want = vmap(hessian(lambda s, m=model: m(s.unsqueeze(0)).squeeze(0)))(x)
        torch.testing.assert_close(got, want, equal_nan=True)
    assert kinds == []


def test_hessians_are_exactly_symmetric(gen: torch.Generator) -> None:
    torch.manual_seed(3)  # found in review: (c·t_a)·t_e and (c·t_e)·t_a differ in rounding
    for d in (3, 7):
        model = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 3))
        h = tj.hessian(model, torch.randn(5, d), batch_dim=0)
        assert torch.equal(h, h.transpose(-1, -2))


def test_tiny_first_derivatives_do_not_underflow() -> None:
    # found in review: forming t_a·t_e first flushed 1e-46 to zero in float32
    model = nn.Sequential(nn.Linear(3, 1), nn.Tanh(), nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1e-23)
        model[0].bias.fill_(0.5)
        model[2].weight.fill_(1e30)
        model[2].bias.zero_()
    x = torch.ones(2, 3)
    double = copy.deepcopy(model).double()
    want = vmap(hessian(lambda s: double(s.unsqueeze(0)).squeeze(0)))(x.double())
    got = tj.hessian(model, x, batch_dim=0)
    assert got.abs().min() > 0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("chain", [True, False], ids=["chain", "LayerNorm"])
def test_a_chain_needs_no_counting_pass(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, chain: bool
) -> None:
    """``mode="auto"`` reads a chain's rows from its layers; other models are called to count."""
    from torchjac._engine.func import func_probes

    counted: list[int] = []
    count = func_probes._count_rows
    monkeypatch.setattr(
        func_probes,
        "_count_rows",
        lambda *a: counted.append(1) or count(*a),  # type: ignore[func-returns-value]
    )
    middle = nn.Tanh() if chain else nn.LayerNorm(5)
    model = _seeded(lambda: nn.Sequential(nn.Linear(6, 5), middle, nn.Linear(5, 2)))()
    x = randn(3, 6, gen=gen)  # more columns than are planned without counting rows
    want = vmap(jacrev(lambda s: model(s.unsqueeze(0)).squeeze(0)))(x)
    torch.testing.assert_close(tj.jacobian(model, x, batch_dim=0), want)
    assert counted == ([] if chain else [1])
