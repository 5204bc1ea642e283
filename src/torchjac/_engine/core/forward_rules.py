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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["Lookup", "lookup_of", "reverse_conventions"]


class Lookup(NamedTuple):
    """A call of ``F.embedding`` or ``torch.embedding``, read: its indices, weight, padding row
    (``None``, or non-negative) and ``scale_grad_by_freq``; ``plain()`` runs it without either
    option (the same values)."""

    idx: Tensor
    weight: Tensor
    padding_idx: int | None
    by_freq: bool
    plain: Callable[[], Tensor]

    def adjusted(self, e: Tensor, counts: Tensor | None) -> Tensor:
        """``e = weight[idx]`` with the tangent of reverse mode's derivative (values unchanged):
        divided by ``counts[idx]`` (the index counts of the call) when given, zero at the
        padding row."""
        if counts is not None:
            e = e.detach() + (e - e.detach()) / counts.to(e.dtype)[self.idx].unsqueeze(-1)
        if self.padding_idx is not None:
            e = torch.where((self.idx == self.padding_idx).unsqueeze(-1), e.detach(), e)
        return e

    def counts(self) -> Tensor:
        """How often each row's index occurs in this call: ``[rows]``."""
        return torch.bincount(self.idx.reshape(-1), minlength=self.weight.shape[0])


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def lookup_of(func: Any, args: tuple, kwargs: dict) -> Lookup | None:
    """The embedding lookup ``func(*args, **kwargs)`` is, or ``None`` for any other call."""
    if func is F.embedding:
        idx, weight = _arg(args, kwargs, 0, "input", None), _arg(args, kwargs, 1, "weight", None)
        pad = _arg(args, kwargs, 2, "padding_idx", None)
        by_freq = bool(_arg(args, kwargs, 5, "scale_grad_by_freq", False))
        pad = pad + weight.shape[0] if pad is not None and pad < 0 else pad
        rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight")}
        rest.update(
            max_norm=_arg(args, kwargs, 3, "max_norm", None),
            norm_type=_arg(args, kwargs, 4, "norm_type", 2.0),
            sparse=_arg(args, kwargs, 6, "sparse", False),
            padding_idx=None,
            scale_grad_by_freq=False,
        )
        return Lookup(idx, weight, pad, by_freq, lambda: func(idx, weight, **rest))
    if func is torch.embedding:
        weight, idx = _arg(args, kwargs, 0, "weight", None), _arg(args, kwargs, 1, "indices", None)
        pad = int(_arg(args, kwargs, 2, "padding_idx", -1))  # negative: no padding row
        by_freq = bool(_arg(args, kwargs, 3, "scale_grad_by_freq", False))
        sparse = bool(_arg(args, kwargs, 4, "sparse", False))
        return Lookup(
            idx, weight, pad if pad >= 0 else None, by_freq,
            lambda: func(weight, idx, -1, False, sparse),
        )  # fmt: skip
    return None


class _ReverseConventions(TorchFunctionMode):
    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        lookup = lookup_of(func, args, kwargs)
        if lookup is not None:
            if lookup.padding_idx is None and not lookup.by_freq:
                return func(*args, **kwargs)
            return lookup.adjusted(lookup.plain(), lookup.counts() if lookup.by_freq else None)
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
