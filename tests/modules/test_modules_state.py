"""``tj.param_jacobian`` leaves the model, its hooks and the RNG as they were, even on errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from param_jacobian_checks import _built
from registry import CASES, DTYPE, ModelCase
from torch import Tensor, nn

import torchjac as tj
from torchjac._engine.core.module_proof import proven_per_sample

pytestmark = pytest.mark.filterwarnings("ignore:.*performance drop.*:UserWarning")


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": [
            (n, id(p), type(p), p.detach().clone(), p.requires_grad, p.grad)
            for n, p in model.named_parameters(remove_duplicate=False)
        ],
        "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
        "modes": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["modes"] == after["modes"]
    assert before["hooks"] == after["hooks"]
    assert before["grad_mode"] == after["grad_mode"]
    assert torch.equal(before["rng"], after["rng"])
    for (n, i, t, v, rg, g), (n2, i2, t2, v2, rg2, g2) in zip(before["params"], after["params"]):
        assert (n, i, t, rg) == (n2, i2, t2, rg2) and t2 is nn.Parameter
        assert torch.equal(v, v2), n
        assert g is g2, n  # .grad untouched (the same object, or still None)
    for (n, b), (n2, b2) in zip(before["buffers"], after["buffers"]):
        assert n == n2 and torch.equal(b, b2), n


@pytest.mark.parametrize("per_sample", [False, True], ids=["full", "batch_dim"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_model_unchanged(case: ModelCase, per_sample: bool) -> None:
    model, args, kwargs = _built(case)
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    before = _snapshot(model)
    if per_sample and case.batch_dim is None:
        with pytest.raises(tj.BatchCouplingError, match="train mode"):
            tj.param_jacobian(model, *args, batch_dim=0, **kwargs)
    else:
        bd = case.batch_dim if per_sample else None
        tj.param_jacobian(model, *args, batch_dim=bd, **kwargs)
    _assert_same(before, _snapshot(model))


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        self.lin(x)
        raise RuntimeError("boom in forward")


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_hooks_removed_after_an_exception(batch_dim: int | None) -> None:
    model, x = Failing(), torch.randn(4, 3, dtype=DTYPE)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom in forward"):
        tj.param_jacobian(model, x, batch_dim=batch_dim)
    _assert_same(before, _snapshot(model))


def test_dropout_in_train_mode_leaves_the_rng_state() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    state = torch.get_rng_state()
    got = tj.param_jacobian(model, x)
    assert torch.equal(state, torch.get_rng_state())
    assert got["0.weight"].shape == (5, 2, 4, 3)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_an_embedding_with_max_norm_does_not_renormalise_the_users_weight(
    batch_dim: int | None,
) -> None:
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=0.5), nn.Flatten(), nn.Linear(6, 2))
    model = model.to(DTYPE)
    before = _snapshot(model)
    got = tj.param_jacobian(model, torch.tensor([[0, 1], [2, 3], [1, 4]]), batch_dim=batch_dim)
    assert got["0.weight"].shape == (3, 2, 5, 3)
    _assert_same(before, _snapshot(model))


def test_an_in_place_first_layer_never_writes_the_users_input() -> None:
    model = nn.Sequential(nn.LeakyReLU(0.5, inplace=True), nn.Linear(3, 4), nn.GroupNorm(2, 4))
    model = model.to(torch.float64)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    x = x0.clone()
    assert proven_per_sample(model, (x,), {}, 0)  # in place or not, the layer is per sample
    got = tj.param_jacobian(model, x, batch_dim=0)
    tj.param_jacobian(model, x)
    tj.ntk(model, x)
    assert torch.equal(x, x0)  # the model is run several times, each on a copy
    model[0].inplace = False
    params = {k: v.detach() for k, v in model.named_parameters()}
    one = lambda p, xi: torch.func.functional_call(model, p, (xi[None],))[0]  # noqa: E731
    ref = torch.func.vmap(torch.func.jacrev(one), in_dims=(None, 0))(params, x0)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name])


class WritesFirstArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a.mul_(2)
        return self.lin(b)


def test_the_same_tensor_passed_twice_stays_one_tensor() -> None:
    """The model runs on copies, one per tensor: ``model(x, x)`` writing through ``a`` is seen
    through ``b`` as in the user's own call, and the user's ``x`` is left alone."""
    model = WritesFirstArgument().to(torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    x0 = x.clone()
    got = tj.param_jacobian(model, x, x)["lin.weight"]
    assert torch.equal(x, x0)
    torch.testing.assert_close(got, tj.param_jacobian(model.lin, 2 * x0)["weight"])
