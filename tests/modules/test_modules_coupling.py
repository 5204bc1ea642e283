"""``tj.param_jacobian`` per sample: coupled samples raise, upstream coupling is exact."""

from __future__ import annotations

import pytest
import torch
from param_jacobian_checks import _assert_close, _built
from registry import CASES, DTYPE, full_oracle, per_sample_oracle
from torch import Tensor, nn

import torchjac as tj

pytestmark = pytest.mark.filterwarnings("ignore:.*performance drop.*:UserWarning")


class BatchCentered(nn.Module):
    """Couples samples after its Linear (``where="after"``) or before a bare parameter."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(DTYPE)
        self.scale = nn.Parameter(torch.ones(2, dtype=DTYPE))
        self.where = where

    def forward(self, x: Tensor) -> Tensor:
        if self.where == "before":  # upstream of every parameter: per-sample rows are exact
            x = x - x.mean(0)
        h = self.lin(x)
        if self.where == "after":
            h = h - h.mean(0)
        if self.where == "bare":
            h = (h - h.mean(0)) * self.scale
        return h * self.scale


@pytest.mark.parametrize("where", ["after", "bare"])
def test_coupled_samples_raise(where: str) -> None:
    model = BatchCentered(where)
    with pytest.raises(tj.BatchCouplingError, match="batch_dim=0"):
        tj.param_jacobian(model, torch.randn(5, 3, dtype=DTYPE), batch_dim=0)


def test_coupling_upstream_of_the_closed_forms_is_exact() -> None:
    model, x = BatchCentered("before"), torch.randn(5, 3, dtype=DTYPE)
    got = tj.param_jacobian(model, x, params=["lin.weight", "lin.bias"], batch_dim=0)
    want = full_oracle(model, (x,), {})
    _assert_close(got, {n: want[n] for n in ("lin.weight", "lin.bias")})
    with pytest.raises(tj.BatchCouplingError, match="input 0"):  # the general path would be wrong
        tj.param_jacobian(model, x, batch_dim=0)


def test_batchnorm_train_raises_and_keeps_statistics() -> None:
    model, args, _ = _built(next(c for c in CASES if c.id == "batchnorm_train"))
    stats = [b.clone() for b in model.buffers()]
    with pytest.raises(tj.BatchCouplingError, match=r"module '1' \(BatchNorm2d\) is in train"):
        tj.param_jacobian(model, *args, batch_dim=0)
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))


class ReturnsParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(4, 2, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return self.p * 1.0 if x.dim() else x


def test_output_that_ignores_the_batch_is_an_error_per_sample() -> None:
    model, x = ReturnsParameter(), torch.randn(4, 3, dtype=DTYPE)
    full = tj.param_jacobian(model, x)["p"]
    torch.testing.assert_close(full, torch.eye(8, dtype=DTYPE).reshape(4, 2, 4, 2))
    with pytest.raises(ValueError, match="does not follow the batch of its inputs"):
        tj.param_jacobian(model, x, batch_dim=0)


class OneWayPair(nn.Module):
    """Sample 3's output reads sample 2's: one coupled pair, in one direction only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(x)
        coupled = out.clone()
        coupled[3] = coupled[3] + out[2]
        return coupled


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_one_coupled_pair_in_a_small_batch_raises(gen: torch.Generator, chunk_size: int | None):
    # up to 8 samples every pair is checked, whatever random half the check would draw
    model, x = OneWayPair(), torch.randn(4, 3, generator=gen, dtype=DTYPE)
    with pytest.raises(tj.BatchCouplingError, match="batch_dim=0"):
        tj.param_jacobian(model, x, batch_dim=0, chunk_size=chunk_size)
    with pytest.raises(tj.BatchCouplingError, match="batch_dim=0"):
        tj.ntk(model, x)


class ProjectedPositions(nn.Module):
    """A Linear applied to a parameter without the batch, added to every sample."""

    def __init__(self, positions: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(positions, 3, dtype=DTYPE))
        self.proj = nn.Linear(3, 3).to(DTYPE)
        self.out = nn.Linear(3, 2).to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x + self.proj(self.pos)).flatten(1)


def test_a_layer_on_a_tensor_without_the_batch_is_exact(gen: torch.Generator) -> None:
    model, x = ProjectedPositions(5), torch.randn(4, 5, 3, generator=gen, dtype=DTYPE)
    _assert_close(tj.param_jacobian(model, x, batch_dim=0), per_sample_oracle(model, (x,), {}, 0))


class FedItsOwnWeight(nn.Module):
    """A Linear called on the batch and on its own weight: the weight is also an input there."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4).to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + self.lin(self.lin.weight)


def test_a_weight_fed_to_its_own_layer_is_never_half_counted(gen: torch.Generator) -> None:
    model, x = FedItsOwnWeight(), torch.randn(4, 4, generator=gen, dtype=DTYPE)
    _assert_close(tj.param_jacobian(model, x), full_oracle(model, (x,), {}))
    try:  # per sample, the general path may refuse the broadcast; it must not be wrong
        got = tj.param_jacobian(model, x, batch_dim=0)
    except ValueError as err:
        assert "batch" in str(err)
    else:
        _assert_close(got, per_sample_oracle(model, (x,), {}, 0))


class Table(nn.Module):
    """A bare table indexed by integer inputs: no float input, no covered layer to probe."""

    def __init__(self, centred: bool) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, 2, dtype=DTYPE))
        self.centred = centred

    def forward(self, idx: Tensor) -> Tensor:
        rows = self.table[idx]
        return rows - rows.mean(0) if self.centred else rows * rows


def test_coupling_only_through_an_indexed_table_raises() -> None:
    idx = torch.tensor([0, 2, 3, 5])
    with pytest.raises(tj.BatchCouplingError, match="table"):
        tj.param_jacobian(Table(centred=True), idx, batch_dim=0)
    model = Table(centred=False)
    _assert_close(
        tj.param_jacobian(model, idx, batch_dim=0), per_sample_oracle(model, (idx,), {}, 0)
    )


def test_ntk_coupling_only_through_an_indexed_table_raises() -> None:
    with pytest.raises(tj.BatchCouplingError, match="table"):
        tj.ntk(Table(centred=True), torch.tensor([0, 2, 3, 5]))


class LogScaled(nn.Module):
    """A bare parameter (general path) on an output that is NaN for a negative input."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([2.0, 3.0], dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return torch.log(x) * self.scale


def test_nan_outputs_are_not_taken_for_a_coupling() -> None:
    x = torch.tensor([[1.0, 2.0], [-1.0, 3.0], [4.0, 0.5]], dtype=DTYPE)
    got = tj.param_jacobian(LogScaled(), x, batch_dim=0)["scale"]  # [3, 2, 2]; no error
    finite = [0, 2]  # sample 1's rows carry its NaN (0 * NaN in a vector-Jacobian product)
    torch.testing.assert_close(got[finite], torch.diag_embed(torch.log(x[finite])))
    assert bool(got[1].isnan().any())


class SequenceFirst(nn.Module):
    """Layers on ``[T, B, E]`` (torch's default layout for attention): the batch at dim 1."""

    def __init__(self, attention: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).to(DTYPE)
        self.att = nn.MultiheadAttention(4, 2, kdim=3, vdim=3).to(DTYPE) if attention else None

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, E]
        h = x.transpose(0, 1)
        k = self.lin(h)
        if self.att is not None:
            k = self.att(h, k, k, need_weights=False)[0]
        return k.transpose(0, 1).flatten(1)


@pytest.mark.parametrize("attention", [False, True])
def test_a_layer_with_the_batch_at_another_dim_of_the_same_size(attention: bool) -> None:
    """T == B: a layer's input ``[T, B, E]`` has the batch's size at dim 0 too; its closed form
    took T for the batch (wrong rows, or a coupling error once attention ended the proof)."""
    torch.manual_seed(0)
    model, x = SequenceFirst(attention), torch.randn(2, 2, 4, dtype=DTYPE)
    full = tj.param_jacobian(model, x)
    per_sample = tj.param_jacobian(model, x, batch_dim=0)
    for name, j in full.items():
        torch.testing.assert_close(per_sample[name], j)
    m = model(x).numel()
    rows = torch.cat([j.reshape(m, -1) for j in full.values()], 1)
    k = tj.ntk(model, x)
    torch.testing.assert_close(k.reshape(rows.shape[0], -1), rows @ rows.T)


class UntracedSequenceFirst(nn.Module):
    """A sequence-first Linear after an op the batch trace does not follow (``sort``)."""

    def __init__(self, coupled: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).to(DTYPE)
        self.coupled = coupled

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, 3]
        h = self.lin(x.sort(-1)[0].transpose(0, 1))  # [T, B, 2]
        if self.coupled:
            h = h - h.mean(1, keepdim=True)  # across the batch
        return h.transpose(0, 1).flatten(1)


@pytest.mark.parametrize("coupled", [False, True])
def test_an_untraced_layer_with_an_ambiguous_batch(coupled: bool) -> None:
    """The trace ends at ``sort``: the Linear's ``[T, B, 2]`` input with ``T == B`` cannot be told
    from a batch-first one; the coupling check that blames it sends it to the general path (it
    was a BatchCouplingError), and a real coupling still raises."""
    torch.manual_seed(0)
    model, x = UntracedSequenceFirst(coupled), torch.randn(3, 3, 3, dtype=DTYPE)
    if coupled:
        with pytest.raises(tj.BatchCouplingError, match="batch_dim=0"):
            tj.param_jacobian(model, x, batch_dim=0)
        with pytest.raises(tj.BatchCouplingError, match="batch_dim=0"):
            tj.ntk(model, x)
        return
    full = tj.param_jacobian(model, x)
    per_sample = tj.param_jacobian(model, x, batch_dim=0)
    for name, j in full.items():
        torch.testing.assert_close(per_sample[name], j)
    rows = torch.cat([j.reshape(model(x).numel(), -1) for j in full.values()], 1)
    torch.testing.assert_close(tj.ntk(model, x).reshape(rows.shape[0], -1), rows @ rows.T)


class TableLayer(nn.Module):
    """A Linear on a buffer with one row per sample: read row by row, or summed over the rows."""

    def __init__(self, rows: int, summed: bool) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 3).to(DTYPE), nn.Linear(3, 2).to(DTYPE)
        self.register_buffer("table", torch.randn(rows, 3, dtype=DTYPE))
        self.summed = summed

    def forward(self, x: Tensor) -> Tensor:
        z = self.lin(self.table)
        return self.out(torch.tanh((z.sum(0) if self.summed else z) + x))


@pytest.mark.parametrize("summed", [False, True])
def test_a_layer_on_a_buffer_with_the_batch_size(summed: bool) -> None:
    """The buffer has the batch's size at dim 0 but no batch: its closed form held only while
    each sample's rows stay at its own row; summed, a proven model got wrong rows (0.70)."""
    torch.manual_seed(0)
    model, x = TableLayer(3, summed), torch.randn(3, 3, dtype=DTYPE)
    full = tj.param_jacobian(model, x)
    per_sample = tj.param_jacobian(model, x, batch_dim=0)
    for name, j in full.items():
        torch.testing.assert_close(per_sample[name], j)
    rows = torch.cat([j.reshape(6, -1) for j in full.values()], 1)
    torch.testing.assert_close(tj.ntk(model, x).reshape(6, 6), rows @ rows.T)
