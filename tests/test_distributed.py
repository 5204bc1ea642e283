"""``process_group=`` and ``gather=``: 2 gloo ranks on CPU, spawned once for the module, run
every scenario of ``distributed_scenarios.py`` against single-process float64 results; the
arguments and the split itself are checked here, in this process."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import distributed_scenarios
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchjac as tj
from torchjac._distributed import balanced
from torchjac._distributed_ntk import upper_tiles

RANKS = 2
LIMIT = 120  # seconds for the whole spawned run; the group's own timeout is 15 s per collective


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    # a rank killed by a signal is the machine, not a verdict (every scenario's failure is
    # written to its rank's file): on a heavily loaded machine gloo's setup has aborted
    # ("terminate called without an active exception"), so the ranks get one more start
    for attempt in (1, 2):
        tmp = tmp_path_factory.mktemp("dist")
        try:
            return _run_ranks(tmp)
        except mp.ProcessExitedException:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_ranks(tmp: Any) -> list[dict[str, str]]:
    args = (RANKS, str(tmp / "store"), str(tmp))
    ctx = mp.spawn(distributed_scenarios.main, args=args, nprocs=RANKS, join=False)
    deadline = time.monotonic() + LIMIT
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {RANKS} ranks did not finish within {LIMIT} s")
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(RANKS)]


@pytest.mark.parametrize("name", [*distributed_scenarios.SCENARIOS, "destroyed_group"])
def test_on_two_gloo_ranks(outcomes: list[dict[str, str]], name: str) -> None:
    for rank, got in enumerate(outcomes):
        assert got[name] == "ok", f"rank {rank}:\n{got[name]}"


@pytest.mark.parametrize("total", [0, 1, 2, 5, 7, 64])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_balanced_split_covers_in_order_within_one(total: int, parts: int) -> None:
    ranges = [balanced(total, parts, k) for k in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same model at every call (the test's RNG state is restored)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


CALLS: dict[str, Any] = {
    "jacobian": lambda **kw: tj.jacobian(torch.sin, torch.ones(3, 2, dtype=torch.float64), **kw),
    "hessian": lambda **kw: tj.hessian(lambda x: x.sin().sum(), torch.ones(3), **kw),
    "hessian_diagonal": lambda **kw: tj.hessian_diagonal(torch.sin, torch.ones(3), **kw),
    "laplacian": lambda **kw: tj.laplacian(torch.sin, torch.ones(2, 3), batch_dim=0, **kw),
    "param_jacobian": lambda **kw: tj.param_jacobian(_model(), torch.ones(2, 3).double(), **kw),
    "ntk": lambda **kw: tj.ntk(_model(), torch.ones(2, 3).double(), **kw),
}


@pytest.mark.parametrize("fn", sorted(CALLS))
def test_without_a_group_gather_false_pairs_the_result_with_a_whole_index(fn: str) -> None:
    whole = CALLS[fn]()
    pair = CALLS[fn](gather=False)
    assert isinstance(pair, tuple) and pair[1] == (slice(None),)
    got = pair[0]
    if isinstance(whole, dict):
        assert all(torch.equal(got[k], v[pair[1]]) for k, v in whole.items())
    else:
        assert torch.equal(got, whole[pair[1]])
    on0 = CALLS[fn](gather="rank0")
    assert type(on0) is type(whole)


@pytest.mark.parametrize("fn", sorted(CALLS))
def test_wrong_process_group_or_gather(fn: str) -> None:
    with pytest.raises(TypeError, match=f"{fn}: `process_group` must be a torch.distributed"):
        CALLS[fn](process_group="gloo")
    with pytest.raises(ValueError, match=f'{fn}: `gather` must be "all"'):
        CALLS[fn](gather="everywhere")
    with pytest.raises(ValueError, match=f'{fn}: `gather` must be "all"'):
        CALLS[fn](gather=0)


def test_a_group_of_one_rank_in_this_process_then_destroyed() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        x = torch.randn(4, 3, dtype=torch.float64)
        got, index = tj.ntk(_model(), x, process_group=group, gather=False)
        assert index == (slice(0, 4), slice(None), slice(0, 4))
        assert torch.allclose(got, tj.ntk(_model(), x))
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match=r"ntk: `process_group` was given but torch\.distributed"):
        tj.ntk(_model(), x, process_group=group)


@pytest.mark.parametrize(("n", "size"), [(1, 2), (2, 2), (5, 2), (64, 2), (30, 3), (100, 8)])
def test_upper_tiles_cover_the_upper_triangle_once_and_balance(n: int, size: int) -> None:
    dealt = upper_tiles(n, size)
    assert len(dealt) == size
    cover = torch.zeros(n, n, dtype=torch.int64)
    for part in dealt:
        for (r0, r1), (c0, c1) in part:
            assert (r0 == c0 and r1 == c1) or r1 <= c0  # on or above the diagonal
            cover[r0:r1, c0:c1] += 1
            if r0 != c0:  # mirrored once gathered
                cover[c0:c1, r0:r1] += 1
    assert torch.equal(cover, torch.ones(n, n, dtype=torch.int64))
    loads = [sum((r1 - r0) * (c1 - c0) for (r0, r1), (c0, c1) in part) for part in dealt]
    if n >= 4 * size:
        assert max(loads) * size <= 1.1 * sum(loads)


def test_upper_tiles_of_two_ranks_are_five_sixteenths_each() -> None:
    dealt = upper_tiles(2048, 2)  # 4 blocks of 512 samples: 3 blocks were slower (a third each)
    assert [len(part) for part in dealt] == [5, 5]
    assert {r for part in dealt for r, _ in part} == {
        (0, 512),
        (512, 1024),
        (1024, 1536),
        (1536, 2048),
    }


def test_kernel_grid_is_the_squarest() -> None:
    from torchjac._distributed import _grid

    assert [_grid(r, 2) for r in (1, 2, 3, 4, 6, 8, 64)] == [
        (1, 1),
        (2, 1),
        (3, 1),
        (2, 2),
        (3, 2),
        (4, 2),
        (8, 8),
    ]
    assert _grid(5, 1) == (5,)
