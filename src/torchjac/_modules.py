"""``param_jacobian`` on ``nn.Module`` (issue 4, in progress)."""

from __future__ import annotations

from typing import Any

__all__ = ["param_jacobian"]


def param_jacobian(model: Any, *args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("param_jacobian: issue 4")
