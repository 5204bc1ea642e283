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
3. the numbers: padded all-gathers (or gathers to rank 0) in rounds of at most
   ``_ROUND_BYTES`` per rank, each piece written at its index into the full result.
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
            return done[0][0], _index(axes, ranges)
        shapes = next(m for m in metas if m is not None)[2][0][1]
        sizes = [b - a for a, b in ranges]  # an empty part: empty leaves of the others' shapes
        empty = [
            torch.empty(_with(s, axes, sizes), dtype=_dtype(d), device=job.device)
            for s, d in shapes
        ]
        return _build(spec, empty), _index(axes, ranges)
    leaves = [leaf for d in done for leaf in _leaves(d[0])]
    full = _gather_leaves(group, rank, gather, leaves, metas, axes, job)
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


def _index(axes: tuple[int, ...], ranges: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    """``full[index]`` is the shard: a slice at each split axis, everything elsewhere."""
    index = [slice(None)] * (max(axes) + 1)
    for ax, (a, b) in zip(axes, ranges):
        index[ax] = slice(a, b)
    return tuple(index)


def _with(shape: list[int], axes: tuple[int, ...], sizes: list[int]) -> list[int]:
    out = list(shape)
    for ax, n in zip(axes, sizes):
        out[ax] = n
    return out


# bytes a rank sends per collective round of step 3: bounds the receive buffers (ranks x this)
_ROUND_BYTES = 64 << 20


def _gather_leaves(
    group: Any,
    rank: int,
    gather: str | bool,
    leaves: list[Tensor],
    metas: list[Any],
    axes: tuple[int, ...],
    job: Job,
) -> list[Tensor] | None:
    """Step 3: every part of every rank written at its index in the whole result.

    Parts are cut along the first split axis into rounds of at most ``_ROUND_BYTES`` per rank;
    each round is one padded all-gather (or gather to rank 0) per dtype, so the receive buffers
    hold ``ranks x _ROUND_BYTES``, never the whole result a second time.
    """
    import torch.distributed as dist

    totals, device, ax = job.totals, job.device, axes[0]
    shapes = next(m for m in metas if m is not None)[2][0][1]
    receives = gather == "all" or rank == 0  # with "rank0", the others only send
    full = [
        torch.empty(_with(s, axes, list(totals)) if receives else 0, dtype=_dtype(d), device=device)
        for s, d in shapes
    ]
    slabs = [[] if m is None else _slabs(m[2], ax) for m in metas]  # per rank: (part, lo, hi)
    count = len(shapes)
    for step in range(max(len(s) for s in slabs)):
        for dtype in dict.fromkeys(d for _, d in shapes):
            which = [i for i, (_, d) in enumerate(shapes) if d == dtype]
            sizes = [_round_size(metas[r], slabs[r], step, which, ax) for r in range(len(metas))]
            width = max(sizes)
            send = []
            if step < len(slabs[rank]):
                q, lo, hi = slabs[rank][step]
                send = [leaves[q * count + i].narrow(ax, lo, hi - lo).reshape(-1) for i in which]
            pad = torch.zeros(width - sizes[rank], dtype=_dtype(dtype), device=device)
            buf = torch.cat([*send, pad])
            bufs = [
                torch.empty(width if receives else 0, dtype=buf.dtype, device=device) for _ in metas
            ]
            if gather == "all":
                dist.all_gather(bufs, buf, group=group)
            else:
                dist.gather(
                    buf,
                    bufs if rank == 0 else None,
                    dst=dist.get_global_rank(group, 0),
                    group=group,
                )
            if not receives:
                continue
            for r, got in enumerate(bufs):
                if step >= len(slabs[r]):
                    continue
                q, lo, hi = slabs[r][step]
                ranges, sh = metas[r][2][q]
                (a, _), *rest = ranges
                sub = ((a + lo, a + hi), *rest)
                off = 0
                for i in which:
                    shape = _with(sh[i][0], (ax,), [hi - lo])
                    n = math.prod(shape)
                    piece = got[off : off + n].reshape(shape)
                    if job.place is None:
                        full[i][_index(axes, sub)] = piece
                    else:
                        job.place(full[i], sub, piece)
                    off += n
    return full if receives else None


def _round_size(
    meta: Any, slabs: list[tuple[int, int, int]], step: int, which: list[int], ax: int
) -> int:
    """Elements a rank sends in round ``step`` for the leaves ``which`` (0 past its last)."""
    if step >= len(slabs):
        return 0
    q, lo, hi = slabs[step]
    return sum(_numel(meta[2][q][1][i][0], ax, hi - lo) for i in which)


def _slabs(parts: list[Any], ax: int) -> list[tuple[int, int, int]]:
    """A rank's parts cut along the first split axis: ``(part, lo, hi)`` rounds of at most
    ``_ROUND_BYTES`` (at least one index of the axis per round)."""
    out = []
    for q, (ranges, sh) in enumerate(parts):
        length = ranges[0][1] - ranges[0][0]
        per_index = sum(
            _numel(s, ax, 1) * _dtype(d).itemsize for s, d in sh
        )  # bytes of one index along the axis, all leaves
        step = max(1, _ROUND_BYTES // max(per_index, 1))
        out += [(q, lo, min(lo + step, length)) for lo in range(0, length, step)]
    return out


def _numel(shape: list[int], ax: int, length: int) -> int:
    return math.prod(_with(shape, (ax,), [length]))


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


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


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
