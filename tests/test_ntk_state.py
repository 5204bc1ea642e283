"""``tj.ntk`` leaves the model and the RNG untouched, even on errors; inference mode works."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ntk_cases import DT, Scaled
from torch import nn

import torchjac as tj


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
