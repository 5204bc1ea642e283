"""``tj.ntk`` against ``J₁ J₂ᵀ`` of per-sample ``vmap(jacrev(functional_call))`` Jacobians."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import torchjac as tj

DT = torch.float64


def reference(model: nn.Module, x1: Tensor, x2: Tensor, names: list[str], bd: int = 0) -> Tensor:
    """``[N1, *o, N2, *o]`` from explicit per-sample Jacobians (the model on batches of one)."""
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(bd),)).squeeze(bd)

    with warnings.catch_warnings():  # vmap's "performance drop" notes on missing batching rules
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        j1 = vmap(jacrev(f), in_dims=(None, bd))(params, x1)
        j2 = vmap(jacrev(f), in_dims=(None, bd))(params, x2)
    o = next(iter(j1.values())).shape[1 : -len(params[names[0]].shape) or None]
    n_o = o.numel()
    k = sum(
        torch.einsum("ap,bp->ab", j1[n].reshape(-1, p.numel()), j2[n].reshape(-1, p.numel()))
        for n, p in params.items()
    )
    assert isinstance(k, Tensor)
    return k.reshape(x1.shape[bd], n_o, x2.shape[bd], n_o).reshape(
        (x1.shape[bd], *o, x2.shape[bd], *o)
    )


class Scaled(nn.Module):
    """An unknown module: a bare parameter used in a custom forward."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.scale)


class Gated(nn.Module):
    """Unknown modules with parameters: a bilinear gate and a PReLU-free custom product."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4, dtype=DT)
        self.gate = nn.Bilinear(4, 4, 4, dtype=DT)
        self.out = nn.Linear(4, 2, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h * torch.sigmoid(self.gate(h, h)))


class Branchy(nn.Module):
    """An unknown module with data-dependent control flow (no vmap)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, d, dtype=DT))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.w if bool((x.abs() < 1e6).all()) else x


class Heads(nn.Module):
    """Two heads concatenated and a dead branch whose output is discarded."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4, dtype=DT)
        self.a, self.b = nn.Linear(4, 1, dtype=DT), nn.Linear(4, 2, dtype=DT)
        self.dead = nn.Linear(4, 4, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.trunk(x))
        self.dead(h)  # computed, never used
        return torch.cat([self.a(h), self.b(h)], dim=1)


class Twice(nn.Module):
    """A Linear called twice (reuse: cross terms between the calls)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=DT)
        self.out = nn.Linear(d, 3, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


class TiedLM(nn.Module):
    """Embedding tied to the output layer, LayerNorm, tokens: mixed kinds on one parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0, dtype=DT)
        self.norm = nn.LayerNorm(4, dtype=DT)
        self.head = nn.Linear(4, 7, bias=False, dtype=DT)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.norm(self.emb(ids)).mean(1))


class SeqFirst(nn.Module):
    """Batch at dim 1: ``[T, N, d] -> [T, N, o]``, Linear over many positions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5, dtype=DT)
        self.b = nn.Linear(5, 2, dtype=DT)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)))


@dataclass(frozen=True)
class Case:
    id: str
    model: Callable[[], nn.Module]
    data: Callable[[torch.Generator, int], Tensor]
    batch_dim: int = 0
    params: list[str] | None = None


def _randn(*shape: int) -> Callable[[torch.Generator, int], Tensor]:
    return lambda g, n: torch.randn(n, *shape, generator=g, dtype=DT)


CASES = [
    Case(
        "mlp",
        lambda: nn.Sequential(
            nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)
        ).to(DT),
        _randn(3),
    ),
    Case(
        "mlp_no_bias_scalar_out",
        lambda: nn.Sequential(
            nn.Linear(3, 5, bias=False), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0)
        ).to(DT),
        _randn(3),
    ),
    Case(
        "cnn",
        lambda: nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2, 2, 3, stride=2, groups=2),
            nn.Flatten(),
            nn.Linear(8, 3),
        ).to(DT),
        _randn(1, 5, 5),
    ),
    Case(
        "conv1d",
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, 2)).to(DT),
        _randn(2, 5),
    ),
    Case(
        "tokens_linear",
        lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten()).to(DT),
        _randn(5, 3),
    ),
    Case("twice", Twice, _randn(4)),
    Case("heads_and_dead_branch", Heads, _randn(3)),
    Case("twice_wide_ghost_positions", lambda: Twice(24), _randn(24)),
    Case(
        "tokens_wide_ghost_positions",
        lambda: nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 2), nn.Flatten()).to(DT),
        _randn(2, 16),
    ),
    Case(
        "grouped_conv_one_position",
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)).to(DT),
        _randn(2, 3, 3),
    ),
    Case(
        "tied_embedding_layernorm",
        TiedLM,
        lambda g, n: torch.randint(0, 7, (n, 5), generator=g),
    ),
    Case(
        "mixed_known_unknown",
        lambda: (
            nn.Sequential(nn.Linear(3, 4), Scaled(4), nn.BatchNorm1d(4), nn.Linear(4, 2))
            .to(DT)
            .eval()
        ),
        _randn(3),
    ),
    Case("bilinear_gate_unknown", Gated, _randn(3)),
    Case(
        "seq_first_batch_dim_1",
        SeqFirst,
        lambda g, n: torch.randn(4, n, 3, generator=g, dtype=DT),
        batch_dim=1,
    ),
    Case(
        "frozen_named_in_params",
        lambda: (
            nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT).requires_grad_(False)
        ),
        _randn(3),
        params=["0.bias", "2.weight"],
    ),
]


def _build(case: Case, gen: torch.Generator) -> tuple[nn.Module, Tensor, Tensor, list[str]]:
    torch.manual_seed(1)
    model = case.model()
    x1, x2 = case.data(gen, 5), case.data(gen, 3)
    names = case.params or [n for n, p in model.named_parameters() if p.requires_grad]
    return model, x1, x2, names


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_explicit_kernel(case: Case, chunk_size: int | None, gen: torch.Generator) -> None:
    model, x1, x2, names = _build(case, gen)
    kw: dict[str, Any] = {
        "batch_dim": case.batch_dim,
        "chunk_size": chunk_size,
        "params": case.params,
    }
    got = tj.ntk(model, x1, x2, **kw)
    want = reference(model, x1, x2, names, case.batch_dim)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("same", [False, True], ids=["x1_x2", "x1_x1"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tiny_memory_budget_builds_blocks(case: Case, same: bool, gen: torch.Generator) -> None:
    """A 2 KB budget: per-sample Jacobians are formed in probe chunks (NOTE [blocked kernel])."""
    model, x1, x2, names = _build(case, gen)
    other = None if same else x2
    got = tj.ntk(model, x1, other, batch_dim=case.batch_dim, params=case.params, max_memory=2000)
    want = reference(model, x1, x1 if same else x2, names, case.batch_dim)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_self_kernel_is_symmetric_psd(case: Case, gen: torch.Generator) -> None:
    model, x1, _, names = _build(case, gen)
    got = tj.ntk(model, x1, batch_dim=case.batch_dim, params=case.params)
    torch.testing.assert_close(
        got, reference(model, x1, x1, names, case.batch_dim), rtol=1e-10, atol=1e-10
    )
    side = round(got.numel() ** 0.5)
    mat = got.reshape(side, side)
    assert torch.equal(mat, mat.T)
    assert torch.linalg.eigvalsh(mat).min() > -1e-10 * mat.diagonal().abs().max()


def test_general_path_falls_back_to_a_loop(gen: torch.Generator) -> None:
    """Data-dependent control flow cannot run under vmap: a loop, with one FallbackWarning."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), Branchy(4), nn.Linear(4, 3)).to(DT)
    x1, x2 = torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(3, 3, generator=gen, dtype=DT)
    with pytest.warns(tj.FallbackWarning, match="ntk: vectorised probing failed"):
        got = tj.ntk(model, x1, x2)
    params = [p for _, p in model.named_parameters()]

    def rows(x: Tensor) -> Tensor:  # autograd double loop over samples and outputs
        out = []
        for xi in x:
            y = model(xi.unsqueeze(0))[0]
            for c in range(y.numel()):
                g = torch.autograd.grad(y[c], params, retain_graph=True)
                out.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(out)

    want = (rows(x1) @ rows(x2).T).reshape(4, 3, 3, 3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in params)


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "types": {k: type(v) for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {k: p.grad for k, p in model.named_parameters()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["types"] == after["types"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for key in ("grads", "flags", "training", "hooks"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"], after["rng"])


def test_model_is_untouched(gen: torch.Generator) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.0), Scaled(4), nn.Linear(4, 2)
    ).to(DT)
    model.eval()
    model[4].weight.grad = torch.ones_like(model[4].weight)
    before = _snapshot(model)
    tj.ntk(model, torch.randn(4, 3, generator=gen, dtype=DT))
    _assert_same(before, _snapshot(model))


def test_coupled_batch_raises_and_keeps_running_stats(gen: torch.Generator) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT).train()
    before = _snapshot(model)
    with pytest.raises(tj.BatchCouplingError, match="ntk: `batch_dim=0`"):
        tj.ntk(model, torch.randn(6, 3, generator=gen, dtype=DT))
    _assert_same(before, _snapshot(model))


def test_argument_errors(gen: torch.Generator) -> None:
    model = nn.Linear(3, 2).to(DT)
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    with pytest.raises(TypeError, match=r"ntk: `model` must be a torch\.nn\.Module"):
        tj.ntk(lambda t: t, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ntk: `x1` must be a torch\.Tensor or a tuple"):
        tj.ntk(model, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ntk: `x1\[1\]` must be a torch\.Tensor"):
        tj.ntk(model, [x, 2.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"ntk: every Tensor of `x1` needs the same batch size"):
        tj.ntk(model, (x, x[:2]))
    with pytest.raises(ValueError, match=r"ntk: x2 must be like x1: 1 Tensor\(s\)"):
        tj.ntk(model, x, (x, x))
    with pytest.raises(ValueError, match=r"ntk: `batch_dim=2` is out of range for x1"):
        tj.ntk(model, x, batch_dim=2)
    with pytest.raises(ValueError, match="ntk: `params` names 'nope'"):
        tj.ntk(model, x, params=["nope"])
    with pytest.raises(ValueError, match="ntk: no parameter of the model requires grad"):
        tj.ntk(nn.Linear(3, 2).requires_grad_(False), x.float())
    with pytest.raises(ValueError, match="ntk: the model maps x1 to per-sample outputs"):
        flat = nn.Sequential(nn.Linear(3, 2), nn.Flatten()).to(DT)
        tj.ntk(flat, torch.randn(2, 1, 3, dtype=DT), torch.randn(2, 2, 3, dtype=DT))


def test_params_given_as_parameter_objects(gen: torch.Generator) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    got = tj.ntk(model, x, params=[model[2].weight])
    torch.testing.assert_close(got, reference(model, x, x, ["2.weight"]), rtol=1e-10, atol=1e-10)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch, torchjac as tj
    from torch import nn
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1536), nn.ReLU(), nn.Linear(1536, 1536), nn.ReLU(),
                          nn.Linear(1536, 8)).double()
    x = torch.randn(16, 64, dtype=torch.float64)
    p = sum(t.numel() for t in model.parameters())
    j_bytes = 16 * 8 * p * 8
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    k = tj.ntk(model, x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert k.shape == (16, 8, 16, 8)
    print(after - before, j_bytes)
    """
)


@pytest.mark.slow
def test_peak_memory_is_far_below_the_jacobian() -> None:
    """J is N·C·P float64 (~2.5 GB here); the kernel needs activations and δ only."""
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    growth, j_bytes = map(int, res.stdout.split())
    assert j_bytes > 300 * 2**20
    assert growth < j_bytes / 10, (growth, j_bytes)


class TwoInputs(nn.Module):
    """``model(x, z)``: a Linear of each input, gated, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fx, self.fz = nn.Linear(3, 4, dtype=DT), nn.Linear(2, 4, dtype=DT)
        self.head = nn.Linear(4, 2, dtype=DT)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fx(x)) * torch.sigmoid(self.fz(z)))


class TwoInputsBare(TwoInputs):
    """The same with ``z`` through a bare parameter: the general path gets both inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.linspace(-1.0, 1.0, 8, dtype=DT).reshape(2, 4))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fx(x)) * torch.sigmoid(self.fz(z) + z @ self.mix))


@pytest.mark.parametrize("cls", [TwoInputs, TwoInputsBare])
def test_model_of_several_inputs(cls: type[nn.Module], gen: torch.Generator) -> None:
    torch.manual_seed(1)
    model = cls()
    x1, z1 = torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(4, 2, generator=gen, dtype=DT)
    x2, z2 = torch.randn(3, 3, generator=gen, dtype=DT), torch.randn(3, 2, generator=gen, dtype=DT)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p: dict[str, Tensor], x: Tensor, z: Tensor) -> Tensor:
        return functional_call(model, p, (x.unsqueeze(0), z.unsqueeze(0))).squeeze(0)

    j1 = vmap(jacrev(f), in_dims=(None, 0, 0))(params, x1, z1)
    j2 = vmap(jacrev(f), in_dims=(None, 0, 0))(params, x2, z2)
    want = sum(torch.einsum("iap,jbp->iajb", j1[n].flatten(2), j2[n].flatten(2)) for n in params)
    got = tj.ntk(model, (x1, z1), (x2, z2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    frozen_fx = tj.ntk(model, [x1, z1], params=["fz.weight", "fz.bias", "head.weight"])
    want_11 = sum(
        torch.einsum("iap,jbp->iajb", j1[n].flatten(2), j1[n].flatten(2))
        for n in ("fz.weight", "fz.bias", "head.weight")
    )
    torch.testing.assert_close(frozen_fx, want_11, rtol=1e-10, atol=1e-10)


def test_inference_mode_and_inference_tensors(gen: torch.Generator) -> None:
    """A model and inputs made under ``torch.inference_mode()``, called there too."""
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(3, 4), Scaled(4), nn.Linear(4, 2)).to(DT)
    want = tj.ntk(plain, x)
    with torch.inference_mode():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(3, 4), Scaled(4), nn.Linear(4, 2)).to(DT)
        xi = x.clone()
        got = tj.ntk(model, xi)
    assert model[0].weight.is_inference() and xi.is_inference()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
