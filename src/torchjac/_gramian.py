"""``gramian`` and ``ntk`` (issue 5, in progress)."""

from __future__ import annotations

from typing import Any

__all__ = ["gramian", "ntk"]


def gramian(outputs: Any, inputs: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("gramian: issue 5")


def ntk(model: Any, x1: Any, x2: Any = None, **kwargs: Any) -> Any:
    raise NotImplementedError("ntk: issue 5")
