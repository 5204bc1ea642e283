"""One public call split over the ranks of a ``torch.distributed`` process group.

NOTE [split and gather]: every rank calls the public function with the same arguments (SPMD,
as with DDP). The independent work is cut into contiguous, balanced ranges along one or two
axes (sizes differ by one at most; a rank may get nothing): the samples with ``batch_dim``, the
rows of the flattened output otherwise, ``(x1 rows, x2 rows)`` tiles of a kernel on a grid of
ranks. Each rank runs the single-process function on its part alone, so the engine knows
nothing of ranks. The collective steps are the same on every rank whatever happens locally, so
no rank waits in a collective that another skipped:

1. plan, then agree: each rank all-gathers its signature (shapes, dtypes, options) or its
   error; an error anywhere, or two signatures that differ, raise on every rank.
2. work, then agree again: each rank's error or the layout of its shard (container, shapes,
   dtypes, where the split axes are), so a rank whose part is empty learns the shapes.
3. the numbers: each rank's pieces sent to every other rank (or to rank 0) in rounds, each
   written at its index into the full result (NOTE [point-to-point gather]).
   ``gather=False`` skips this step.

A rank that raised re-raises its own exception; the others raise the same type (built-in or
torchjac's) naming the rank. The group's timeout bounds every wait.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchjac import _errors
from torchjac._distributed_gather import gather_leaves, index_of, torch_dtype, with_sizes

__all__ = ["Job", "balanced", "run", "split_columns"]


def balanced(total: int, parts: int, k: int) -> tuple[int, int]:
    """Part ``k`` of ``range(total)`` cut into ``parts`` contiguous pieces, sizes within one."""
    q, r = divmod(total, parts)
    start = k * q + min(k, r)
    return start, start + q + (k < r)


def _grid(size: int, axes: int) -> tuple[int, ...]:
    """Ranks along each split axis: ``(size,)``, or the squarest ``p x q = size`` (p >= q)."""
    if axes == 1:
        return (size,)
    q = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    return (size // q, q)


Ranges = tuple[tuple[int, int], ...]  # a (start, stop) per split axis


@dataclass(frozen=True)
class Job:
    """What a front door asks of the split: built on every rank by its ``plan``.

    ``work(ranges)`` runs the door on one part (a ``(start, stop)`` per axis) and returns the
    result in the user's layout with the position of each split axis in every leaf;
    ``whole()`` runs it unsplit (used when an axis is empty); ``finish`` shapes the gathered
    result (e.g. rows back to the output's shape). ``parts(rank, size)``, when given, lists a
    rank's parts (several, e.g. the upper tiles of a symmetric kernel; not with
    ``gather=False``); by default a rank has the one cell of a grid over the axes.
    ``place(full, ranges, piece)``, when given, writes a gathered piece of a one-leaf result
    into ``full`` (by default at its index; a symmetric kernel also writes the transpose).
    """

    signature: str
    totals: tuple[int, ...]
    device: torch.device
    work: Callable[[Ranges], tuple[Any, tuple[int, ...]]]
    whole: Callable[[], Any]
    finish: Callable[[Any], Any] = lambda result: result
    parts: Callable[[int, int], list[Ranges]] | None = None
    place: Callable[[Tensor, Ranges, Tensor], None] | None = None


def run(fn: str, group: Any, gather: str | bool, plan: Callable[[], Job]) -> Any:
    """The three steps of NOTE [split and gather] for one public call."""
    import torch.distributed as dist

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    job, err = _attempt(plan)
    said = _exchange(group, size, _failure(err) or ("ok", f"{job.signature}; gather={gather!r}"))
    _raise_if_failed(fn, said, err)
    mismatch = next((r for r, s in enumerate(said) if s[1] != said[0][1]), None)
    if mismatch is not None:
        raise ValueError(
            f"{fn}: every rank of the process group must call with the same arguments; rank 0 "
            f"called with ({said[0][1]}) but rank {mismatch} with ({said[mismatch][1]})."
        )
    assert job is not None
    if not all(job.totals):  # nothing to split: every rank computes the (empty) whole
        result, err = _attempt(job.whole)
        _raise_if_failed(fn, _exchange(group, size, _failure(err) or ("ok", None)), err)
        if gather is False:
            return result, (slice(None),)
        return result if gather == "all" or rank == 0 else None
    grid = _grid(size, len(job.totals))
    parts_of = job.parts or (lambda r, n: [_ranges(r, grid, job.totals)])
    mine = [p for p in parts_of(rank, size) if all(b > a for a, b in p)]
    done, err = _attempt(lambda: [job.work(p) for p in mine])
    meta = None
    if done:  # the container, the split axes, and per part its ranges and leaf shapes
        meta = (_spec(done[0][0]), done[0][1], [(p, _shapes(d[0])) for p, d in zip(mine, done)])
    said = _exchange(group, size, _failure(err) or ("ok", meta))
    _raise_if_failed(fn, said, err)
    metas = [s[1] for s in said]
    spec, axes, _ = next(m for m in metas if m is not None)  # rank 0 always has work
    if gather is False:
        assert job.parts is None
        ranges = _ranges(rank, grid, job.totals)
        if done:
            return done[0][0], index_of(axes, ranges)
        shapes = next(m for m in metas if m is not None)[2][0][1]
        sizes = [b - a for a, b in ranges]  # an empty part: empty leaves of the others' shapes
        empty = [
            torch.empty(with_sizes(s, axes, sizes), dtype=torch_dtype(d), device=job.device)
            for s, d in shapes
        ]
        return _build(spec, empty), index_of(axes, ranges)
    leaves = [leaf for d in done for leaf in _leaves(d[0])]
    full = gather_leaves(
        group, rank, gather, leaves, metas, axes, job.totals, job.device, job.place
    )
    return None if full is None else job.finish(_build(spec, full))


def split_columns(
    fn: str, group: Any, local: Callable[[Tensor], Tensor], block: Tensor, device: torch.device
) -> Tensor:
    """``local(block)`` (``[rows, k]``, one column per column of ``block``) with the block's
    columns split over the ranks, the whole on every rank: ``JacobianOperator``'s products."""

    def plan() -> Job:
        def part(ranges: Ranges) -> tuple[Tensor, tuple[int, ...]]:
            (start, stop), *_ = ranges
            return local(block[:, start:stop]), (1,)

        sig = f"{fn} @ {list(block.shape)} {block.dtype}"
        return Job(sig, (block.shape[1],), device, part, lambda: local(block))

    result = run(fn, group, "all", plan)
    assert isinstance(result, Tensor)
    return result


def _coords(rank: int, grid: tuple[int, ...]) -> tuple[int, ...]:
    return (rank,) if len(grid) == 1 else divmod(rank, grid[1])


def _ranges(
    rank: int, grid: tuple[int, ...], totals: tuple[int, ...]
) -> tuple[tuple[int, int], ...]:
    return tuple(balanced(t, g, c) for t, g, c in zip(totals, grid, _coords(rank, grid)))


# results: a Tensor, or tuples and dicts of them (nested for hessian); specs are picklable.
def _spec(x: Any) -> Any:
    if isinstance(x, Tensor):
        return "tensor"
    if isinstance(x, dict):
        return ("dict", tuple(x), tuple(_spec(v) for v in x.values()))
    return ("tuple", tuple(_spec(v) for v in x))


def _leaves(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    return [leaf for v in (x.values() if isinstance(x, dict) else x) for leaf in _leaves(v)]


def _shapes(x: Any) -> list[tuple[list[int], str]]:
    return [(list(t.shape), str(t.dtype).removeprefix("torch.")) for t in _leaves(x)]


def _build(spec: Any, leaves: list[Tensor]) -> Any:
    it = iter(leaves)

    def build(s: Any) -> Any:
        if s == "tensor":
            return next(it)
        if s[0] == "dict":
            return {k: build(v) for k, v in zip(s[1], s[2])}
        return tuple(build(v) for v in s[1])

    return build(spec)


def _attempt(step: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    try:
        return step(), None
    except Exception as err:  # agreed on by every rank before anything is raised
        return None, err


def _failure(err: BaseException | None) -> tuple[str, Any] | None:
    return None if err is None else ("error", (type(err).__name__, str(err)))


def _exchange(group: Any, size: int, mine: tuple[str, Any]) -> list[tuple[str, Any]]:
    import torch.distributed as dist

    said: list[Any] = [None] * size
    dist.all_gather_object(said, mine, group=group)
    return said


# the exception types another rank's error is raised as; anything else is a RuntimeError
_KNOWN = {
    name: getattr(builtins, name)
    for name in ("ValueError", "TypeError", "RuntimeError", "IndexError", "KeyError")
}
_KNOWN.update(BatchCouplingError=_errors.BatchCouplingError)


def _raise_if_failed(fn: str, said: list[tuple[str, Any]], own: BaseException | None) -> None:
    if own is not None:
        raise own
    for r, (status, what) in enumerate(said):
        if status == "error":
            name, message = what
            kind = _KNOWN.get(name, RuntimeError)
            raise kind(f"{fn}: rank {r} of the process group raised {name}: {message}")
