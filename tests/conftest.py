"""Shared test helpers: float64 tensors from a seeded generator, a deterministic RNG, and a spy
on the engine's optional fast paths."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

DTYPE = torch.float64

# `pytest -n N` runs N workers on the machine's cores: one intra-op thread each, or each worker's
# thread pool competes with the others' for the same cores (small ops then wait on each other)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def randn(
    *shape: int, gen: torch.Generator | None = None, dtype: torch.dtype = DTYPE, grad: bool = False
) -> torch.Tensor:
    """A float64 (by default) normal tensor; a leaf that requires grad when ``grad``."""
    t = torch.randn(shape, generator=gen, dtype=dtype)  # shape () gives a 0-d tensor
    return t.requires_grad_(grad)


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    """Every test starts from the same global RNG state (the state is restored afterwards)."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(state)


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator for building test data without touching the global RNG."""
    return torch.Generator().manual_seed(0)


def second_order_oracle(name: str, f: Any, x: torch.Tensor, batched: bool) -> torch.Tensor:
    """``tj.<name>(f, x)`` (``jacobian``, ``hessian``, ``hessian_diagonal`` or ``laplacian``) by
    ``torch.func``, per sample of ``x [B, D]`` when ``batched``, else of ``x [D]``."""
    from torch.func import hessian, jacrev, vmap

    g = (lambda r: f(r.unsqueeze(0))[0]) if batched else f
    if name == "jacobian":
        return vmap(jacrev(g))(x) if batched else jacrev(g)(x)
    h = vmap(hessian(g))(x) if batched else hessian(g)(x)
    if name == "hessian":
        return h
    d = h.diagonal(dim1=-2, dim2=-1)
    return d if name == "hessian_diagonal" else d.sum(-1)


def record_answers(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[bool]:
    """Wrap ``module.name`` (a fast path that returns ``None`` where it does not apply): the
    returned list gets, per call, whether it answered."""
    seen: list[bool] = []
    real = getattr(module, name)

    def spy(*args: Any) -> Any:
        res = real(*args)
        seen.append(res is not None)
        return res

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.fixture
def verified(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of times a coupling check looked at its probes."""
    from torchjac._engine.modules import layer_deltas

    calls: list[int] = []
    original = layer_deltas.CouplingCheck.verify

    def spy(self, *args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(layer_deltas.CouplingCheck, "verify", spy)
    return calls
