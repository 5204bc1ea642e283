"""``ntk`` over a process group: ``(x1 rows, x2 rows)`` tiles on a grid of ranks (NOTE [split
and gather]); each rank computes its tile with the single-process ``ntk``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchjac._checks import check_gather, check_process_group
from torchjac._distributed import Job, Ranges, balanced, run
from torchjac._distributed_checks import check_samples, scaled_lookups
from torchjac._distributed_doors import describe_named, selected_params, whole_or_pair
from torchjac._engine.core.blocked import copy_transposed_

__all__ = ["split_ntk", "upper_tiles"]

Door = Callable[..., Any]


def split_ntk(door: Door, fn: str, a: dict[str, Any]) -> Any:
    """``ntk`` with ``process_group``: tiles ``(x1 rows, x2 rows)`` on a grid of ranks."""
    group = check_process_group(fn, a["process_group"])
    gather = check_gather(fn, a["gather"])
    model, x1, x2 = a["model"], a["x1"], a["x2"]
    opts = {k: a[k] for k in ("params", "batch_dim", "chunk_size", "max_memory")}
    if group is None:
        return whole_or_pair(gather, lambda: door(model, x1, x2, **opts))

    def plan() -> Job:
        from torchjac._ntk import _check_x

        bd = opts["batch_dim"]
        if not isinstance(model, nn.Module) or isinstance(bd, bool) or not isinstance(bd, int):
            raise TypeError(f"{fn}: `model` must be an nn.Module and `batch_dim` an int.")
        xs1 = _check_x(fn, "x1", x1, bd)
        xs2 = xs1 if x2 is None else _check_x(fn, "x2", x2, bd)
        pack = (lambda xs: xs[0]) if isinstance(x1, Tensor) else tuple
        named1 = [(f"x1[{i}]", x) for i, x in enumerate(xs1)]
        named2 = [(f"x2[{i}]", x) for i, x in enumerate(xs2)]
        params = selected_params(fn, model, opts)
        second = "x2: None" if x2 is None else describe_named(named2)
        sig = f"{fn}({describe_named(named1)}; {second}"
        sig += f"; {describe_named(params)}; batch_dim={bd})"

        def call(xs: list[Tensor]) -> Any:
            return model(*xs)

        whole_kernel: list[Tensor] = []  # computed once by a rank that needs it
        seen: list[bool] = []  # whether x1's call scales a lookup, once known on this rank

        def tile(ranges: Ranges) -> tuple[Any, tuple[int, ...]]:
            (r0, r1), (c0, c1) = ranges
            triangle = x2 is None and gather is not False  # NOTE [symmetric tiles]
            scaled = False  # a lookup scaled by index counts (NOTE [split samples])
            if not triangle or (r0, r1) == (c0, c1):  # each block checked once over the ranks
                floats1 = [(n, x) for n, x in named1 if x.is_floating_point()]
                scaled = check_samples(fn, model, _with_fixed(call, named1), floats1, bd, r0, r1)
                seen[:] = [scaled]
            else:
                if not seen:
                    seen.append(scaled_lookups(fn, model, call, named1))
                scaled = seen[0]
            if x2 is not None:
                floats2 = [(n, x) for n, x in named2 if x.is_floating_point()]
                scaled |= check_samples(fn, model, _with_fixed(call, named2), floats2, bd, c0, c1)
            if scaled:
                if not whole_kernel:
                    whole_kernel.append(door(model, x1, x2, **opts))
                k = whole_kernel[0]
                cols_at = 1 + (k.dim() - 2) // 2
                k = k.narrow(0, r0, r1 - r0).narrow(cols_at, c0, c1 - c0)
                return k.clone(memory_format=torch.contiguous_format), (0, cols_at)
            rows = pack(tuple(x.narrow(bd, r0, r1 - r0) for x in xs1))
            cols = pack(tuple(x.narrow(bd, c0, c1 - c0) for x in xs2))
            same = triangle and (r0, r1) == (c0, c1)
            k = door(model, rows, None if same else cols, **opts)
            return k, (0, 1 + (k.dim() - 2) // 2)

        n1, n2 = xs1[0].shape[bd], xs2[0].shape[bd]
        whole = lambda: door(model, x1, x2, **opts)  # noqa: E731
        if x2 is not None:
            return Job(sig, (n1, n2), xs1[0].device, tile, whole)
        if gather is False:  # rows of K against all of x1: a slice, made symmetric nowhere
            return Job(sig, (n1, n2), xs1[0].device, tile, whole)
        dealt = upper_tiles(n1, dist.get_world_size(group))

        def place(k: Tensor, ranges: Ranges, piece: Tensor) -> None:
            """A tile at its place and, below the diagonal, its transpose: exactly symmetric,
            read from the contiguous piece received (NOTE [symmetric tiles])."""
            (r0, r1), (c0, c1) = ranges
            c = math.prod(k.shape[1 : k.dim() // 2])
            flat = k.view(n1 * c, n1 * c)
            tile = piece.reshape((r1 - r0) * c, (c1 - c0) * c)
            flat[r0 * c : r1 * c, c0 * c : c1 * c] = tile
            if r1 <= c0:  # above the diagonal (a round of a diagonal tile is not)
                copy_transposed_(flat[c0 * c : c1 * c, r0 * c : r1 * c], tile)

        parts = lambda r, _: dealt[r]  # noqa: E731
        return Job(sig, (n1, n1), xs1[0].device, tile, whole, parts=parts, place=place)

    return run(fn, group, gather, plan)


def upper_tiles(n: int, size: int) -> list[list[Ranges]]:
    """NOTE [symmetric tiles]: ``K(x, x)`` needs only its tiles on and above the diagonal. The
    ``n`` samples are cut into ``t`` balanced blocks, the ``t (t + 1) / 2`` upper tiles dealt to
    the ``size`` ranks largest first, each to the least loaded. A diagonal tile costs its whole
    area (a full product, made symmetric), so more blocks bring the busiest rank's area down
    towards ``n² / (2 size)``, but each tile costs a pass of the model over its samples: ``t`` is
    the fewest blocks whose busiest rank has at most 3% more area than the least busiest over
    ``t <= 4 √size + 2``. 2 ranks: ``t = 4``, five tiles of a sixteenth each (``t = 3``, a third
    each, measured 10 to 12% slower on W6's MLP and a CNN; ``t = 6`` slower again on the CNN).
    Diagonal tiles are symmetric kernels of their own; the others are mirrored once gathered."""
    deals = [_deal(n, t, size) for t in range(1, min(n, 4 * math.isqrt(size) + 2) + 1)]
    least = min(busiest for _, busiest in deals)
    return next(dealt for dealt, busiest in deals if busiest <= 1.03 * least)


def _deal(n: int, t: int, size: int) -> tuple[list[list[Ranges]], int]:
    """The upper tiles of ``t`` blocks dealt largest first to the least loaded rank, and the
    busiest rank's area."""
    blocks = [balanced(n, t, i) for i in range(t)]
    tiles = [(blocks[i], blocks[j]) for i in range(t) for j in range(i, t)]
    tiles.sort(key=lambda p: -(p[0][1] - p[0][0]) * (p[1][1] - p[1][0]))
    loads: list[int] = [0] * size
    dealt: list[list[Ranges]] = [[] for _ in range(size)]
    for tile in tiles:
        r = loads.index(min(loads))
        dealt[r].append(tile)
        loads[r] += (tile[0][1] - tile[0][0]) * (tile[1][1] - tile[1][0])
    return dealt, max(loads)


def _with_fixed(
    call: Callable[[list[Tensor]], Any], named: list[tuple[str, Tensor]]
) -> Callable[[list[Tensor]], Any]:
    """``call`` on all of ``named``, the floating ones replaced by the given tensors in order."""

    def wrapped(floats: list[Tensor]) -> Any:
        it = iter(floats)
        return call([next(it) if x.is_floating_point() else x for _, x in named])

    return wrapped
