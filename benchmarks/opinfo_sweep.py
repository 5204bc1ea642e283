"""The Taylor mode swept over torch's own operator database, against nested ``torch.func``.

NOTE [opinfo sweep]: ``torch.testing._internal.common_methods_invocations.op_db`` lists every
operator torch tests, with sample inputs. Each float64 op that supports autograd is called on
its small samples as a function of the sample's differentiable tensors (the other arguments
fixed; the op's floating outputs concatenated as rows) and pushed through one pass of the
Taylor mode (``taylor_run.taylor``, the engine behind ``jacobian``, ``hessian``,
``hessian_diagonal`` and ``laplacian``) for each kind: ``first`` (Jacobian columns), ``trace``
(Laplacian), ``diag`` (Hessian diagonal carried forward), ``tape`` (the diagonal with second
order in reverse, NOTE [taylor tape], as ``hessian_diagonal`` runs it) and ``full`` (Hessian).
Each result is compared with ``torch.func`` in float64 (``jacrev``; ``jacrev(jacrev)``, then
``jacfwd(jacrev)`` where that fails) and classified:

- ``rule``: exact, every call on a Jet served by a cheap rule or a decomposition;
- ``general``: exact, at least one call through the general rule (nested ``jvp``);
- ``fallback``: the Taylor mode declined (``TaylorFailed``; the user's call takes nested AD);
- ``wrong``: a result that differs from the oracle (``rtol=1e-7``, ``atol=1e-9`` times the
  oracle's largest entry, at least 1) — a defect;
- ``error``: any other exception — a defect;
- ``oracle``: ``torch.func`` itself fails on the sample: nothing to compare with.

An op's cell is the worst class over its samples. ``benchmarks/opinfo_coverage.py`` writes the
table (``benchmarks/OPINFO.md``); ``tests/test_taylor_opinfo.py`` runs a quick sweep in CI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchjac._engine import taylor_dispatch
from torchjac._engine.func_call import FuncProblem
from torchjac._engine.taylor_run import NeedForward, TaylorFailed, taylor

__all__ = ["KINDS", "Case", "Outcome", "cases", "load_ops", "run_case", "sweep"]

KINDS = ("first", "trace", "diag", "tape", "full")
# worst first: an op's class over its samples is the first of these any sample gets
ORDER = ("error", "wrong", "fallback", "general", "rule", "oracle", "skipped")
RTOL, ATOL = 1e-7, 1e-9
# an op without samples of at most ``max_d`` elements is swept on its smallest sample up to this
# size, without the full Hessian (its ``D(D+1)/2`` coefficients)
BIG_D = 130


def load_ops() -> list[Any]:
    """The float64, autograd-supporting OpInfos of torch's ``op_db`` (one import, seconds)."""
    from torch.testing._internal.common_methods_invocations import op_db

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


@dataclass
class Outcome:
    """The class of one (op, kind) over the samples run, and why, if not exact."""

    cls: str
    reason: str = ""
    samples: int = 0
    notes: list[str] = field(default_factory=list)


def cases(op: Any, max_d: int, max_samples: int) -> Iterator[Case]:
    """The op's ``max_samples`` smallest samples with at most ``max_d`` differentiable
    elements, in the op's order; else its smallest one with at most ``BIG_D``."""
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
        if pos and d <= BIG_D and all(leaves[i].numel() for i in pos):
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


def _floating(outs: tuple[Tensor, ...]) -> tuple[Tensor, ...] | str:
    if not outs:
        return "returns no tensor"
    if any(o.is_complex() for o in outs):
        return "complex output"
    floats = tuple(o for o in outs if o.is_floating_point())
    return floats if floats else "no floating output"


def _flat_fn(case: Case) -> Callable[[Tensor], Tensor]:
    """``case.func`` as a map of one flat vector (the inputs in order) to its flat outputs."""
    sizes = [x.numel() for x in case.inputs]
    shapes = [x.shape for x in case.inputs]

    def f(z: Tensor) -> Tensor:
        xs = [p.reshape(s) for p, s in zip(z.split(sizes), shapes)]
        outs = tuple(o for o in case.func(*xs) if o.is_floating_point())
        return torch.cat([o.reshape(-1) for o in outs])

    return f


def oracle(case: Case, second: bool) -> tuple[Tensor, Tensor | str | None] | str:
    """``(J [R, D], H [R, D, D])`` by ``torch.func`` (``H``: ``None`` if not ``second``, why it
    is unavailable if it is), or why ``J`` is unavailable."""
    f = _flat_fn(case)
    z = torch.cat([x.reshape(-1) for x in case.inputs])
    try:
        jac = torch.func.jacrev(f)(z)
    except Exception as err:
        try:  # e.g. an autograd.Function without vmap support: a loop of backward passes
            jac = torch.autograd.functional.jacobian(f, z)
        except Exception:
            return f"torch.func.jacrev: {type(err).__name__}: {_line(err)}"
    if not second:
        return jac, None
    reasons = []
    for name, outer in (
        ("jacrev(jacrev)", torch.func.jacrev),
        ("jacfwd(jacrev)", torch.func.jacfwd),
    ):
        try:
            return jac, outer(torch.func.jacrev(f))(z)
        except Exception as err:
            reasons.append(f"{name}: {type(err).__name__}: {_line(err)}")
    try:
        return jac, _loop_hessian(f, z)
    except Exception:
        return jac, "; ".join(reasons)


def _loop_hessian(f: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """``[R, D, D]`` by reverse over reverse, one backward pass per row (no vmap)."""

    def grads(v: Tensor) -> Tensor:
        return torch.autograd.functional.jacobian(f, v, create_graph=True)

    return torch.autograd.functional.jacobian(grads, z)


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:160]


def _problem(case: Case) -> FuncProblem:
    return FuncProblem(
        "opinfo",
        case.func,
        ("tuple", ()),
        case.inputs,
        tuple(f"inputs[{i}]" for i in range(len(case.inputs))),
        False,
        None,
        False,
    )


def run_taylor(case: Case, kind: str) -> tuple[Tensor, bool]:
    """The Taylor mode's result (``[R, D]``, ``[R]``, ``[R, D]`` or ``[R, D, D]``) and whether
    the general rule served a call (see NOTE [opinfo sweep])."""
    used: list[bool] = []
    general = taylor_dispatch.general_rule

    def spy(*a: Any, **k: Any) -> Any:
        used.append(True)
        return general(*a, **k)

    taylor_dispatch.general_rule = spy  # type: ignore[assignment]
    try:
        p = _problem(case)
        with torch.no_grad():  # as the front doors call it (create_graph=False)
            if kind == "tape":
                try:
                    res = taylor(p, "rdiag", lambda outs: None)
                except NeedForward:
                    res = taylor(p, "diag", lambda outs: None)
            else:
                res = taylor(p, kind, lambda outs: None)
    finally:
        taylor_dispatch.general_rule = general  # type: ignore[assignment]
    return res.result[0], bool(used)


def _compare(got: Tensor, want: Tensor) -> str:
    """Empty when ``got`` matches ``want`` (see NOTE [opinfo sweep]), else how it differs."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} instead of {tuple(want.shape)}"
    finite = want[want.isfinite()]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    if torch.allclose(got.to(want.dtype), want, rtol=RTOL, atol=ATOL * scale, equal_nan=True):
        return ""
    err = (got.to(want.dtype) - want).abs().nan_to_num(math.inf).max()
    return f"max abs error {float(err):.3g} (scale {scale:.3g})"


def run_case(case: Case, kinds: Sequence[str], max_d: int) -> dict[str, tuple[str, str]]:
    """``kind -> (class, reason)`` for one case (see NOTE [opinfo sweep])."""
    d = sum(x.numel() for x in case.inputs)
    if d > max_d and "full" in kinds:
        big = ("skipped", f"smallest sample has {d} > {max_d} elements: no full Hessian")
        return {**run_case(case, [k for k in kinds if k != "full"], max_d), "full": big}
    try:
        with torch.no_grad():
            outs = _floating(case.func(*case.inputs))
    except Exception as err:
        return {k: ("skipped", f"the op fails: {type(err).__name__}: {_line(err)}") for k in kinds}
    if isinstance(outs, str):
        return {k: ("skipped", outs) for k in kinds}
    with torch.no_grad():
        again = _floating(case.func(*case.inputs))
    if isinstance(again, str) or any(not torch.equal(a, b) for a, b in zip(outs, again)):
        return {k: ("skipped", "random output") for k in kinds}
    ref = oracle(case, any(k != "first" for k in kinds))
    result: dict[str, tuple[str, str]] = {}
    for kind in kinds:
        try:
            got, general = run_taylor(case, kind)
        except TaylorFailed as err:
            result[kind] = ("fallback", _line(err))
            continue
        except Exception as err:
            result[kind] = ("error", f"{type(err).__name__}: {_line(err)}")
            continue
        untested = case.untested.get(1 if kind == "first" else 2)
        hess = None if isinstance(ref, str) else ref[1]
        if isinstance(ref, str) or untested or (kind != "first" and isinstance(hess, str)):
            result[kind] = ("oracle", ref if isinstance(ref, str) else untested or str(hess))
            continue
        differs = _compare(got, _want(kind, ref[0], hess))
        result[kind] = ("wrong", differs) if differs else ("general" if general else "rule", "")
    return result


def _want(kind: str, jac: Tensor, hess: Any) -> Tensor:
    if kind == "first":
        return jac
    if kind == "trace":
        return hess.diagonal(dim1=1, dim2=2).sum(-1)
    if kind in ("diag", "tape"):
        return hess.diagonal(dim1=1, dim2=2)
    return hess


def sweep(
    ops: Sequence[Any],
    kinds: Sequence[str] = KINDS,
    max_d: int = 50,
    max_samples: int = 3,
    progress: TextIO | None = None,
) -> dict[str, dict[str, Outcome]]:
    """``op name -> kind -> Outcome`` over the ops' small samples (NOTE [opinfo sweep])."""
    table: dict[str, dict[str, Outcome]] = {}
    for n, op in enumerate(ops):
        if progress is not None:
            print(f"[{n + 1}/{len(ops)}] {op_name(op)}", file=progress, flush=True)
        row: dict[str, Outcome] = {}
        for case in cases(op, max_d, max_samples):
            for kind, (cls, reason) in run_case(case, kinds, max_d).items():
                out = row.setdefault(kind, Outcome("skipped"))
                out.samples += 1
                if ORDER.index(cls) < ORDER.index(out.cls):
                    out.cls, out.reason = cls, reason
                elif cls == out.cls and not out.reason:
                    out.reason = reason
        if not row:
            row = {k: Outcome("skipped", f"no sample with at most {BIG_D} elements") for k in kinds}
        table[op_name(op)] = row
    return table
