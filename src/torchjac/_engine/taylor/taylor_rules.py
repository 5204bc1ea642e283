"""Cheap Taylor-mode rules for the common ops; everything else takes the general rule.

Rules see plain tensors only (``Jet.__torch_function__`` disables the subclass) and return Jets
whose stacks follow NOTE [taylor mode], with the batch dimension when they keep it (NOTE [taylor
tape]). A rule returns ``None`` to hand over to the general rule (``taylor_dispatch``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten

from torchjac._engine.core.lean_vmap import vmap_first
from torchjac._engine.kernel import kernels
from torchjac._engine.taylor.taylor import Jet, JetSpec, constant
from torchjac._engine.taylor.taylor_activations import ACTIVATIONS
from torchjac._engine.taylor.taylor_batch import agreed_bdim, broadcast_bdim, structural_bdim
from torchjac._engine.taylor.taylor_tape import link, record, reduce_to

__all__ = ["RULES", "promote"]

Rule = Callable[[tuple[Any, ...], dict[str, Any]], Any]


def _lift(stack: Tensor, ndim: int) -> Tensor:
    """``[K, *s]`` -> ``[K, 1, ..., 1, *s]`` with ``ndim`` dims after ``K`` (for broadcasting)."""
    extra = ndim - (stack.dim() - 1)
    return stack.reshape(stack.shape[0], *([1] * extra), *stack.shape[1:]) if extra > 0 else stack


def _second(spec: JetSpec, fa: Tensor, fb: Tensor) -> Tensor:
    """The second-order coefficients of a product of first-order parts ``fa``, ``fb``."""
    if spec.kind == "trace":
        return _sum_of_squares(fa) if fa is fb and len(fa) else (fa * fb).sum(0, keepdim=True)
    if spec.kind == "diag":
        return fa * fb
    assert spec.left is not None and spec.right is not None
    return fa.index_select(0, spec.left) * fb.index_select(0, spec.right)


def _sum_of_squares(d1: Tensor) -> Tensor:
    """``(d1 * d1).sum(0, keepdim=True)`` one direction at a time: no ``d1``-sized temporary,
    whose fresh pages cost more than the products themselves."""
    acc = d1[0] * d1[0]
    for row in d1[1:]:
        acc.addcmul_(row, row)
    return acc.unsqueeze(0)


def _unary(x: Jet, y: Tensor, dy: Tensor, ddy: Tensor | None) -> Jet:
    """``φ(x)`` from ``y = φ(v)``, ``φ'(v)`` and ``φ''(v)`` (``None`` when zero)."""
    spec = x.spec
    d = spec.d
    if torch.is_grad_enabled() and (x.stack.requires_grad or dy.requires_grad):
        s = x.stack
        d1 = s[1 : 1 + d]
        rest = dy * s[1:]
        if ddy is not None and spec.n_second > 0:
            rest[d:] += ddy * _second(spec, d1, d1)
        out = torch.cat([y.unsqueeze(0), rest])
    else:  # no graph to keep: write into one buffer, no concatenation (NOTE [taylor mode])
        # NOTE [lazy first order]: a broadcast first order is read as it is, never written out
        s, d1 = x._stack, x.first_rows()
        out = torch.empty_like(s)
        out[0] = y
        torch.mul(d1, dy, out=out[1 : 1 + d])
        torch.mul(s[1 + d :], dy, out=out[1 + d :])
        if ddy is not None and spec.n_second > 0 and spec.kind == "diag":
            out[1 + d :].addcmul_(d1 * d1, ddy)
        elif ddy is not None and spec.n_second > 0:
            out[1 + d :].addcmul_(_second(spec, d1, d1), ddy)
    jet = Jet.of(out, spec, x.bdim)
    if spec.tape is not None and ddy is not None:  # NOTE [taylor tape]
        sq = d1 * d1
        if sq.shape[1:] == ddy.shape:  # scaled first, as written: g·φ'' alone may overflow
            record(jet, sq.mul_(ddy))
        else:  # the broadcast first order: kept small, the scale goes onto g (NOTE [taylor tape])
            record(jet, sq, ddy)
    link(jet, (x,), lambda g: (g * dy,))
    return jet


def _unary_rule(name: str) -> Rule:
    def rule(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwargs.pop("inplace", None)
        if not args or not isinstance(args[0], Jet):
            return None
        # the value row: always written, so a lazy first order stays unwritten (_unary)
        parts = ACTIVATIONS[name](args[0]._stack[0], *args[1:], **kwargs)
        return None if parts is None else _unary(args[0], *parts)

    return rule


def promote(a: Any, spec: JetSpec) -> Tensor:
    """The stack of a Jet, or of a constant (zero derivatives)."""
    return a.stack if isinstance(a, Jet) else constant(torch.as_tensor(a), spec)


def _add(sign: float, swap: bool = False) -> Rule:
    def rule(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) != 2 or kwargs:
            return None
        a, b = (args[1], args[0]) if swap else args
        if isinstance(a, Jet) and isinstance(b, Jet):
            nd = max(a.dim(), b.dim())
            stack = _lift(a.stack, nd) + sign * _lift(b.stack, nd)
            out = Jet.of(stack, a.spec, agreed_bdim([a, b], nd))
            sa, sb = a.shape, b.shape  # shapes, not Jets: a node keeps no stack alive
            link(out, (a, b), lambda g: (reduce_to(g, sa), reduce_to(sign * g, sb)))
            return out
        jet = a if isinstance(a, Jet) else b
        va = a.stack[0] if isinstance(a, Jet) else a
        vb = b.stack[0] if isinstance(b, Jet) else b
        value = torch.as_tensor(va + sign * vb)
        rest = -jet.stack[1:] if jet is b and sign < 0 else jet.stack[1:]
        rest = _lift(rest, value.dim()).expand(rest.shape[0], *value.shape)
        out = Jet.of(
            torch.cat([value.unsqueeze(0), rest]), jet.spec, broadcast_bdim(jet, value.dim())
        )
        flip, shape = -1.0 if jet is b and sign < 0 else 1.0, jet.shape
        link(out, (jet,), lambda g: (reduce_to(flip * g, shape),))
        return out

    return rule


def _mul(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) != 2 or kwargs:
        return None
    a, b = args
    if not isinstance(a, Jet):
        a, b = b, a
    if not isinstance(b, Jet):
        c = torch.as_tensor(b, dtype=a.dtype, device=a.device)
        nd = max(a.dim(), c.dim())
        out = Jet.of(_lift(a.stack, nd) * c, a.spec, broadcast_bdim(a, nd))
        shape = a.shape
        link(out, (a,), lambda g: (reduce_to(g * c, shape),), (c,))
        return out
    spec, d = a.spec, a.spec.d
    nd = max(a.dim(), b.dim())
    sa, sb = _lift(a.stack, nd), _lift(b.stack, nd)
    va, vb = sa[0], sb[0]
    rest = va * sb[1:] + sa[1:] * vb
    if not spec.n_second:
        out = Jet.of(torch.cat([(va * vb).unsqueeze(0), rest]), spec, agreed_bdim([a, b], nd))
        if spec.tape is not None:  # NOTE [taylor tape]
            record(out, 2 * sa[1 : 1 + d] * sb[1 : 1 + d])
            ca, cb, ua, ub = a.shape, b.shape, va.clone(), vb.clone()  # not views of stacks
            link(out, (a, b), lambda g: (reduce_to(g * ub, ca), reduce_to(g * ua, cb)))
        return out
    rest[d:] += (
        2 * _second(spec, sa[1 : 1 + d], sb[1 : 1 + d])
        if spec.kind != "full"
        else (
            _second(spec, sa[1 : 1 + d], sb[1 : 1 + d])
            + _second(spec, sb[1 : 1 + d], sa[1 : 1 + d])
        )
    )
    return Jet.of(torch.cat([(va * vb).unsqueeze(0), rest]), spec, agreed_bdim([a, b], nd))


def _div(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) != 2 or kwargs or isinstance(args[1], Jet):
        return None
    a, c = args[0], torch.as_tensor(args[1], dtype=args[0].dtype, device=args[0].device)
    nd = max(a.dim(), c.dim())
    out = Jet.of(_lift(a.stack, nd) / c, a.spec, broadcast_bdim(a, nd))
    shape = a.shape
    link(out, (a,), lambda g: (reduce_to(g / c, shape),), (c,))
    return out


def _linear(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, w, b = (*args, *([None] * (3 - len(args))))[:3]
    w, b = kwargs.pop("weight", w), kwargs.pop("bias", b)
    if kwargs or not isinstance(x, Jet) or isinstance(w, Jet) or isinstance(b, Jet):
        return None
    if not isinstance(w, Tensor) or w.dim() != 2:  # a 1-d weight drops a dimension: general rule
        return None
    bdim = x.bdim if x.bdim is not None and x.bdim < x.dim() - 1 else None
    if x.seed:
        stack, first = _linear_seed(x, w, b)
        out = Jet.lazy(stack, first, x.spec, bdim)
    elif _defer(x, w):
        out = _linear_deferred(x, w, b, bdim)
    else:
        z = kernels.linear(x.stack, w)  # NOTE [dense kernels]
        if b is not None:
            z[0] += b
        out = Jet.of(z, x.spec, bdim)
    link(out, (x,), lambda g: (kernels.linear(g, w.t().contiguous()),), (w,))
    return out


def _linear_seed(x: Jet, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
    """A Linear layer right on a seed input: its one-hot directions give columns of ``w``
    broadcast over the batch (returned apart, NOTE [lazy first order]), its second order is
    zero; no product over the directions."""
    spec, v = x.spec, x._stack[0]  # the value alone: the first order stays unwritten
    d = spec.d
    out = v.new_empty(spec.k, *v.shape[:-1], w.shape[0])
    out[0] = kernels.linear(v, w, b)
    # a contiguous copy: the caller may change w in place before the next rule reads it, and
    # a transposed view (``clone`` keeps strides) makes every product with it a strided loop
    first = w.t().reshape(d, *([1] * (v.dim() - 1)), w.shape[0])
    first = first.clone(memory_format=torch.contiguous_format)
    out[1 + d :] = 0
    return out, first


def _defer(x: Jet, w: Tensor) -> bool:
    """Whether a Linear layer's first order waits until it is read (``_linear_deferred``): for
    second order that does not need it at the outputs (a trace, a tape's diagonal), and for a
    narrow layer, such as a scalar head: its product is a matrix-vector one, as cheap in two
    parts as in one, while splitting a wide one costs more than a last layer's product saves."""
    spec = x.spec
    narrow = w.shape[0] < kernels.MIN_SIDE
    return narrow and (spec.kind == "trace" or spec.tape is not None) and not spec.grad


def _linear_deferred(x: Jet, w: Tensor, b: Tensor | None, bdim: int | None) -> Jet:
    """A Linear layer whose first order is computed when read (NOTE [lazy first order]): the
    value and the trace now, the product over the ``d`` directions only if a later op needs
    it (it is most of the work, and a function's last layer often has no later op)."""
    d, src = x.spec.d, x._stack
    known = kernels.linear(src[:: 1 + d], w)  # the value row and the trace row, if any
    out = known.new_empty(x.spec.k, *known.shape[1:])
    out[:: 1 + d] = known
    if b is not None:
        out[0] += b
    # the weight as it is now: the function may write it (even through ``.data``) before the
    # product is read; a narrow one is cheap to copy
    tangents, weight = x.first_rows(), w.detach().clone()

    def pending() -> Tensor:
        return kernels.linear(tangents, weight)

    return Jet.deferred(out, pending, x.spec, bdim)


def _matmul(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if len(args) != 2 or kwargs:
        return None
    a, b = args
    if isinstance(a, Jet) and not isinstance(b, Jet) and a.dim() >= 2 and b.dim() <= 2:
        keep = a.bdim is not None and a.bdim < a.dim() - 1 and b.dim() == 2
        stack = kernels.linear(a.stack, b.t()) if b.dim() == 2 else a.stack @ b
        out = Jet.of(stack, a.spec, a.bdim if keep else None)
        if b.dim() == 2:
            link(out, (a,), lambda g: (kernels.linear(g, b),), (b,))
        return out
    if isinstance(b, Jet) and not isinstance(a, Jet) and b.dim() >= 2 and a.dim() <= 2:
        keep = b.bdim is not None and b.bdim < b.dim() - 2
        out = Jet.of(a @ b.stack, b.spec, b.bdim if keep else None)
        if a.dim() == 2:
            link(out, (b,), lambda g: (a.t() @ g,), (a,))
        return out
    return None


def _linear_map(func: Any) -> Rule:
    """Ops linear in their tensor arguments: every coefficient maps the same way (vmap over K,
    NOTE [lean vmap])."""

    def rule(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        leaves, _ = tree_flatten((args, kwargs))
        jets = [x for x in leaves if isinstance(x, Jet)]
        if any(isinstance(x, Tensor) and not isinstance(x, Jet) for x in leaves):
            return None  # e.g. a tensor index or a constant operand: the general rule
        if any(isinstance(x, Tensor) for x in tree_flatten(kwargs)[0]):
            return None  # a tensor by keyword: ``_swap`` replaces positional ones only
        spec = jets[0].spec
        out = vmap_first(lambda *ss: func(*_swap(args, ss), **kwargs))(*(j.stack for j in jets))
        value = out[0] if isinstance(out, Tensor) else out  # shapes for NOTE [batch proof]
        bdim = structural_bdim(func.__name__, args, kwargs, jets, value)
        if not isinstance(out, Tensor):
            return type(out)(Jet.of(o, spec, bdim) for o in out)
        return Jet.of(out, spec, bdim)

    return rule


def _swap(args: tuple[Any, ...], stacks: tuple[Tensor, ...]) -> tuple[Any, ...]:
    it = iter(stacks)

    def one(a: Any) -> Any:
        if isinstance(a, Jet):
            return next(it)
        if isinstance(a, (list, tuple)):
            return type(a)(one(x) for x in a)
        return a

    return tuple(one(a) for a in args)


RULES: dict[Any, Rule] = {}
for _name in ACTIVATIONS:
    for _ns in (torch, Tensor, F, torch.special):
        _f = getattr(_ns, _name, None)
        if _f is not None:
            RULES[_f] = _unary_rule(_name)
for _f in (torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__):
    RULES[_f] = _add(1.0)
for _f in (torch.sub, Tensor.sub, Tensor.__sub__):
    RULES[_f] = _add(-1.0)
RULES[Tensor.__rsub__] = _add(-1.0, swap=True)
for _f in (torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__):
    RULES[_f] = _mul
for _f in (torch.div, Tensor.div, Tensor.__truediv__):
    RULES[_f] = _div
RULES[F.linear] = _linear
for _f in (torch.matmul, Tensor.matmul, Tensor.__matmul__):
    RULES[_f] = _matmul


def _metadata(func: Any) -> Rule:
    """Shape and dtype queries: the Jet's own value answers them."""

    def rule(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return func(*args, **kwargs)

    return rule


for _f in (Tensor.is_floating_point, Tensor.is_complex, Tensor.dim, Tensor.size, Tensor.numel):
    RULES[_f] = _metadata(_f)
for _name in ("shape", "dtype", "device", "ndim", "layout", "is_cuda"):  # property getters
    RULES[getattr(Tensor, _name).__get__] = _metadata(getattr(Tensor, _name).__get__)
_LINEAR = ["sum", "mean", "reshape", "view", "flatten", "transpose", "permute", "squeeze"]
_LINEAR += ["unsqueeze", "narrow", "select", "expand", "movedim", "neg", "cat", "stack"]
_LINEAR += ["__getitem__", "__neg__", "t", "contiguous", "clone", "split", "chunk", "unbind"]
for _name in _LINEAR:
    for _ns in (torch, Tensor):
        _f = getattr(_ns, _name, None)
        if _f is not None:
            RULES[_f] = _linear_map(_f)
