"""Elementwise functions for the Taylor mode: ``φ(v)``, ``φ'(v)``, ``φ''(v)`` in closed form.

Each entry takes the value (and the op's own arguments) and returns ``(y, dy, ddy)``, ``ddy``
``None`` when ``φ'' = 0``, or ``None`` for arguments it does not cover (the general rule of
NOTE [taylor mode] takes those). Derivatives follow PyTorch's own backward formulas where they
differ from the textbook (``softplus`` above its threshold, ``relu`` at 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "MODULES", "module_parts", "tanh_parts"]

Parts = tuple[Tensor, Tensor, Tensor | None] | None


def _tanh(v: Tensor) -> Parts:
    return tanh_parts(torch.tanh(v))


def tanh_parts(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``tanh``'s parts from its value ``y`` (NOTE [fused tanh] computes ``y`` with a product)."""
    dy = 1 - y * y
    return y, dy, -2 * y * dy


def _sigmoid(v: Tensor) -> Parts:
    y = torch.sigmoid(v)
    dy = y * (1 - y)
    return y, dy, dy * (1 - 2 * y)


def _exp(v: Tensor) -> Parts:
    y = torch.exp(v)
    return y, y, y


def _sin(v: Tensor) -> Parts:
    y = torch.sin(v)
    return y, torch.cos(v), -y


def _cos(v: Tensor) -> Parts:
    y = torch.cos(v)
    return y, -torch.sin(v), -y


def _relu(v: Tensor) -> Parts:
    return torch.relu(v), (v > 0).to(v.dtype), None


def _log(v: Tensor) -> Parts:
    inv = 1 / v
    return torch.log(v), inv, -inv * inv


def _silu(v: Tensor) -> Parts:
    s = torch.sigmoid(v)
    ds = s * (1 - s)
    return v * s, s + v * ds, ds * (2 + v * (1 - 2 * s))


def _gelu(v: Tensor, approximate: str = "none") -> Parts:
    if approximate != "none":
        return None
    cdf = 0.5 * (1 + torch.erf(v / math.sqrt(2)))
    pdf = torch.exp(-0.5 * v * v) / math.sqrt(2 * math.pi)
    return v * cdf, cdf + v * pdf, pdf * (2 - v * v)


def _softplus(v: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Parts:
    linear = v * beta > threshold
    s = torch.sigmoid(v * beta)
    dy = torch.where(linear, torch.ones_like(s), s)
    ddy = torch.where(linear, torch.zeros_like(s), beta * s * (1 - s))
    return torch.nn.functional.softplus(v, beta, threshold), dy, ddy


def _square(v: Tensor) -> Parts:
    return v * v, 2 * v, torch.full_like(v, 2.0)


def _pow(v: Tensor, exponent: Any = None) -> Parts:
    if isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        return None  # a tensor exponent: the general rule
    p = float(exponent)
    if p == 2:
        return _square(v)
    if p == 1:
        return v, torch.ones_like(v), None
    if p == 0:
        return torch.ones_like(v), torch.zeros_like(v), None
    return v**exponent, p * v ** (p - 1), p * (p - 1) * v ** (p - 2)


ACTIVATIONS: dict[str, Callable[..., Parts]] = {
    "tanh": _tanh,
    "sigmoid": _sigmoid,
    "exp": _exp,
    "sin": _sin,
    "cos": _cos,
    "relu": _relu,
    "log": _log,
    "silu": _silu,
    "gelu": _gelu,
    "softplus": _softplus,
    "square": _square,
    "pow": _pow,
    "__pow__": _pow,
}

# module type -> (ACTIVATIONS entry, the keyword arguments its rule takes from the module)
MODULES: dict[type, tuple[str, tuple[str, ...]]] = {
    nn.Tanh: ("tanh", ()),
    nn.Sigmoid: ("sigmoid", ()),
    nn.SiLU: ("silu", ()),
    nn.ReLU: ("relu", ()),
    nn.GELU: ("gelu", ("approximate",)),
    nn.Softplus: ("softplus", ("beta", "threshold")),
}


def module_parts(layer: nn.Module, v: Tensor) -> Parts:
    """``(y, φ'(v), φ''(v))`` of an activation module listed in ``MODULES``, or ``None``."""
    name, keys = MODULES[type(layer)]
    return ACTIVATIONS[name](v, **{k: getattr(layer, k) for k in keys})
