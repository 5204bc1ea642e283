"""Dispatching torch calls on Jets: in-place ops, item assignment, rules, the general rule.

In-place ops are computed out of place and the Jet's stack is replaced (NOTE [taylor mode]).
Views of a Jet are copies here, so a write into a Jet that has views, or into a view, would not
reach the others: such a write stops the Taylor mode (``TaylorFailed``, nested AD takes over).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchjac._engine.taylor.taylor import Jet, TaylorFailed, constant, general_rule, jets_in
from torchjac._engine.taylor.taylor_batch import POINTWISE, agreed_bdim
from torchjac._engine.taylor.taylor_rules import RULES, promote
from torchjac._engine.taylor.taylor_tape import NeedForward, link_generic

__all__ = ["dispatch"]

# Torch calls whose result is a view of their input (see the module docstring).
_VIEWS = frozenset(
    [
        *("view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose"),
        *("swapaxes", "swapdims", "permute", "squeeze", "unsqueeze", "narrow", "select"),
        *("expand", "expand_as", "movedim", "moveaxis", "__getitem__", "t", "split", "chunk"),
        *("unbind", "diagonal", "unfold", "as_strided", "tensor_split", "hsplit", "vsplit"),
        # the tensor itself when nothing changes (contiguous, same dtype), or a property view
        *("contiguous", "to", "double", "float", "half", "bfloat16", "type", "type_as"),
        *("ravel", "view_as_real", "view_as_complex", "__get__", "detach", "alias"),
    ]
)
# In-place ops that change no value: nothing to propagate
_NO_VALUE_CHANGE = frozenset(["requires_grad_", "retain_grad_", "share_memory_", "detach_"])


# NOTE [unreliable nested forward]: torch's forward-over-forward AD gives wrong second derivatives
# for determinants and solves (measured on torch 2.13 against jacrev(jacrev): det, logdet, slogdet
# and linalg.solve are off by O(1); inv, cholesky, eigh, svdvals, qr, lstsq, lu_solve, pinv,
# matrix_exp, solve_triangular and the norms agree), so the general rule must not meet them: they
# stop the Taylor mode and nested AD (forward over reverse, which is right) takes over. The sweep
# of torch's operator database (benchmarks/opinfo_sweep.py, table in OPINFO.md) found more, each
# against jacrev(jacrev) and a closed form: wrong second order for tensorsolve, householder_product
# (orgqr) and the native batch norms (the functional batch norm is written out, ``taylor_decomp``);
# a wrong first order already for cholesky_inverse, scatter_reduce(reduce="prod") and the chunked
# linear_cross_entropy (``options=``: no forward mode, yet no error either).
_UNRELIABLE = frozenset(
    [
        *(pre + name for pre in ("", "linalg_") for name in ("det", "logdet", "slogdet")),
        *("solve", "solve_ex", "linalg_solve", "linalg_solve_ex", "linalg_tensorsolve"),
        *("householder_product", "linalg_householder_product", "orgqr"),
        *("native_batch_norm", "_native_batch_norm_legit", "_batch_norm_with_update"),
        "_native_batch_norm_legit_no_training",
    ]
)


def _check_reliable(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Stop the Taylor mode where NOTE [unreliable nested forward] rules the call out."""
    if name in _UNRELIABLE:
        raise TaylorFailed(f"torch's nested forward mode is unreliable for {name}")
    wrong = name == "cholesky_inverse"
    if name in ("scatter_reduce", "scatter_reduce_"):
        wrong = (args[4] if len(args) > 4 else kwargs.get("reduce")) == "prod"
    if name == "linear_cross_entropy":
        wrong = kwargs.get("options") is not None
    if wrong:  # already the first order: columns by jvp are wrong too, rows are right
        raise TaylorFailed(f"torch's forward mode is wrong for {name}", reverse=True)


def dispatch(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], jets: list[Jet] | None = None
) -> Any:
    """Apply ``func`` to arguments containing Jets (``jets``, when known; NOTE [taylor mode])."""
    name = _op_name(func)
    if torch._C._functorch.maybe_current_level() is not None:
        # func runs its own torch.func transform (vmap, grad, jvp) on a Jet: the transform's
        # wrappers hide the Jet's coefficients, so the result would silently lose them.
        raise TaylorFailed(f"func applies a torch.func transform ({name})")
    _check_reliable(name, args, kwargs)  # NOTE [unreliable nested forward]
    if name == "__setitem__":
        return _setitem(args)
    inplace = name.endswith("_") and not name.endswith("__")
    if inplace and not args and "input" in kwargs:  # the target by keyword: torch.sin_(input=y)
        args = (kwargs.pop("input"),)
    if inplace and args and isinstance(args[0], Jet):
        if name != "requires_grad_":
            _check_not_aliased(args[0])
        return _inplace(func, name, args, kwargs)
    detached = name == "detach" or getattr(func, "__self__", None) is Tensor.data  # .data too
    if detached and len(args) == 1 and not kwargs and isinstance(args[0], Jet):
        # A detached value is a constant, and a constant is a plain tensor here (a Jet would
        # escape into what the function keeps, an attribute or a hook's list, and outlive the
        # call); it shares the value's storage, as ``detach`` does, so a write into the Jet
        # after it stops the Taylor mode (``_check_not_aliased``).
        args[0].aliased = True
        return args[0].value_row().detach()
    if name == "__iter__" and isinstance(args[0], Jet):
        return iter(dispatch(Tensor.unbind, args, {}))
    if kwargs.get("inplace") is True and args and isinstance(args[0], Jet):
        _check_not_aliased(args[0])
        kwargs["inplace"] = False
        return _assign(args[0], dispatch(func, args, kwargs))
    rule = RULES.get(func)
    out = rule(args, dict(kwargs)) if rule is not None else None
    if jets is None:
        jets = jets_in(args, kwargs)
    if out is None:
        out = general_rule(func, args, kwargs)
        if func in POINTWISE and isinstance(out, Jet):  # NOTE [batch proof]
            out.bdim = agreed_bdim(jets, out.dim())
            if out.spec.tape is not None:
                out.spec.tape.found_bdim(out)
    if jets and jets[0].spec.tape is not None:
        link_generic(func, args, kwargs, jets, out)  # NOTE [taylor tape]
    outs = out if isinstance(out, (list, tuple)) else (out,)
    if name in _VIEWS and any(isinstance(y, Tensor) for y in outs):  # not .shape's __get__
        for x in [*jets, *(y for y in outs if isinstance(y, Jet))]:
            x.aliased = True
    return out


def _op_name(func: Any) -> str:
    """``func``'s name; a ``torch.ops`` overload's is its packet's (``aten.mul_.Tensor`` is
    ``mul_``), so it writes in place, or makes a view, as the op it names does."""
    packet = getattr(func, "overloadpacket", None)
    return getattr(func if packet is None else packet, "__name__", "")


def _check_not_aliased(jet: Jet) -> None:
    if jet.aliased:
        raise TaylorFailed("an in-place write into a tensor that shares memory with a view")


def _assign(jet: Jet, new: Any) -> Jet:
    if jet.spec.tape is not None:  # tape entries hold this Jet: its value must not change
        raise NeedForward
    stack = new.stack if isinstance(new, Jet) else constant(new, jet.spec)
    target = jet.stack.shape
    jet.stack = _as_value(stack, len(target)).expand(target).to(jet.stack.dtype)
    jet.seed = False  # its first order is no longer the one-hot basis
    # NOTE [batch proof]: the batch of what was written, if it kept the same layout
    jet.bdim = new.bdim if isinstance(new, Jet) and new.dim() == jet.dim() else None
    return jet


def _as_value(stack: Tensor, dims: int) -> Tensor:
    """A source's stack ``[K, *shape]`` with ones after ``K`` up to ``dims`` dimensions, so
    that it broadcasts into a target as its value does: its dimensions align with the target's
    last ones, never with the coefficients' (a 0-d source's ``[K]`` against ``[K, ..., n]`` was
    taken for ``n`` values when ``n == K``)."""
    lead = dims - stack.dim()
    return stack if lead <= 0 else stack.reshape(stack.shape[0], *([1] * lead), *stack.shape[1:])


def _inplace(func: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    jet = args[0]
    if name == "copy_":  # the source, broadcast to the target's shape
        return _assign(jet, args[1] if isinstance(args[1], Jet) else torch.as_tensor(args[1]))
    if name == "zero_":
        return _assign(jet, torch.zeros_like(jet.stack[0]))
    owner = torch if getattr(torch, name, None) is func else Tensor
    outplace = getattr(owner, name[:-1], None)
    if name in _NO_VALUE_CHANGE:
        func(jet.stack[0], *args[1:], **kwargs)
        return jet
    if outplace is None:
        raise TaylorFailed(f"no rule for the in-place {name}")
    return _assign(jet, dispatch(outplace, args, kwargs))


def _setitem(args: tuple[Any, ...]) -> Any:
    target, index, value = args
    if not isinstance(target, Jet):
        raise TaylorFailed("item assignment of a derivative-carrying value into a plain tensor")
    if target.spec.tape is not None:
        raise NeedForward
    _check_not_aliased(target)
    stack = target.stack.clone()
    full = (slice(None), *(index if isinstance(index, tuple) else (index,)))
    if isinstance(value, Jet):  # broadcast as the value does (see ``_as_value``)
        stack[full] = _as_value(promote(value, target.spec), stack[full].dim())
    else:
        stack[full] = 0
    if not isinstance(value, Jet):
        stack[0][index] = value
    else:  # NOTE [batch proof]: a derivative-carrying value from anywhere: no longer proven
        target.bdim = None
    target.stack = stack
    target.seed = False
    return None
