"""Unit tests of the probe engine: memory parsing, planning, the lazy basis, chunked running."""

from __future__ import annotations

import pytest
import torch

import torchjac as tj
from torchjac._engine.core import plan
from torchjac._engine.core.basis import Group
from torchjac._engine.core.plan import choose_chunk_size, choose_mode, parse_memory
from torchjac._engine.core.run import run_chunks

# --- plan.parse_memory ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, None),
        (1000, 1000),
        ("100", 100),
        ("512MiB", 512 * 2**20),
        ("512mib", 512 * 2**20),
        ("2GB", 2 * 10**9),
        (" 2 GB ", 2 * 10**9),
        ("1.5GiB", int(1.5 * 2**30)),
        ("64k", 64_000),
        ("64KiB", 65_536),
        ("3b", 3),
        ("1TiB", 2**40),
        (1.5e9, 1_500_000_000),  # a float number of bytes, rounded down
        (4096.9, 4096),
    ],
)
def test_parse_memory(given, expected) -> None:
    assert parse_memory("f", given) == expected


@pytest.mark.parametrize(
    ("given", "exc"),
    [
        ("lots", ValueError),
        ("", ValueError),
        ("12XB", ValueError),
        ("MiB", ValueError),
        ("-1MiB", ValueError),
        ("1e3", ValueError),
        (0, ValueError),
        (-5, ValueError),
        ("0GB", ValueError),
        (float("inf"), ValueError),
        (float("nan"), ValueError),
        (0.5, ValueError),
        (True, TypeError),
        ([512], TypeError),
    ],
)
def test_parse_memory_rejects(given, exc: type[Exception]) -> None:
    with pytest.raises(exc, match=r"^myfn: `max_memory`"):
        parse_memory("myfn", given)


def test_memory_budget_defaults_to_a_share_of_free_memory() -> None:
    cpu = torch.device("cpu")
    assert plan.memory_budget("f", "1MiB", cpu) == 2**20
    default = plan.memory_budget("f", None, cpu)
    assert 0 < default <= max(plan.available_memory(cpu), 2**26)


# --- plan.choose_mode -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["rev", "fwd"])
def test_explicit_mode_is_kept(mode: str) -> None:
    assert choose_mode(mode, 1, 10**6, 2.0) == mode
    assert choose_mode(mode, 10**6, 1, 2.0) == mode


@pytest.mark.parametrize(
    ("rows", "cols", "cost", "expected"),
    [
        (10, 4, 2.0, "fwd"),  # 8 < 10
        (10, 5, 2.0, "rev"),  # a tie goes to rows
        (10, 6, 2.0, "rev"),
        (10, 9, 1.0, "fwd"),
        (1, 1, 1.0, "rev"),
        (17, 2, 2.0, "fwd"),  # seed 000: 17 gradient entries, 2 outputs
        (16, 10**5, 2.0, "rev"),  # seed 004: a few losses, many parameters
    ],
)
def test_auto_counts_weighted_probes(rows: int, cols: int, cost: float, expected: str) -> None:
    assert choose_mode("auto", rows, cols, cost) == expected


# --- plan.choose_chunk_size -----------------------------------------------------------------


def test_chunk_size_given_by_the_user_is_capped_by_the_probe_count() -> None:
    assert choose_chunk_size(100, 10, 10**9, 7) == 7
    assert choose_chunk_size(5, 10, 10**9, 7) == 5
    assert choose_chunk_size(5, 10**12, 1, 3) == 3  # the user's choice wins over the budget
    assert choose_chunk_size(0, 10, 10**9, None) == 1


def test_chunk_size_from_the_budget() -> None:
    n = plan.FEW_PROBES + 100  # enough probes to be vectorised
    assert choose_chunk_size(n, 1000, 50_000, None) == 50
    assert choose_chunk_size(n, 1000, 10**12, None) == n  # never above the probe count
    assert choose_chunk_size(n, 1000, 10, None) == 1  # at least one probe
    assert choose_chunk_size(n, 0, 10, None) >= 1


def test_few_probes_are_a_loop() -> None:
    assert choose_chunk_size(plan.LOOP_MAX_PROBES, 1, 10**9, None) == 1


def test_few_large_probes_loop_on_cpu_but_not_on_cuda() -> None:
    big = plan.LARGE_PROBE_WORK
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    kwargs = {"work_per_probe": big}
    assert choose_chunk_size(plan.FEW_PROBES, 1, 10**9, None, **kwargs, device=cpu) == 1
    assert choose_chunk_size(plan.FEW_PROBES, 1, 10**9, None, **kwargs, device=cuda) > 1
    small = {"work_per_probe": 10}
    assert choose_chunk_size(plan.FEW_PROBES, 1, 10**9, None, **small, device=cpu) > 1


# --- basis.Group ----------------------------------------------------------------------------


def _group(batch_dim: int | None) -> Group:
    tensors = [torch.zeros(4, 3), torch.zeros(4), torch.zeros(2, 4, 5)]
    if batch_dim is None:
        return Group.of(tensors, None)
    return Group.of([tensors[0], tensors[1], tensors[2].transpose(0, 1)], batch_dim)


def test_group_layout_unbatched() -> None:
    g = _group(None)
    assert g.sizes == (12, 4, 40) and g.offsets == (0, 12, 16) and g.numel == 56
    assert g.batch_size == 1 and g.batch_dims == (None, None, None)
    assert g.rest_shape(2) == (2, 4, 5)
    assert g.touched(10, 20) == [(0, 10, 12), (1, 0, 4), (2, 0, 4)]
    assert g.touched(12, 16) == [(1, 0, 4)]
    assert g.touched(56, 60) == []


def test_group_layout_batched_normalises_negative_dims() -> None:
    g = Group.of([torch.zeros(4, 3), torch.zeros(2, 4, 5)], -2)  # dim 0 of one, dim 1 of other
    assert g.batch_dims == (0, 1) and g.batch_size == 4
    assert g.sizes == (3, 10) and g.numel == 13
    assert g.rest_shape(1) == (2, 5)


@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("chunk", [1, 3, 7, 56])
def test_one_hot_chunks_make_the_identity(batch_dim: int | None, chunk: int) -> None:
    g = _group(batch_dim)
    dtype, device = torch.float64, torch.device("cpu")
    rows = []
    for start in range(0, g.numel, chunk):
        stop = min(g.numel, start + chunk)
        basis = g.one_hot(start, stop, dtype, device)
        parts = []
        for i, b in enumerate(basis):
            if b is None:
                assert not g.touched(start, stop) or i not in [t[0] for t in g.touched(start, stop)]
                b = torch.zeros(stop - start, *g.shapes[i], dtype=dtype)
            assert b.shape == (stop - start, *g.shapes[i])  # one chunk, never eye(numel)
            parts.append(g.flatten(i, b))  # [B, c, n_i]
        rows.append(torch.cat(parts, dim=2))
    full = torch.cat(rows, dim=1)  # [B, numel, numel]
    for sample in full:  # a one-hot probe is the same for every sample
        assert torch.equal(sample, torch.eye(g.numel, dtype=dtype))


def test_batched_one_hot_is_a_broadcast_view() -> None:
    g = _group(0)
    (b0, _, b2) = g.one_hot(0, g.numel, torch.float32, torch.device("cpu"))
    assert b0 is not None and b2 is not None
    assert b0.stride(1) == 0  # the batch dim of member 0 is broadcast, not copied
    assert b2.stride(1) == 0


def test_expand_then_flatten_round_trips_per_sample_probes() -> None:
    g = _group(0)
    for i in range(3):
        flat = torch.randn(2, g.batch_size, g.sizes[i])  # a different probe per sample
        member = g.expand(i, flat)
        assert member.shape == (2, *g.shapes[i])
        assert torch.equal(g.probe_major(i, member), flat)
        assert torch.equal(g.flatten(i, member), flat.transpose(0, 1))


# --- run.run_chunks ---------------------------------------------------------------------------


def _record(n: int, chunk: int, fail_batched: bool = False, fail_loop: bool = False):
    calls: list[tuple[int, int, bool]] = []
    written: list[int] = []

    def probe(start: int, stop: int, batched: bool) -> list[int]:
        calls.append((start, stop, batched))
        if batched and fail_batched:
            raise RuntimeError("Batching rule not implemented for aten::item")
        if not batched and fail_loop:
            raise ZeroDivisionError("loop failed too")
        return list(range(start, stop))

    def write(start: int, stop: int, result: list[int]) -> None:
        assert result == list(range(start, stop))
        written.extend(result)

    run_chunks("myfn", n, chunk, probe, write)
    return calls, written


@pytest.mark.parametrize(("n", "chunk"), [(10, 3), (10, 10), (10, 100), (1, 4)])
def test_run_chunks_covers_every_probe_once_in_chunks(n: int, chunk: int) -> None:
    calls, written = _record(n, chunk)
    assert written == list(range(n))
    assert all(stop - start <= chunk and batched for start, stop, batched in calls)


def test_run_chunks_of_one_is_a_plain_loop() -> None:
    calls, written = _record(5, 1)
    assert written == list(range(5))
    assert calls == [(i, i + 1, False) for i in range(5)]


def test_run_chunks_falls_back_to_a_loop_with_one_warning() -> None:
    with pytest.warns(tj.FallbackWarning) as record:
        calls, written = _record(10, 4, fail_batched=True)
    assert written == list(range(10))
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("myfn: ") and "aten::item" in message and "loop" in message
    assert [c for c in calls if c[2]] == [(0, 4, True)]  # vmap is not retried after a failure


def test_run_chunks_raises_when_the_loop_fails_too() -> None:
    with pytest.raises(ZeroDivisionError, match="loop failed too"):
        _record(10, 4, fail_batched=True, fail_loop=True)
