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


def test_dropout_draws_once_per_call_for_both_batches(gen: torch.Generator) -> None:
    """x1 and x2 see the same dropout mask (NOTE [one draw per call]): the kernel of one
    realisation, equal to J1 J2ᵀ of the model with that mask fixed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Linear(6, 1)).to(DT).train()
    x1, x2 = torch.randn(1, 3, generator=gen, dtype=DT), torch.randn(1, 3, generator=gen, dtype=DT)
    state = torch.get_rng_state()
    got = tj.ntk(model, x1, x2)
    assert torch.equal(torch.get_rng_state(), state)
    mask = nn.functional.dropout(torch.ones(1, 6, dtype=DT), 0.5, training=True)  # the draw

    def fixed(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(x, p["0.weight"], p["0.bias"]) * mask
        return nn.functional.linear(h, p["2.weight"], p["2.bias"])

    params = {k: v.detach() for k, v in model.named_parameters()}
    j1, j2 = (torch.func.jacrev(fixed)(params, x) for x in (x1, x2))
    want = sum(j1[k].reshape(1, -1) @ j2[k].reshape(1, -1).T for k in params)
    assert mask.eq(0).any() and mask.ne(0).any()  # a real draw, not all or nothing
    torch.testing.assert_close(got.reshape(1, 1), want)
