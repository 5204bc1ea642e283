"""``tj.jac(batch_dim=...)``: the independence check catches coupled samples, passes clean ones."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import randn
from torch import Tensor, nn
from torch.func import jacrev

import torchjac as tj
from torchjac._engine.core.structure import sample_mask

MODES = ["auto", "rev", "fwd"]


def _batchnorm_train(x: Tensor) -> Tensor:
    bn = nn.BatchNorm1d(x.shape[1]).double().train()
    return bn(x)


COUPLED: dict[str, Callable[[Tensor], Tensor]] = {
    "batchnorm_train": _batchnorm_train,
    "minus_batch_mean": lambda x: torch.tanh(x) - torch.tanh(x).mean(0),
    "roll_over_batch": lambda x: torch.roll(x.sin(), 1, dims=0),
    "softmax_over_batch": lambda x: torch.softmax(x, dim=0),
    "cumsum_over_batch": lambda x: x.cumsum(0),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(COUPLED))
def test_coupling_is_caught(name: str, mode: str, gen: torch.Generator) -> None:
    x = randn(6, 3, gen=gen, grad=True)
    y = COUPLED[name](x)
    with pytest.raises(tj.BatchCouplingError, match=r"jac: `batch_dim=0`.*inputs") as info:
        tj.jac(y, x, batch_dim=0, mode=mode)
    assert isinstance(info.value, ValueError)  # BatchCouplingError is a ValueError


def test_coupling_in_one_of_several_outputs_names_the_input(gen: torch.Generator) -> None:
    x, z = randn(5, 2, gen=gen, grad=True), randn(5, gen=gen, grad=True)
    clean = x.sin()
    coupled = z - z.mean()
    with pytest.raises(tj.BatchCouplingError, match=r"inputs\[1\]"):
        tj.jac([clean, coupled], [x, z], batch_dim=0)


def test_coupling_at_a_non_zero_batch_dim(gen: torch.Generator) -> None:
    x = randn(2, 6, gen=gen, grad=True)
    y = x - x.mean(1, keepdim=True)
    with pytest.raises(tj.BatchCouplingError, match="batch_dim=-1"):
        tj.jac(y, x, batch_dim=-1)


def test_coupling_of_one_pair_of_samples_is_caught(gen: torch.Generator) -> None:
    x = randn(2, 3, gen=gen, grad=True)
    y = x.sin() + torch.stack([torch.zeros_like(x[0]), x[0]])  # output 1 depends on input 0
    with pytest.raises(tj.BatchCouplingError):
        tj.jac(y, x, batch_dim=0)


def _pair_coupled(x: Tensor, i: int, j: int) -> Tensor:
    """Independent samples, except that output sample i also depends on input sample j."""
    onehot = torch.zeros(x.shape[0], 1, dtype=x.dtype)
    onehot[i] = 1
    return x.sin() + onehot * x[j : j + 1] ** 2


@pytest.mark.parametrize(("i", "j"), [(0, 1), (1, 0)])
def test_two_samples_every_coupling_is_caught(i: int, j: int, gen: torch.Generator) -> None:
    x = randn(2, 3, gen=gen, grad=True)
    with pytest.raises(tj.BatchCouplingError):
        tj.jac(_pair_coupled(x, i, j), x, batch_dim=0)


@pytest.mark.parametrize("bsz", [3, 6, 9])
def test_every_coupling_across_the_checked_halves_is_caught(bsz: int, gen: torch.Generator) -> None:
    """NOTE [coupling check]: a coupling between the two halves never escapes."""
    half = sample_mask(bsz, torch.device("cpu"))
    pairs = [(i, j) for i in range(bsz) for j in range(bsz) if bool(half[i] != half[j])]
    assert pairs
    for i, j in pairs:
        x = randn(bsz, 2, gen=gen, grad=True)
        with pytest.raises(tj.BatchCouplingError):
            tj.jac(_pair_coupled(x, i, j), x, batch_dim=0)


@pytest.mark.parametrize("mode", MODES)
def test_batchnorm_in_eval_mode_passes_and_leaves_the_module_untouched(
    mode: str, gen: torch.Generator
) -> None:
    bn = nn.BatchNorm1d(3).double()
    with torch.no_grad():
        bn(randn(8, 3, gen=gen) * 3 + 1)  # non-trivial running statistics
    bn.eval()
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    x = randn(5, 3, gen=gen, grad=True)
    y = torch.tanh(bn(x))
    got = tj.jac(y, x, batch_dim=0, mode=mode)
    full = jacrev(lambda z: torch.tanh(bn(z)))(x.detach())
    torch.testing.assert_close(got, torch.stack([full[b, :, b] for b in range(5)]))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(p.grad is None for p in bn.parameters())


@pytest.mark.parametrize("mode", MODES)
def test_batch_dim_one_of_three_dim_tensors(mode: str, gen: torch.Generator) -> None:
    w = randn(3, 3, gen=gen)
    x = randn(2, 4, 3, gen=gen, grad=True)  # batch of 4 at dim 1

    def f(x: Tensor) -> Tensor:
        return torch.tanh(x @ w) * x.sum(0, keepdim=True)  # dim 0 is mixed, not the batch

    got = tj.jac(f(x), x, batch_dim=1, mode=mode)
    full = jacrev(f)(x.detach())  # [2, 4, 3, 2, 4, 3]
    expected = torch.stack([full[:, b, :, :, b] for b in range(4)])  # [4, 2, 3, 2, 3]
    assert got.shape == (4, 2, 3, 2, 3)
    torch.testing.assert_close(got, expected)
    again = tj.jac(f(x), x, batch_dim=-2, mode=mode)
    torch.testing.assert_close(again, expected)


def test_batch_dim_with_dict_inputs_keeps_keys(gen: torch.Generator) -> None:
    a, b = randn(4, 2, gen=gen, grad=True), randn(4, gen=gen, grad=True)
    y = a * b[:, None]
    got = tj.jac(y, {"b": b, "a": a}, batch_dim=0)
    assert list(got) == ["b", "a"]
    assert got["a"].shape == (4, 2, 2) and got["b"].shape == (4, 2)
    torch.testing.assert_close(got["a"], torch.diag_embed(b.detach()[:, None].expand(4, 2)))
    torch.testing.assert_close(got["b"], a.detach())


def test_batch_dim_unused_input_allowed_gives_zeros(gen: torch.Generator) -> None:
    a, b = randn(3, 2, gen=gen, grad=True), randn(3, 5, gen=gen, grad=True)
    got = tj.jac(a.exp(), [a, b], batch_dim=0, allow_unused=True)
    torch.testing.assert_close(got[0], torch.diag_embed(a.detach().exp()))
    assert torch.equal(got[1], torch.zeros(3, 2, 5, dtype=b.dtype))


def test_a_single_pass_result_is_the_storage_but_never_an_alias() -> None:
    """One vectorised pass's rows are returned without a copy only when the memory is the
    result's own: never a stride-0 broadcast of a cotangent, never the user's ``jac_outputs``."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    per_sample = tj.jac(x + 0.0, x, batch_dim=0, mode="rev")  # the grad is the cotangent itself
    assert torch._debug_has_internal_overlap(per_sample) == 0
    per_sample.add_(1.0)  # writable: no overlapping memory
    torch.testing.assert_close(per_sample, torch.eye(3, dtype=torch.float64).expand(5, 3, 3) + 1)
    a = torch.randn(2, 5, 3, dtype=torch.float64)
    chained = tj.jac(x + 0.0, x, jac_outputs=a, mode="rev")
    expected = a.clone()
    a.add_(100.0)
    torch.testing.assert_close(chained, expected)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    rows = tj.jac(torch.tanh(x @ w.T), w, mode="rev")  # the whole Jacobian in one pass
    torch.testing.assert_close(rows, jacrev(lambda v: torch.tanh(x @ v.T))(w.detach()))
