"""Where the batch dimension goes through structural and elementwise ops (``Jet.bdim``).

NOTE [batch proof]: with ``batch_dim``, a Jet's ``bdim`` says that element ``i`` along that
dimension depends only on sample ``i`` of the inputs. Inputs start with it; a rule keeps it only
when its op provably maps sample ``i`` to sample ``i``: elementwise ops (a constant operand of
any shape is no coupling: it carries no derivative), ``Linear``/``matmul`` that contract another
dimension, reductions and concatenations along other dimensions, basic indexing that keeps the
whole batch, reshapes that keep it leading, dimension permutations. Anything else (a reduction
over the batch, advanced indexing, the general rule on an op not known to be elementwise, an
in-place write of a derivative-carrying value) loses it (``None``). When every output keeps
the batch, the function is proven per-sample and the Taylor mode needs no coupling check (NOTE
[taylor check]); otherwise the check runs. Losing ``bdim`` is only ever a missed proof, so
everything not listed here is conservative.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["POINTWISE", "agreed_bdim", "broadcast_bdim", "structural_bdim"]

# Ops that the general rule may meet and that are elementwise (with broadcasting) in every
# tensor argument; their outputs keep the batch of their Jets when those agree. Matched as
# torch's own functions, never by name (a user's function may be called ``mul``).
_POINTWISE_NAMES = frozenset(
    [
        *("div", "true_divide", "__truediv__", "__rtruediv__", "reciprocal", "where", "sqrt"),
        *("rsqrt", "abs", "clamp", "clip", "maximum", "minimum", "atan2", "erf", "erfc", "sign"),
        *("pow", "__pow__", "__rpow__", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh"),
        *("log1p", "expm1", "log2", "log10", "hypot", "to", "float", "double", "type_as"),
        *("leaky_relu", "elu", "selu", "celu", "mish", "hardtanh", "logsigmoid", "sub", "mul"),
        *("add", "__sub__", "__rsub__", "__mul__", "__rmul__", "__add__", "__radd__"),
    ]
)
POINTWISE = frozenset(
    getattr(ns, name)
    for ns in (torch, Tensor, F, torch.special)
    for name in _POINTWISE_NAMES
    if callable(getattr(ns, name, None))
)


def broadcast_bdim(jet: Any, ndim: int) -> int | None:
    """The batch dimension of ``jet`` once broadcast to ``ndim`` dims (``None``: unknown)."""
    return None if jet.bdim is None else jet.bdim + ndim - jet.dim()


def agreed_bdim(jets: list[Any], ndim: int) -> int | None:
    """The common batch dimension of ``jets`` once broadcast to ``ndim`` dims (else ``None``)."""
    dims = {broadcast_bdim(j, ndim) for j in jets}
    return dims.pop() if len(dims) == 1 else None


def _dims(dim: Any, ndim: int) -> set[int] | None:
    if isinstance(dim, int) and not isinstance(dim, bool):
        return {dim % ndim}
    if isinstance(dim, (tuple, list)) and dim and all(isinstance(d, int) for d in dim):
        return {d % ndim for d in dim}
    return None  # every dimension (or something unexpected)


# torch's numpy-style spellings of the keywords read here
_ALIAS = {"dim": "axis", "keepdim": "keepdims"}
# keywords structural_bdim understands; any other one is a missed proof, not a guess
_KNOWN = frozenset(["dim", "axis", "keepdim", "keepdims", "dims", "dim0", "dim1", "dtype"])


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    if _ALIAS.get(name) in kwargs:
        return kwargs[_ALIAS[name]]
    return args[i] if len(args) > i else default


def _basic_index(index: Any) -> bool:
    """``x[:, ...]`` with only ints, slices, ``None`` and ``...``: dimension 0 stays whole."""
    items = index if isinstance(index, tuple) else (index,)
    if not items or items[0] != slice(None):
        return False
    return all(
        i is None or i is Ellipsis or isinstance(i, slice) or type(i) is int for i in items[1:]
    )


def structural_bdim(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], jets: list[Any], out: Any
) -> int | None:
    """The batch dimension of ``out`` after a linear structural op (NOTE [batch proof])."""
    if any(k not in _KNOWN for k in kwargs):
        return None
    if name in ("cat", "concat", "concatenate", "stack"):
        return _joined(name, args, kwargs, jets)
    x = jets[0]
    b, nd = x.bdim, x.dim()
    if b is None or not args or args[0] is not x or len(jets) != 1:
        return None
    if name in ("contiguous", "clone", "neg", "__neg__"):
        return b
    if name in ("sum", "mean"):
        dims = _dims(_arg(args, kwargs, 1, "dim", None), nd)
        if dims is None or b in dims:
            return None
        return b if _arg(args, kwargs, 2, "keepdim", False) else b - sum(d < b for d in dims)
    if name == "__getitem__":
        return 0 if b == 0 and _basic_index(args[1]) else None
    if name in ("reshape", "view", "flatten", "unflatten"):
        ok = b == 0 and isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == x.shape[0]
        return 0 if ok else None
    if name == "unsqueeze" and isinstance(out, Tensor):
        return b + (_arg(args, kwargs, 1, "dim", 0) % out.dim() <= b)
    if name == "t":
        return b if nd < 2 else 1 - b
    if name in ("transpose", "swapaxes", "swapdims"):
        pair = {_arg(args, kwargs, 1, "dim0", 0) % nd, _arg(args, kwargs, 2, "dim1", 0) % nd}
        return b if b not in pair else (pair - {b} or {b}).pop()
    if name == "permute":
        rest = kwargs.get("dims", args[1:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
            rest = rest[0]
        perm = [int(p) % nd for p in rest]
        return perm.index(b) if sorted(perm) == list(range(nd)) else None
    if name in ("narrow", "select", "split", "chunk"):
        along = name in ("narrow", "select")
        d = _arg(args, kwargs, 1, "dim", None) if along else _arg(args, kwargs, 2, "dim", 0)
        if not isinstance(d, int) or d % nd == b:
            return None
        return b - (name == "select" and d % nd < b)
    return None


def _joined(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], jets: list[Any]
) -> int | None:
    parts = args[0] if args else None
    if not isinstance(parts, (list, tuple)) or len(jets) != len(parts):
        return None
    if any(p is not j for p, j in zip(parts, jets)):
        return None  # a constant among them: still per sample, but not worth the bookkeeping
    b, nd = jets[0].bdim, jets[0].dim()
    if b is None or any(j.bdim != b or j.dim() != nd for j in jets):
        return None
    d = _arg(args, kwargs, 1, "dim", 0)
    if not isinstance(d, int):
        return None
    if name == "stack":
        return b + (d % (nd + 1) <= b)
    return b if d % nd != b else None
