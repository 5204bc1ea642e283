"""Models, the case registry and the explicit-kernel oracle shared by the ``tj.ntk`` tests."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

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
