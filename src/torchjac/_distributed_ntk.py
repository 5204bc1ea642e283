"""``ntk`` over a process group: ``(x1 rows, x2 rows)`` tiles on a grid of ranks (NOTE [split
and gather]); each rank computes its tile with the single-process ``ntk``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from torchjac._checks import check_gather, check_process_group
from torchjac._distributed import Job, run
from torchjac._distributed_doors import check_samples, describe_named, whole_or_pair
from torchjac._engine.blocked import symmetrize_

__all__ = ["split_ntk"]

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
        params = list(model.named_parameters())
        second = "x2: None" if x2 is None else describe_named(named2)
        sig = f"{fn}({describe_named(named1)}; {second}"
        sig += f"; {describe_named(params)}; batch_dim={bd})"

        def call(xs: list[Tensor]) -> Any:
            return model(*xs)

        def tile(ranges: tuple[tuple[int, int], ...]) -> tuple[Any, tuple[int, ...]]:
            (r0, r1), (c0, c1) = ranges
            floats1 = [(n, x) for n, x in named1 if x.is_floating_point()]
            check_samples(fn, model, _with_fixed(call, named1), floats1, bd, r0, r1)
            if x2 is not None:
                floats2 = [(n, x) for n, x in named2 if x.is_floating_point()]
                check_samples(fn, model, _with_fixed(call, named2), floats2, bd, c0, c1)
            rows = pack(tuple(x.narrow(bd, r0, r1 - r0) for x in xs1))
            cols = pack(tuple(x.narrow(bd, c0, c1 - c0) for x in xs2))
            k = door(model, rows, cols, **opts)
            return k, (0, 1 + (k.dim() - 2) // 2)

        def finish(k: Tensor) -> Tensor:
            if x2 is not None:
                return k
            n = math.prod(k.shape[: k.dim() // 2])
            return symmetrize_(k.reshape(n, n)).reshape(k.shape)  # as unsplit

        n1, n2 = xs1[0].shape[bd], xs2[0].shape[bd]
        whole = lambda: door(model, x1, x2, **opts)  # noqa: E731
        return Job(sig, (n1, n2), xs1[0].device, tile, whole, finish)

    return run(fn, group, gather, plan)


def _with_fixed(
    call: Callable[[list[Tensor]], Any], named: list[tuple[str, Tensor]]
) -> Callable[[list[Tensor]], Any]:
    """``call`` on all of ``named``, the floating ones replaced by the given tensors in order."""

    def wrapped(floats: list[Tensor]) -> Any:
        it = iter(floats)
        return call([next(it) if x.is_floating_point() else x for _, x in named])

    return wrapped
