"""Torch's operator database as functions of their differentiable inputs (NOTE [opinfo sweep]).

Each sample of an op becomes a ``Case``: a function of the sample's float64 tensors that require
grad (the other arguments fixed, through the op's ``gradcheck_wrapper`` and
``output_process_fn_grad`` as torch's own gradient tests call it), returning the op's floating
outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["BIG_D", "Case", "cases", "load_ops", "op_name"]

# an op without samples of at most ``max_d`` elements is swept on its smallest sample up to this
# size, without the full Hessian (its ``D(D+1)/2`` coefficients) beyond ``full_d`` elements
BIG_D = 130


def load_ops() -> list[Any]:
    """The float64, autograd-supporting OpInfos of torch's ``op_db`` (one import, seconds).

    The import changes torch's global state (it forbids setting ``torch.backends`` flags outside
    their context managers, and wraps TorchScript calls in a profiler); both are put back."""
    flags = torch.backends.flags_frozen.__globals__  # torch.backends' own namespace
    frozen = torch.backends.flags_frozen()
    calls = torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    finally:
        flags["__allow_nonbracketed_mutation_flag"] = not frozen
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = calls

    return [
        op for op in op_db if op.supports_autograd and torch.float64 in op.supported_dtypes("cpu")
    ]


@dataclass
class Case:
    """One sample of an op as a function of its differentiable tensors ``inputs``."""

    name: str
    func: Callable[..., tuple[Tensor, ...]]
    inputs: tuple[Tensor, ...]
    # why torch's own float64 gradient tests of the op are expected to fail, per order (1, 2)
    untested: dict[int, str] = field(default_factory=dict)


def cases(op: Any, max_d: int, max_samples: int, big_d: int = BIG_D) -> Iterator[Case]:
    """The op's ``max_samples`` smallest samples with at most ``max_d`` differentiable
    elements, in the op's order; else its smallest one with at most ``big_d``. The smallest
    sample is the same for any limits that admit it (ties: the op's order)."""
    found = []
    for n, sample in enumerate(_samples(op)):
        leaves, tree = tree_flatten((sample.input, sample.args, sample.kwargs))
        pos = [
            i
            for i, a in enumerate(leaves)
            if isinstance(a, Tensor) and a.dtype == torch.float64 and a.requires_grad
        ]
        if any(isinstance(a, Tensor) and a.layout != torch.strided for a in leaves):
            continue  # sparse or nested tensors: not the Taylor mode's business
        d = sum(leaves[i].numel() for i in pos)
        if pos and d <= max(big_d, max_d) and all(leaves[i].numel() for i in pos):
            found.append((d, n, sample, leaves, tree, pos))
    found.sort(key=lambda f: f[0])
    small = [f for f in found if f[0] <= max_d]
    found = sorted(small[:max_samples], key=lambda f: f[1]) if small else found[:1]
    for _, _, sample, leaves, tree, pos in found:
        fixed = [a.detach() if isinstance(a, Tensor) else a for a in leaves]

        def func(
            *xs: Tensor,
            fixed: list[Any] = fixed,
            pos: list[int] = pos,
            tree: Any = tree,
            process: Any = sample.output_process_fn_grad,
        ) -> tuple[Tensor, ...]:
            now = list(fixed)
            for i, x in zip(pos, xs):
                now[i] = x
            inp, args, kwargs = tree_unflatten(now, tree)
            # the wrapper gradcheck uses: e.g. a Hermitian or triangular input built from any
            out = process(op.gradcheck_wrapper(op.op, inp, *args, **kwargs))
            return tuple(o for o in tree_flatten(out)[0] if isinstance(o, Tensor))

        inputs = tuple(leaves[i].detach().clone() for i in pos)
        yield Case(op_name(op), _floats_only(func), inputs, _untested(op))


# torch's gradient tests, per order: an expected failure there means torch's own derivative of
# the op on its samples is not to be trusted (e.g. samples at a point of non-differentiability)
_GRAD_TESTS = {
    1: (("TestBwdGradients", "test_fn_grad"), ("TestFwdGradients", "test_forward_mode_AD")),
    2: (("TestBwdGradients", "test_fn_gradgrad"), ("TestFwdGradients", "test_fn_fwgrad_bwgrad")),
}


def _untested(op: Any) -> dict[int, str]:
    out = {}
    for order, tests in _GRAD_TESTS.items():
        for cls, test in tests:
            for dec in op.decorators:
                active = getattr(dec, "is_active", None)
                if active is None or getattr(dec, "test_name", None) != test:
                    continue
                if active(cls, test, "cpu", torch.float64, {}):
                    out.setdefault(order, f"torch expects {cls}.{test} to fail")
    return out


def _floats_only(func: Callable[..., tuple[Tensor, ...]]) -> Callable[..., tuple[Tensor, ...]]:
    """The op's floating outputs (indices, counts and masks dropped)."""

    def floats(*xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(o for o in func(*xs) if o.is_floating_point() or o.is_complex())

    return floats


def _samples(op: Any) -> list[Any]:
    """The op's samples, small ones where its sample function offers them (unary ufuncs)."""
    try:
        return list(
            op.sample_inputs("cpu", torch.float64, requires_grad=True, small_inputs_only=True)
        )
    except TypeError:
        return list(op.sample_inputs("cpu", torch.float64, requires_grad=True))


def op_name(op: Any) -> str:
    """``name.variant`` as OpInfo tests spell it."""
    return op.name if not op.variant_test_name else f"{op.name}.{op.variant_test_name}"
