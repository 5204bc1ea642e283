"""Forward mode with the derivatives reverse mode defines: embeddings.

NOTE [embedding forward rules]: torch defines the derivative of ``F.embedding`` with respect to
its weight by its backward: zero for the row at ``padding_idx``, and each row's gradient divided
by the number of times its index occurs in the call with ``scale_grad_by_freq=True``. Forward AD
(``torch.func.jvp``) knows neither: the weight's tangent is looked up like the weight, so
``jacfwd`` and ``jacrev`` disagree, and so would ``J @ v`` and ``J.to_dense() @ v`` or
``mode="fwd"`` and ``mode="rev"``. Every forward-mode product of the engine runs the user's
function under ``reverse_conventions``, which rewrites such a lookup ``e`` (same values) so its
tangent is reverse mode's: ``where(idx == padding_idx, e.detach(), e)`` and ``e.detach() +
(e - e.detach()) / count[idx]``. Lookups without either option run untouched. The same pass
gives ``group_norm`` a channels-last input contiguous (same values): torch 2.13's forward AD of
it fails there (``view size is not compatible with input tensor's size and stride``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["reverse_conventions"]


def _adjusted(e: Tensor, idx: Tensor, rows: int, padding_idx: int | None, by_freq: bool) -> Tensor:
    """``e = weight[idx]`` with the tangent of reverse mode's derivative (values unchanged)."""
    if by_freq:
        counts = torch.bincount(idx.reshape(-1), minlength=rows).to(e.dtype)
        e = e.detach() + (e - e.detach()) / counts[idx].unsqueeze(-1)
    if padding_idx is not None:
        e = torch.where((idx == padding_idx).unsqueeze(-1), e.detach(), e)
    return e


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


class _ReverseConventions(TorchFunctionMode):
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.embedding:
            idx, weight = (
                _arg(args, kwargs, 0, "input", None),
                _arg(args, kwargs, 1, "weight", None),
            )
            pad = _arg(args, kwargs, 2, "padding_idx", None)
            by_freq = bool(_arg(args, kwargs, 5, "scale_grad_by_freq", False))
            if pad is None and not by_freq:
                return func(*args, **kwargs)
            rows = weight.shape[0]
            pad = pad + rows if pad is not None and pad < 0 else pad
            plain = dict(zip(("padding_idx", "scale_grad_by_freq"), (None, False)))
            rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight")}
            rest.update(
                max_norm=_arg(args, kwargs, 3, "max_norm", None),
                norm_type=_arg(args, kwargs, 4, "norm_type", 2.0),
                sparse=_arg(args, kwargs, 6, "sparse", False),
                **plain,
            )
            e = func(idx, weight, **rest)
            return _adjusted(e, idx, rows, pad, by_freq)
        if func is torch.embedding:
            weight, idx = (
                _arg(args, kwargs, 0, "weight", None),
                _arg(args, kwargs, 1, "indices", None),
            )
            pad = int(_arg(args, kwargs, 2, "padding_idx", -1))
            by_freq = bool(_arg(args, kwargs, 3, "scale_grad_by_freq", False))
            if pad < 0 and not by_freq:  # torch.embedding: a negative padding_idx means none
                return func(*args, **kwargs)
            e = func(weight, idx, -1, False, bool(_arg(args, kwargs, 4, "sparse", False)))
            return _adjusted(e, idx, weight.shape[0], pad if pad >= 0 else None, by_freq)
        if func in _INDEX_FILLS and isinstance(_arg(args, kwargs, 3, "value", None), Tensor):
            return _index_fill(func, args, kwargs)  # NOTE [index_fill under vmap]
        if func is F.group_norm:
            x = _arg(args, kwargs, 0, "input", None)
            if isinstance(x, Tensor) and not x.is_contiguous():  # NOTE [group norm layout]
                rest = {k: v for k, v in kwargs.items() if k != "input"}
                return func(x.contiguous(), *args[1:], **rest)
        return func(*args, **kwargs)


# NOTE [index_fill under vmap]: torch's vmapped forward derivative of ``index_fill`` with a tensor
# ``value`` drops that value's tangent (torch 2.13: ``jacfwd`` of ``zeros(4).index_fill(0, idx,
# x[0])`` is 0 where it is 1; one ``jvp`` at a time is right), and every forward product of the
# engine is vmapped over its directions (the Taylor mode's general rule, columns, a sparse
# Jacobian's compressed probes): ``jacobian(mode="fwd")`` and ``"auto"`` were off by 2.0. Under
# ``reverse_conventions`` the fill is the same selection written as ``where`` over a mask of the
# filled positions, whose derivative batches right.
_INDEX_FILLS = (torch.index_fill, Tensor.index_fill, Tensor.index_fill_)


def _index_fill(func: Any, args: tuple, kwargs: dict) -> Tensor:
    x = _arg(args, kwargs, 0, "input", None) if func is torch.index_fill else args[0]
    dim, index, value = (
        _arg(args, kwargs, i, n, None) for i, n in ((1, "dim"), (2, "index"), (3, "value"))
    )
    dim = dim % x.dim() if x.dim() else 0
    mask = torch.zeros(x.shape[dim] if x.dim() else 1, dtype=torch.bool, device=x.device)
    mask[index] = True
    shape = [1] * x.dim()
    if shape:
        shape[dim] = -1
    filled = torch.where(mask.view(shape), value.to(x.dtype), x)
    return x.copy_(filled) if func is Tensor.index_fill_ else filled


def reverse_conventions(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` run under the forward rules of NOTE [embedding forward rules]."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with _ReverseConventions():
            return func(*args, **kwargs)

    return run
