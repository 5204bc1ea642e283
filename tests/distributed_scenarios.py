"""What each of the 2 gloo ranks spawned by ``test_distributed.py`` runs: every scenario on
both ranks (SPMD), each against the single-process result in float64 on the same rank.

A scenario returns nothing or raises; the rank records ``"ok"`` or the error and goes on.
"""

from __future__ import annotations

import datetime
import json
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import torchjac as tj
from torchjac import _distributed_gather
from torchjac._engine.core.fast import fast_paths

DT = torch.float64
SCENARIOS: dict[str, Callable[[int, Any], None]] = {}


def scenario(f: Callable[[int, Any], None]) -> Callable[[int, Any], None]:
    SCENARIOS[f.__name__] = f
    return f


def close(got: Any, want: Any) -> None:
    if isinstance(want, Tensor):
        assert isinstance(got, Tensor) and got.shape == want.shape, (got, want.shape)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (list(got), list(want))
        for k in want:
            close(got[k], want[k])
    else:
        assert type(got) is type(want) and len(got) == len(want)
        for a, b in zip(got, want):
            close(a, b)


def raises(kind: type[BaseException], match: str, call: Callable[[], Any]) -> str:
    try:
        call()
    except kind as err:
        assert match in str(err), str(err)
        return str(err)
    raise AssertionError(f"no {kind.__name__} raised")


def mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


def data(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


@scenario
def jacobian_samples_uneven_tuple_batch_dim_1(rank: int, g: Any) -> None:
    xs = (data(3, 7), data(2, 7, seed=1))  # 7 samples: 4 and 3

    def f(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return a.sin() * b.sum(0), a.cos()

    before = [x.clone() for x in xs]
    rng = torch.get_rng_state()
    close(tj.jacobian(f, xs, batch_dim=1, process_group=g), tj.jacobian(f, xs, batch_dim=1))
    assert all(torch.equal(x, y) for x, y in zip(xs, before))
    assert torch.equal(rng, torch.get_rng_state())


@scenario
def jacobian_rows_two_outputs_each_mode(rank: int, g: Any) -> None:
    x = data(4, 3)

    def f(x: Tensor) -> tuple[Tensor, Tensor]:
        return x.tanh() @ x.T, x.sum(0)

    for mode in ("auto", "rev", "fwd"):
        got = tj.jacobian(f, x, mode=mode, process_group=g)
        close(got, tj.jacobian(f, x, mode=mode))


@scenario
def jacobian_columns_of_a_tall_dict_function(rank: int, g: Any) -> None:
    xs = {"a": data(3), "b": data(2, 2, seed=1)}  # 7 columns: 4 and 3

    def f(d: dict[str, Tensor]) -> Tensor:
        return torch.outer(d["a"].sin(), d["b"].reshape(-1)).exp()  # [3, 4]: 12 rows

    want = tj.jacobian(f, xs)
    close(tj.jacobian(f, xs, process_group=g), want)
    close(tj.jacobian(f, xs, mode="fwd", process_group=g), want)
    shard, index = tj.jacobian(f, xs, process_group=g, gather=False)
    flat = torch.cat([want["a"].reshape(3, 4, -1), want["b"].reshape(3, 4, -1)], dim=-1)
    assert index == (slice(None), slice(None), (slice(0, 4), slice(4, 7))[rank]), index
    close(shard, flat[index])


@scenario
def hessian_samples_dict(rank: int, g: Any) -> None:
    xs = {"u": data(5, 2), "v": data(5, 1, seed=1)}

    def f(d: dict[str, Tensor]) -> Tensor:
        return (d["u"] ** 3).sum(-1, keepdim=True) * d["v"].exp()

    close(tj.hessian(f, xs, batch_dim=0, process_group=g), tj.hessian(f, xs, batch_dim=0))


@scenario
def hessian_scalar_one_row_leaves_rank_1_empty(rank: int, g: Any) -> None:
    x = data(2, 3)

    def f(x: Tensor) -> Tensor:
        return (x.sin() ** 2).sum()

    close(tj.hessian(f, x, process_group=g), tj.hessian(f, x))
    shard, index = tj.hessian(f, x, process_group=g, gather=False)
    assert index == (slice(rank, 1),) and shard.shape == (1 - rank, 2, 3, 2, 3)


@scenario
def hessian_diagonal_and_laplacian(rank: int, g: Any) -> None:
    model, x = mlp(), data(5, 3)
    for mode in ("auto", "rev"):
        got = tj.hessian_diagonal(model, x, mode=mode, process_group=g)
        close(got, tj.hessian_diagonal(model, x, mode=mode))
    close(tj.laplacian(model, x, batch_dim=0, process_group=g), tj.laplacian(model, x, batch_dim=0))
    close(tj.laplacian(model, x, process_group=g), tj.laplacian(model, x))


@scenario
def param_jacobian_samples_and_rows(rank: int, g: Any) -> None:
    model, x = mlp(), data(5, 3)
    params = [p.detach().clone() for p in model.parameters()]
    want = tj.param_jacobian(model, x, batch_dim=0)
    close(tj.param_jacobian(model, x, batch_dim=0, process_group=g), want)
    close(tj.param_jacobian(model, x, process_group=g), want)
    some = tj.param_jacobian(model, x, params=["2.bias", "0.weight"], process_group=g)
    close(some, tj.param_jacobian(model, x, params=["2.bias", "0.weight"]))
    first = model[0].weight
    for bd in (None, 0):
        lazy = (p for p in [first])  # an iterator, read once
        got = tj.param_jacobian(model, x, params=lazy, batch_dim=bd, process_group=g)
        close(got, tj.param_jacobian(model, x, params=[first], batch_dim=bd))
    one = ["0.bias", "2.bias"][rank]
    raises(
        ValueError,
        "same arguments",
        lambda: tj.param_jacobian(model, x, params=one, batch_dim=0, process_group=g),
    )
    shard, index = tj.param_jacobian(model, x, batch_dim=0, process_group=g, gather=False)
    close(shard, {k: v[index] for k, v in want.items()})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(p.grad is None for p in model.parameters())


@scenario
def ntk_tiles_every_gather(rank: int, g: Any) -> None:
    model, x1, x2 = mlp(), data(5, 3), data(4, 3, seed=1)
    want = tj.ntk(model, x1)
    got = tj.ntk(model, x1, process_group=g)
    close(got, want)
    assert torch.equal(got, got.permute(2, 3, 0, 1))
    close(tj.ntk(model, x1, x2, process_group=g), tj.ntk(model, x1, x2))
    tile, index = tj.ntk(model, x1, x2, process_group=g, gather=False)
    assert index == ((slice(0, 3), slice(3, 5))[rank], slice(None), slice(0, 4)), index
    close(tile, tj.ntk(model, x1, x2)[index])
    on0 = tj.ntk(model, x1, process_group=g, gather="rank0")
    assert on0 is None if rank else torch.equal(on0, got)


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Tensor, scale: Tensor, *, shift: Tensor) -> Tensor:
        return self.lin(x).tanh() * scale + shift  # scale [3] is not batched, shift [N, 3] is


@scenario
def param_jacobian_keyword_and_unbatched_arguments(rank: int, g: Any) -> None:
    torch.manual_seed(5)
    model, x, scale, shift = Scaled().to(DT), data(5, 3), data(3, seed=1), data(5, 3, seed=2)
    for bd in (0, -2):
        got = tj.param_jacobian(model, x, scale, shift=shift, batch_dim=bd, process_group=g)
        close(got, tj.param_jacobian(model, x, scale, shift=shift, batch_dim=bd))


@scenario
def ntk_of_an_embedding_on_integer_inputs(rank: int, g: Any) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2)).to(DT)
    tokens = torch.randint(0, 10, (5, 2), generator=torch.Generator().manual_seed(0))
    close(tj.ntk(model, tokens, process_group=g), tj.ntk(model, tokens))
    close(tj.ntk(model, tokens, tokens[:3], process_group=g), tj.ntk(model, tokens, tokens[:3]))


class FunctionalLookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 4, dtype=DT))
        self.lin = nn.Linear(8, 2).to(DT)

    def forward(self, t: Tensor) -> Tensor:
        return self.lin(F.embedding(t, self.table, scale_grad_by_freq=True).flatten(1))


@scenario
def lookups_scaled_by_the_whole_calls_index_counts(rank: int, g: Any) -> None:
    """``scale_grad_by_freq=True`` divides by the whole call's index counts (NOTE [per-sample
    index counts]); a rank's samples alone counted their own (off by 0.17 to 0.20)."""
    torch.manual_seed(6)
    module = nn.Sequential(
        nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(8, 2)
    ).to(DT)
    torch.manual_seed(7)
    tokens = torch.tensor([[1, 2], [1, 3], [2, 2], [1, 5], [3, 3]])  # 1, 2, 3 across ranks
    for model in (module, FunctionalLookup()):
        want = tj.param_jacobian(model, tokens, batch_dim=0)
        close(tj.param_jacobian(model, tokens, batch_dim=0, process_group=g), want)
        shard, index = tj.param_jacobian(model, tokens, batch_dim=0, process_group=g, gather=False)
        close(shard, {k: v[index] for k, v in want.items()})
        close(tj.ntk(model, tokens, process_group=g), tj.ntk(model, tokens))
        close(tj.ntk(model, tokens, tokens[:3], process_group=g), tj.ntk(model, tokens, tokens[:3]))
        op = tj.JacobianOperator.from_module(model, data=[tokens], process_group=g)
        close(op.to_dense(), tj.JacobianOperator.from_module(model, data=[tokens]).to_dense())
    late = FunctionalLookup()  # samples at dim 1: [2, N] tokens to [2, N] outputs
    late.forward = lambda t: F.embedding(t, late.table, scale_grad_by_freq=True).tanh().sum(-1)
    cols = tokens.T
    close(
        tj.param_jacobian(late, cols, batch_dim=1, process_group=g, params="table"),
        tj.param_jacobian(late, cols, batch_dim=1, params="table"),
    )
    tile, index = tj.ntk(late, cols, batch_dim=1, process_group=g, gather=False)
    close(tile, tj.ntk(late, cols, batch_dim=1)[index])


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.lin(a).tanh() * b


@scenario
def ntk_upper_tiles_of_seven_samples_two_inputs(rank: int, g: Any) -> None:
    torch.manual_seed(4)
    model = TwoInputs().to(DT)
    xs = (data(7, 3), data(7, 1, seed=1))
    got = tj.ntk(model, xs, process_group=g)
    close(got, tj.ntk(model, xs))
    assert torch.equal(got, got.permute(2, 3, 0, 1))
    close(tj.ntk(model, xs, xs, process_group=g), tj.ntk(model, xs, xs))


@scenario
def jacobian_operator_products(rank: int, g: Any) -> None:
    x = data(4, 3)

    def f(x: Tensor) -> Tensor:
        return (x.sin() @ x.T).tanh()

    J, alone = tj.JacobianOperator(f, x, process_group=g), tj.JacobianOperator(f, x)
    V, U = data(12, 5, seed=1), data(16, 3, seed=2)
    close(J @ V, alone @ V)
    close(J.T @ U, alone.T @ U)
    close(J @ V[:, 0], alone @ V[:, 0])  # a vector: no collective
    close(J.to_dense(), tj.jacobian(f, x).reshape(16, 12))
    close(J.gram() @ U, alone.gram() @ U)
    model, batches = mlp(), [data(3, 3, seed=3), data(2, 3, seed=4)]
    P = tj.JacobianOperator.from_module(model, data=batches, process_group=g)
    close(P.to_dense(), tj.JacobianOperator.from_module(model, data=batches).to_dense())


@scenario
def fast_paths_off_and_shapes_of_one(rank: int, g: Any) -> None:
    model, x = mlp(), data(3, 3)
    with fast_paths(False):
        close(tj.ntk(model, x, process_group=g), tj.ntk(model, x))
        close(
            tj.param_jacobian(model, x, batch_dim=0, process_group=g),
            tj.param_jacobian(model, x, batch_dim=0),
        )
    one = data(1, 1)
    shard, index = tj.jacobian(torch.sin, one, batch_dim=0, process_group=g, gather=False)
    assert shard.shape == (1 - rank, 1, 1) and index == (slice(rank, 1),)
    close(
        tj.jacobian(torch.sin, one, batch_dim=0, process_group=g),
        tj.jacobian(torch.sin, one, batch_dim=0),
    )
    close(tj.ntk(model, one.expand(1, 3), process_group=g), tj.ntk(model, one.expand(1, 3)))


@scenario
def error_on_one_rank_raises_on_every_rank(rank: int, g: Any) -> None:
    def f(x: Tensor) -> Tensor:
        if rank == 1:
            raise TypeError("only on rank 1")
        return x.sin()

    said = raises(TypeError, "only on rank 1", lambda: tj.jacobian(f, data(4, 2), process_group=g))
    assert ("rank 1 of the process group raised TypeError" in said) == (rank == 0), said


@scenario
def ranks_with_different_shapes(rank: int, g: Any) -> None:
    x = data(6 + rank, 2)
    said = raises(ValueError, "same arguments", lambda: tj.ntk(mlp()[:1], x, process_group=g))
    assert "[6, 2]" in said and "[7, 2]" in said, said


@scenario
def coupled_samples(rank: int, g: Any) -> None:
    x = data(6, 2)
    match = "declares that output sample i depends only on"
    raises(
        tj.BatchCouplingError,
        match,
        lambda: tj.jacobian(lambda x: x - x.mean(0), x, batch_dim=0, process_group=g),
    )
    # one sample per rank: only the check on the whole batch can see this coupling
    two = data(2, 3)
    said = raises(
        tj.BatchCouplingError,
        match,
        lambda: tj.hessian_diagonal(lambda x: x * x.flip(0), two, batch_dim=0, process_group=g),
    )
    assert "process_group" in said or "rank" in said, said
    bn = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).to(DT)
    raises(
        tj.BatchCouplingError,
        "train mode",
        lambda: tj.param_jacobian(bn, data(4, 3), batch_dim=0, process_group=g),
    )


@scenario
def refused_options(rank: int, g: Any) -> None:
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)).to(DT)
    rng = torch.get_rng_state()
    raises(ValueError, "random numbers", lambda: tj.ntk(drop, data(4, 3), process_group=g))
    raises(ValueError, "random numbers", lambda: tj.jacobian(drop, data(4, 3), process_group=g))
    assert torch.equal(rng, torch.get_rng_state())
    raises(
        ValueError,
        "`has_aux=True`",
        lambda: tj.jacobian(lambda x: (x, 1), data(2), has_aux=True, process_group=g),
    )


def main(rank: int, size: int, store: str, out: str) -> None:
    warnings.simplefilter("error")
    torch.set_num_threads(1)
    _distributed_gather._ROUND_BYTES = 200  # results gathered in many rounds of a few rows each
    timeout = datetime.timedelta(seconds=15)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=size, timeout=timeout
    )
    group = dist.group.WORLD
    results: dict[str, str] = {}
    for name, run in SCENARIOS.items():
        try:
            run(rank, group)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
    dist.destroy_process_group()
    try:
        raises(
            ValueError, "not initialised", lambda: tj.ntk(mlp(), data(2, 3), process_group=group)
        )
        results["destroyed_group"] = "ok"
    except Exception:
        results["destroyed_group"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
