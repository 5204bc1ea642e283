"""Reading a torch call's arguments, for the torch-function modes that follow a forward's ops
(NOTE [chain from operations], NOTE [op batch proof], NOTE [parameter chain from operations])."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["call_arg", "tensors_in"]


def tensors_in(items: Any) -> list[Tensor]:
    """The Tensors among a call's arguments, in lists, tuples and dicts at any depth (cheaper than
    a pytree; never a tensor missed in those)."""
    out: list[Tensor] = []
    for a in items:
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(tensors_in(a))
        elif isinstance(a, dict):
            out.extend(tensors_in(a.values()))
    return out


def call_arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, by keyword or at position ``i``, else ``default``."""
    return kwargs[name] if name in kwargs else args[i] if len(args) > i else default
