"""The shared pieces of the rules of NOTE [sparsity tracing]: the reader of index sets, the
arguments of an aten op by name, and the dense rule (every output reads every input)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.sparse.index_sets import Sets

__all__ = ["Reader", "Result", "Rule", "bind", "broadcast", "dense_rule", "tensors"]


class Reader:
    """The tracer's index sets of a tensor (cached per call)."""

    def __init__(self, read: Callable[[Tensor], Sets], n: int, tracked: list[Tensor]) -> None:
        self.read = read
        self.n = n  # the number of input elements (columns of every set)
        self.tracked = tracked  # the op's tensor arguments that depend on x, in order

    def __call__(self, t: Tensor) -> Sets:
        return self.read(t)

    def depends(self, value: Any) -> bool:
        """Some tensor in ``value`` depends on ``x``."""
        return any(self.read(t).live for t in tensors(value))


Result = list[Sets] | None
Rule = Callable[[Any, Any, Any, list[Tensor], Reader], Result]


def bind(func: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    """The op's arguments by name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def tensors(value: Any) -> list[Tensor]:
    """The Tensors in an aten op's arguments or results (Tensors, lists, tuples, dicts of them:
    aten schemas nest no deeper than ``Tensor?[]``)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, (list, tuple)):
        return []
    found = []
    for v in value:
        if isinstance(v, Tensor):
            found.append(v)
        elif isinstance(v, (list, tuple, dict)):
            found += tensors(v)
    return found


def dense_rule(
    targets: list[Tensor], tracked: list[Tensor], read: Callable[[Tensor], Sets]
) -> list[Sets]:
    """Every written element depends on every element the op read (a superset)."""
    n = read(tracked[0]).n
    # one row per input first: a union is of index sets of as many rows
    union = Sets.union([read(t).dense_to(1) for t in tracked], 1, n)
    return [union.dense_to(t.numel()) for t in targets]


def broadcast(sets: Sets, src: Tensor, shape: torch.Size) -> Sets:
    """Sets of ``src`` broadcast to ``shape``."""
    if src.shape == shape:
        return sets
    return sets.take(torch.arange(src.numel()).view(src.shape).expand(shape))
