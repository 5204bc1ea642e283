"""Step 3 of NOTE [split and gather]: every rank's parts written into the whole result.

NOTE [point-to-point gather]: the pieces move by point-to-point sends and receives, batched per
round (``batch_isend_irecv``), not by ``all_gather``: gloo's all-gather copies its input and
outputs through flat buffers of its own and the padding makes every rank send the largest
piece, and on loopback it took 0.23 s of CPU per rank for 144 MiB against 0.05 s for one send
and one receive. A piece whose place in the result is contiguous (a slice of the first split
axis) is received straight into the result; any other is received into a buffer of its own and
then placed (a symmetric kernel's tile also writes its transpose). Each rank's parts are cut
along the first split axis into rounds of at most ``_ROUND_BYTES / (ranks - 1)``, so that a
rank receives at most ``_ROUND_BYTES`` a round; while a round is in flight the rank places its
own piece and the previous round's received ones, so the buffers hold two rounds at most,
never a second copy of the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["gather_leaves", "index_of", "torch_dtype", "with_sizes"]

# bytes a rank receives per round of step 3: the receive buffers hold two rounds at most
_ROUND_BYTES = 64 << 20

Place = Callable[[Tensor, tuple[tuple[int, int], ...], Tensor], None]


def gather_leaves(
    group: Any,
    rank: int,
    gather: str | bool,
    leaves: list[Tensor],
    metas: list[Any],
    axes: tuple[int, ...],
    totals: tuple[int, ...],
    device: torch.device,
    place: Place | None,
) -> list[Tensor] | None:
    """The leaves of the whole result on every rank (``"all"``) or on rank 0 (``"rank0"``).

    ``leaves`` are this rank's parts' leaves in order; ``metas[r]`` is rank ``r``'s layout from
    step 2 (``None`` if it had no part): per part its ranges and its leaves' shapes and dtypes.
    """
    import torch.distributed as dist

    ax = axes[0]
    shapes = next(m for m in metas if m is not None)[2][0][1]
    receives = gather == "all" or rank == 0  # with "rank0", the others only send
    full = [
        torch.empty(with_sizes(s, axes, list(totals)), dtype=torch_dtype(d), device=device)
        for s, d in (shapes if receives else [])
    ]
    most = max(1, _ROUND_BYTES // max(1, len(metas) - 1))  # bytes a rank sends a round
    slabs = [[] if m is None else _slabs(m[2], ax, most) for m in metas]  # (part, lo, hi)
    count = len(shapes)
    to = [r for r in range(len(metas)) if r != rank and (gather == "all" or r == 0)]

    def put(i: int, sub: tuple[tuple[int, int], ...], piece: Tensor) -> None:
        if place is not None:
            place(full[i], sub, piece)
        else:
            full[i][index_of(axes, sub)] = piece

    staged: list[tuple[int, tuple[tuple[int, int], ...], Tensor]] = []  # received, not placed
    for step in range(max(len(s) for s in slabs)):
        ops, own, arriving = [], [], []
        if step < len(slabs[rank]):
            q, lo, hi = slabs[rank][step]
            sub = _sub(metas[rank][2][q][0], lo, hi)
            for i in range(count):
                piece = leaves[q * count + i].narrow(ax, lo, hi - lo).contiguous()
                own.append((i, sub, piece))
                if piece.numel():
                    ops += [_op(dist.isend, piece, r, group, i) for r in to]
        for r in range(len(metas)) if receives else ():
            if r == rank or step >= len(slabs[r]):
                continue
            q, lo, hi = slabs[r][step]
            ranges, sh = metas[r][2][q]
            sub = _sub(ranges, lo, hi)
            for i in range(count):
                shape = with_sizes(sh[i][0], (ax,), [hi - lo])
                if not math.prod(shape):
                    continue
                target = full[i][index_of(axes, sub)]
                if place is None and target.is_contiguous():
                    ops.append(_op(dist.irecv, target, r, group, i))  # straight into place
                else:
                    buf = torch.empty(shape, dtype=torch_dtype(sh[i][1]), device=device)
                    ops.append(_op(dist.irecv, buf, r, group, i))
                    arriving.append((i, sub, buf))
        works = dist.batch_isend_irecv(ops) if ops else []
        for i, sub, piece in (own if receives else []) + staged:  # while the round is in flight
            put(i, sub, piece)
        for work in works:
            work.wait()
        staged = arriving
    for i, sub, piece in staged:
        put(i, sub, piece)
    return full if receives else None


def _op(kind: Any, tensor: Tensor, peer: int, group: Any, tag: int) -> Any:
    import torch.distributed as dist

    return dist.P2POp(kind, tensor, dist.get_global_rank(group, peer), group, tag)


def _sub(ranges: Any, lo: int, hi: int) -> tuple[tuple[int, int], ...]:
    """The ranges of a part's round: ``lo:hi`` of its first split axis."""
    (a, _), *rest = ranges
    return ((a + lo, a + hi), *(tuple(r) for r in rest))


def _slabs(parts: list[Any], ax: int, most: int) -> list[tuple[int, int, int]]:
    """A rank's parts cut along the first split axis into ``(part, lo, hi)`` rounds of balanced
    lengths and at most ``most`` bytes (at least one index of the axis per round)."""
    out = []
    for q, (ranges, sh) in enumerate(parts):
        length = ranges[0][1] - ranges[0][0]
        per_index = sum(  # bytes of one index along the axis, all leaves
            math.prod(with_sizes(s, (ax,), [1])) * torch_dtype(d).itemsize for s, d in sh
        )
        rounds = min(length, max(1, -(-length * per_index // most)))
        for k in range(rounds):
            lo = k * (length // rounds) + min(k, length % rounds)
            out.append((q, lo, lo + length // rounds + (k < length % rounds)))
    return out


def index_of(axes: tuple[int, ...], ranges: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    """``full[index]`` is the shard: a slice at each split axis, everything elsewhere."""
    index = [slice(None)] * (max(axes) + 1)
    for ax, (a, b) in zip(axes, ranges):
        index[ax] = slice(a, b)
    return tuple(index)


def with_sizes(shape: list[int], axes: tuple[int, ...], sizes: list[int]) -> list[int]:
    """``shape`` with ``sizes`` at ``axes``."""
    out = list(shape)
    for ax, n in zip(axes, sizes):
        out[ax] = n
    return out


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype
