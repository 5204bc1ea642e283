"""``jacobian``, ``hessian``, ``hessian_diagonal``, ``laplacian`` on functions (issue 3, in progress)."""

from __future__ import annotations

from typing import Any

__all__ = ["hessian", "hessian_diagonal", "jacobian", "laplacian"]


def jacobian(func: Any, inputs: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("jacobian: issue 3")


def hessian(func: Any, inputs: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("hessian: issue 3")


def hessian_diagonal(func: Any, inputs: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("hessian_diagonal: issue 3")


def laplacian(func: Any, inputs: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("laplacian: issue 3")
