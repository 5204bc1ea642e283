"""The rule of NOTE [sparsity tracing] for data movement: slicing copies, padding, ``cat``,
``roll``, ``flip``, indexing, ``gather``, ``repeat``, upsampling by nearest neighbours.

NOTE [movement codes]: codes are float64, exact up to ``2**53`` elements; an output value is
truncated to an integer and clamped to ``0..numel`` (``0``: no element), so a constant the op
writes itself (a padding value) can only be mistaken for a code, which adds a dependence (a
superset), never removes one. An index, mask or condition computed from ``x`` makes the op read
the union of its data inputs' sets: which element moves where then depends on the value of ``x``.
An op with no index argument moves elements by the shapes of its inputs and its other
arguments alone, so its code map is kept under them (at most ``CODE_MAPS`` maps of up to
``CACHED_CODES`` elements): ``F.pad`` met again costs one gather.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.sparse.index_forms import remember
from torchjac._engine.sparse.index_sets import Sets
from torchjac._engine.sparse.sparsity_base import Reader, Result, dense_rule, tensors

__all__ = ["movement_rule"]

INDEX_ARGS = frozenset({"index", "indices", "mask", "condition", "repeats"})


@functools.cache
def _index_positions(func: Any) -> tuple[tuple[int, str], ...]:
    """Where the op's index arguments sit: (position, name)."""
    return tuple((i, a.name) for i, a in enumerate(func._schema.arguments) if a.name in INDEX_ARGS)


def movement_rule(func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader) -> Result:
    index = [
        t
        for i, name in _index_positions(func)
        for t in tensors(args[i] if i < len(args) else kwargs.get(name))
    ]
    data = [t for t in tensors((args, kwargs)) if not any(t is i for i in index)]
    live = [t for t in data if read(t).live]
    n = read.n
    if any(read(t).live for t in index) or len(targets) != 1:
        return None if not live else dense_rule(targets, live, read)
    (out,) = targets
    parts = []
    for k in live:
        at_k = next(i for i, d in enumerate(data) if d is k)
        key = _code_key(func, args, kwargs, at_k) if not index else None
        at = _code_maps.get(key) if key is not None else None
        if at is not None:
            parts.append(read(k).gather(at, shifted=True))
            continue

        def code(t: Any, k: Tensor = k) -> Any:
            if isinstance(t, (list, tuple)):
                return type(t)(code(v) for v in t)
            if not isinstance(t, Tensor) or not any(t is d for d in data):
                return t
            if t is k:
                codes = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device)
                return codes.view(t.shape)
            return torch.zeros(t.shape, dtype=torch.float64, device=t.device)

        found = tensors(func(*code(args), **{key: code(v) for key, v in kwargs.items()}))
        res = found[0] if found else None
        if res is None or res.shape != out.shape:
            return None
        # code q names element q - 1; 0 and whatever is not a code in range (a constant the
        # op wrote) name none, or some element: a superset (NOTE [movement codes])
        at = res.reshape(-1).cpu().long().clamp_(0, k.numel())
        if key is not None and at.numel() <= CACHED_CODES:
            remember(_code_maps, key, at, CODE_MAPS)
        parts.append(read(k).gather(at, shifted=True))
    return [Sets.lazy_union(parts, out.numel(), n)]  # gathers: empty only if all "none"


CACHED_CODES = 2**16  # output elements up to which an op's code map is kept
CODE_MAPS = 32  # code maps kept (NOTE [movement codes])
_code_maps: dict[tuple[Any, ...], Tensor] = {}


def _code_key(func: Any, args: Any, kwargs: Any, k: int) -> tuple[Any, ...] | None:
    """What an op's code map depends on (NOTE [movement codes]): the op, which data input
    carries the codes, and its arguments with tensors as their shapes and devices; ``None``
    for an argument of another kind."""
    try:
        key = (func, k, _sig(args), _sig(tuple(sorted(kwargs.items()))))
        hash(key)
    except TypeError:
        return None
    return key


_PLAIN = (
    int,
    float,
    bool,
    str,
    type(None),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)


def _sig(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.device)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_sig(v) for v in value))
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    raise TypeError(type(value).__name__)
