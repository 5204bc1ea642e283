"""Jets: tensors carrying Taylor coefficients through a user's function (the Taylor mode).

NOTE [taylor mode]: every tensor that depends on the inputs is replaced by a ``Jet`` holding one
stack ``[K, *shape]``: the value, its first derivatives along ``D`` directions (the one-hot input
directions, broadcast over the batch), then second-order coefficients — the trace
``Σ_a ∂²_a`` (``K = 2 + D``, the forward Laplacian), the diagonal ``∂²_a`` (``K = 1 + 2D``) or
every pair ``∂_a ∂_b, a ≤ b`` (``K = 1 + D + D(D+1)/2``, full second-order jets). Each torch
call that meets a Jet goes through ``Jet.__torch_function__``: a cheap rule when there is one
(``taylor_rules``: Linear, matmul, add, mul, views, reductions, elementwise activations), else
the general rule below — nested ``torch.func.jvp`` vmapped over the directions — so any
differentiable op works, mixed with the cheap ones in one pass (normalisation layers, whose
nested forward mode PyTorch gets wrong, are written out in elementary ops: ``taylor_decomp``).
With ``batch_dim``, the batch coupling is proven absent or checked (NOTE [taylor
check]); a Hessian diagonal may carry its second order in reverse instead (NOTE [taylor tape]).
Extra memory is O(K) per
activation: O(B·D) for a trace or a diagonal, never the ``D × D`` Hessian per sample (unless
asked for). Values are computed on plain tensors, so ``create_graph`` keeps the autograd graph of
parameters the function closes over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchjac._engine.core.func_call import forward_jvp

__all__ = ["Jet", "JetSpec", "TaylorFailed", "constant", "general_rule", "jets_in"]


class TaylorFailed(Exception):
    """The Taylor mode could not follow the function (see NOTE [taylor check]).

    ``quiet``: nothing for the user to know (e.g. a constant function): no ``FallbackWarning``.
    ``reverse``: torch's forward mode itself is wrong for an op of the function (NOTE
    [unreliable nested forward]): columns by ``jvp`` would be wrong too, rows are right.
    """

    def __init__(self, message: str, *, quiet: bool = False, reverse: bool = False) -> None:
        super().__init__(message)
        self.quiet = quiet
        self.reverse = reverse


@dataclass(frozen=True)
class JetSpec:
    """How the ``K`` coefficients of a stack are laid out (see NOTE [taylor mode]).

    Layout: ``[value, first-order (d), second-order (n_second)]``.
    """

    d: int  # number of second-order directions (the inputs' elements per sample)
    kind: str  # "first", "trace", "diag" or "full"
    left: Tensor | None  # "full": pair p is (left[p], right[p])
    right: Tensor | None
    grad: bool = False  # record the autograd graph of the coefficients (create_graph)
    tape: Any = None  # a Tape: second order in reverse (NOTE [taylor tape])

    @property
    def k(self) -> int:
        return 1 + self.d + self.n_second

    @property
    def n_second(self) -> int:
        if self.kind in ("first", "trace"):
            return 0 if self.kind == "first" else 1
        return self.d if self.kind == "diag" else len(self.left)  # type: ignore[arg-type]


class Jet(Tensor):
    """A tensor standing for ``stack[0]`` while carrying its Taylor coefficients ``stack``."""

    spec: JetSpec
    bdim: int | None  # where the batch dimension is, when a rule knows (NOTE [taylor tape])
    key: int | None  # its name on the tape (NOTE [taylor tape])
    linked: bool  # the op that made it is on the tape, if it needs to be
    wants: bool  # a second-order source lies at or before it
    seed: bool  # an input whose first order is the one-hot basis over its last dim
    aliased: bool  # a view, or viewed (see ``taylor_dispatch``)
    first: Tensor | None  # NOTE [lazy first order]: the unwritten ``stack[1 : 1 + d]``
    pending: Callable[[], Tensor] | None  # computes ``first`` when it is first read
    seen: int | None  # its version after the last torch call on it (NOTE [taylor check])
    _stack: Tensor

    @staticmethod
    def of(stack: Tensor, spec: JetSpec, bdim: int | None = None) -> Jet:
        jet = Tensor._make_subclass(Jet, stack[0].detach())
        jet.stack = stack
        jet.spec = spec
        jet.bdim = bdim
        jet.key = None
        jet.linked = False
        jet.wants = False
        jet.seed = False
        jet.aliased = False
        jet.seen = _version(jet)
        return jet

    @property
    def stack(self) -> Tensor:
        """``[K, *shape]``, see NOTE [taylor mode]."""
        self.first_rows()
        if self.first is not None:  # NOTE [lazy first order]: written on first use
            d, first = self.spec.d, self.first
            self.first = None
            if torch.is_grad_enabled() and (
                self._stack.requires_grad or first.requires_grad or self.spec.grad
            ):
                # out of place: an op may have saved a view of the value row for its backward,
                # also where only its other operand requires grad (``F.linear(x, w)`` saves
                # ``x`` for ``w``'s gradient with ``create_graph``)
                rest = first.expand(d, *self._stack.shape[1:])
                self._stack = torch.cat([self._stack[:1], rest, self._stack[1 + d :]])
            else:
                self._stack[1 : 1 + d] = first
        return self._stack

    @stack.setter
    def stack(self, value: Tensor) -> None:
        self._stack, self.first, self.pending = value, None, None

    def first_rows(self) -> Tensor:
        """``stack[1 : 1 + d]``, or the unwritten first order that broadcasts to it (NOTE
        [lazy first order]), computed now if it is pending."""
        if self.pending is not None:
            self.first, self.pending = self.pending(), None
        return self.first if self.first is not None else self._stack[1 : 1 + self.spec.d]

    def value_row(self) -> Tensor:
        """``stack[0]``, the value, without computing or writing a lazy first order (a copy
        where a broadcast write left it with repeated elements, so that it can be written)."""
        value = self._stack[0]
        if any(st == 0 and n > 1 for st, n in zip(value.stride(), value.shape)):
            return value.clone()
        return value

    def second_rows(self) -> Tensor:
        """``stack[1 + d :]``, without computing or writing a lazy first order."""
        return self._stack[1 + self.spec.d :]

    @staticmethod
    def lazy(stack: Tensor, first: Tensor, spec: JetSpec, bdim: int | None) -> Jet:
        """A Jet whose ``stack[1 : 1 + d]`` is left unwritten: it is ``first`` broadcast.

        NOTE [lazy first order]: a Linear layer right on the inputs has first derivatives that
        are columns of its weight, the same for every sample (``[d, 1, ..., out]``). Writing them
        out for the whole batch costs a pass over ``[d, B, out]`` and the next rule reads it
        again; an elementwise rule (``taylor_rules._unary``) multiplies ``first`` by ``φ'``
        directly instead, and any other reader of ``stack`` gets it written on first use. A
        narrow Linear layer (a scalar head) defers its product over the directions the same way
        (``Jet.deferred``): for a trace or a tape's diagonal, nothing reads it at the outputs.
        """
        jet = Jet.of(stack, spec, bdim)
        jet.first = first
        return jet

    @staticmethod
    def deferred(
        stack: Tensor, pending: Callable[[], Tensor], spec: JetSpec, bdim: int | None
    ) -> Jet:
        """A Jet whose first order is computed by ``pending()`` only if something reads it:
        the first order of a function's last Linear layer is not needed for a trace or a
        tape's diagonal (NOTE [lazy first order])."""
        jet = Jet.of(stack, spec, bdim)
        jet.pending = pending
        return jet

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if not _HOOKS:
            _load_hooks()
        if not torch.is_grad_enabled():  # NOTE [taylor check]: the pass runs with grad on
            # reverse: torch's forward mode differentiates through a no_grad block, which
            # reverse mode (and so the user's autograd) treats as a constant; jvp columns
            # would disagree with rows
            raise TaylorFailed(
                f"{getattr(func, '__name__', func)} ran with gradients disabled (inside a custom "
                "autograd.Function or a torch.no_grad() block)",
                reverse=True,
            )
        kwargs = kwargs or {}
        jets = jets_in(args, kwargs)
        for jet in jets:  # NOTE [taylor check]: a write the Taylor mode did not see
            if jet.seen != _version(jet):
                raise TaylorFailed(
                    f"{getattr(func, '__name__', func)} read a value written by an operation the "
                    "Taylor mode cannot see (TorchScript, or torch-function handling disabled)"
                )
        decomposition = _HOOKS["decompositions"].get(func)
        if decomposition is not None:
            return _seen(decomposition(*args, **kwargs), jets)
        dispatch = _HOOKS["dispatch"]
        with torch._C.DisableTorchFunctionSubclass():
            if jets[0].spec.grad:  # gradients are on here (checked above)
                return _seen(dispatch(func, tuple(args), dict(kwargs), jets), jets)
            torch._C._set_grad_enabled(False)
            try:
                return _seen(dispatch(func, tuple(args), dict(kwargs), jets), jets)
            finally:
                torch._C._set_grad_enabled(True)


def _version(t: Tensor) -> int | None:
    """``t._version`` (read as a plain tensor's), ``None`` for a tensor without one (an
    inference tensor)."""
    try:
        with torch._C.DisableTorchFunctionSubclass():
            return t._version
    except RuntimeError:
        return None


def _seen(out: Any, jets: list[Jet]) -> Any:
    """``out``, with the versions of ``jets`` and of the Jets in ``out`` taken as seen: the
    writes of the call just made are the Taylor mode's own."""
    for jet in (*jets, *(out if isinstance(out, (list, tuple)) else (out,))):
        if isinstance(jet, Jet):
            jet.seen = _version(jet)
    return out


# Filled on first use (they import this module): the decompositions and the dispatcher.
_HOOKS: dict[str, Any] = {}


def _load_hooks() -> None:
    from torchjac._engine.taylor.taylor_decomp import DECOMPOSITIONS
    from torchjac._engine.taylor.taylor_dispatch import dispatch

    _HOOKS.update(decompositions=DECOMPOSITIONS, dispatch=dispatch)


def jets_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Jet]:
    """The Jets among the arguments (one level of lists and tuples, else a full pytree walk)."""
    found: list[Jet] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, Jet):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(x for x in a if isinstance(x, Jet))
    if not found:
        found = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Jet)]
    return found


def constant(x: Tensor, spec: JetSpec) -> Tensor:
    """The stack of a tensor that does not depend on the inputs: zero derivatives."""
    rest = torch.zeros((), dtype=x.dtype, device=x.device).expand(spec.k - 1, *x.shape)
    return torch.cat([x.unsqueeze(0), rest])


def general_rule(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Any differentiable op by nested ``jvp`` vmapped over the directions (NOTE [taylor mode])."""
    flat, tree = tree_flatten((args, kwargs))
    pos = [i for i, a in enumerate(flat) if isinstance(a, Jet)]
    spec: JetSpec = flat[pos[0]].spec
    stacks = [flat[i].stack for i in pos]

    def call(*vs: Tensor) -> Any:
        leaves = list(flat)
        for i, v in zip(pos, vs):
            leaves[i] = v
        a, k = tree_unflatten(leaves, tree)
        return func(*a, **k)

    # NOTE: separate storage for values and coefficients; forward AD mixes up aliased
    # primals and tangents (slices of one stack).
    vals = tuple(s[0].clone() for s in stacks)
    out = call(*vals)
    out_leaves, out_tree = tree_flatten(out)
    # the op returned a view or its input itself (``positive``, ``conj``, ``broadcast_to``):
    # an in-place write into one must not be split from the other (see ``taylor_dispatch``)
    ptrs = {v.untyped_storage().data_ptr() for v in vals}
    shares = [isinstance(o, Tensor) and o.untyped_storage().data_ptr() in ptrs for o in out_leaves]
    if any(shares):
        for i in pos:
            flat[i].aliased = True
    live = [i for i, o in enumerate(out_leaves) if isinstance(o, Tensor) and o.is_floating_point()]
    if not live:
        return out

    def g(*vs: Tensor) -> tuple[Tensor, ...]:
        leaves = tree_flatten(call(*vs))[0]
        return tuple(leaves[i] for i in live)

    def push(primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return tuple(forward_jvp(g, primals, tangents)[1])

    def curve(t1: tuple[Tensor, ...], t2: tuple[Tensor, ...]) -> Any:
        return forward_jvp(push, (vals, t1), (t1, t2))

    d = spec.d
    d1 = tuple(s[1 : 1 + d].clone() for s in stacks)
    d2 = tuple(s[1 + d :].clone() for s in stacks)
    sources = None
    if spec.kind == "first" and spec.tape is not None:  # NOTE [taylor tape]
        first, sources = torch.vmap(curve)(d1, tuple(torch.zeros_like(x) for x in d1))
        second = tuple(f[:0] for f in first)
    elif spec.kind == "first":
        first = torch.vmap(lambda t: push(vals, t))(d1)
        second = tuple(f[:0] for f in first)
    elif spec.kind == "trace":
        first, second = torch.vmap(curve, in_dims=(0, None))(d1, tuple(x[0] / d for x in d2))
        second = tuple(s.sum(0, keepdim=True) for s in second)
    elif spec.kind == "diag":
        first, second = torch.vmap(curve)(d1, d2)
    else:
        assert spec.left is not None and spec.right is not None
        first = torch.vmap(lambda t: push(vals, t))(d1)
        left = tuple(x[spec.left] for x in d1)
        right = tuple(x[spec.right] for x in d1)
        second = torch.vmap(lambda a, b, h: forward_jvp(push, (vals, b), (a, h))[1])(
            left, right, d2
        )
    for n, i in enumerate(live):
        y = out_leaves[i]
        stack = torch.cat([y.unsqueeze(0), first[n].to(y.dtype), second[n].to(y.dtype)])
        out_leaves[i] = Jet.of(stack, spec)
        out_leaves[i].aliased = shares[i]
        if sources is not None:
            spec.tape.record(out_leaves[i], sources[n])
    return tree_unflatten(out_leaves, out_tree)
