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
``jacfwd(jacrev)`` where that fails; a loop of ``autograd.functional`` where torch.func cannot
run) and classified:

- ``rule``: exact, every call on a Jet served by a cheap rule or a decomposition;
- ``general``: exact, at least one call through the general rule (nested ``jvp``);
- ``fallback``: the Taylor mode declined (``TaylorFailed``; the user's call takes nested AD);
- ``wrong``: a result that differs from the oracle (``rtol=1e-7``, ``atol=1e-9`` times the
  oracle's largest entry, at least 1) — a defect;
- ``error``: any other exception — a defect;
- ``oracle``: ``torch.func`` itself fails on the sample, or the answer differs where torch's own
  float64 gradient tests of the op are expected failures (samples at a kink): nothing to judge by;
- ``skipped``: complex or random outputs, an op failing on its own sample, no small sample.

A result that differs from ``torch.func`` gets a second opinion, a loop of ``autograd.grad``
without vmap: torch.func's ``jacrev(jacrev)`` is itself off for ``F.layer_norm`` with a weight
(vmap over its double backward); such a cell is exact and says so. An op's cell is the worst
class over its samples. Samples are drawn from a fixed seed (restored afterwards), so every
sweep sees the same ones. ``benchmarks/opinfo_coverage.py`` writes the table
(``benchmarks/OPINFO.md``); ``tests/taylor/test_taylor_opinfo.py`` runs a quick sweep in CI.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import torch
from torch import Tensor

from benchmarks.opinfo_cases import BIG_D, Case, cases, load_ops, op_name
from torchjac._engine.core.func_call import FuncProblem
from torchjac._engine.taylor import taylor_dispatch
from torchjac._engine.taylor.taylor_run import NeedForward, TaylorFailed, taylor

__all__ = ["KINDS", "ORDER", "Case", "Outcome", "load_ops", "op_name", "run_case", "sweep"]

KINDS = ("first", "trace", "diag", "tape", "full")
# worst first: an op's class over its samples is the first of these any sample gets
ORDER = ("error", "wrong", "fallback", "general", "rule", "oracle", "skipped")
RTOL, ATOL = 1e-7, 1e-9


@dataclass
class Outcome:
    """The class of one (op, kind) over the samples run, and why, if not exact."""

    cls: str
    reason: str = ""
    samples: int = 0


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


def run_case(case: Case, kinds: Sequence[str], full_d: int) -> dict[str, tuple[str, str]]:
    """``kind -> (class, reason)`` for one case (see NOTE [opinfo sweep])."""
    d = sum(x.numel() for x in case.inputs)
    if d > full_d and "full" in kinds:
        big = ("skipped", f"sample of {d} > {full_d} elements: no full Hessian")
        return {**run_case(case, [k for k in kinds if k != "full"], full_d), "full": big}
    try:
        with torch.no_grad():
            outs = _floating(case.func(*case.inputs))
    except Exception as err:
        return {k: ("skipped", f"the op fails: {type(err).__name__}: {_line(err)}") for k in kinds}
    if isinstance(outs, str):
        return {k: ("skipped", outs) for k in kinds}
    with torch.no_grad():
        again = _floating(case.func(*case.inputs))
    same = [a.shape == b.shape and torch.allclose(a, b, 0, 0, True) for a, b in zip(outs, again)]
    if isinstance(again, str) or not all(same):
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
        hess = None if isinstance(ref, str) else ref[1]
        if isinstance(ref, str) or (kind != "first" and isinstance(hess, str)):
            result[kind] = ("oracle", ref if isinstance(ref, str) else str(hess))
            continue
        result[kind] = _judge(case, kind, got, _want(kind, ref[0], hess), general)
    return result


def _judge(case: Case, kind: str, got: Tensor, want: Tensor, general: bool) -> tuple[str, str]:
    """The class of an answer of the Taylor mode (NOTE [opinfo sweep])."""
    cls = "general" if general else "rule"
    differs = _compare(got, want)
    if not differs:
        return cls, ""
    second = _loop_oracle(case, kind)  # torch.func's vmap of a backward can be wrong too
    if isinstance(second, Tensor) and not _compare(got, second):
        return cls, f"torch.func {differs_from(kind)}; {LOOP} agrees"
    untested = case.untested.get(1 if kind == "first" else 2)
    if untested:  # e.g. samples at a kink: no derivative to compare with
        return "oracle", f"{untested} ({differs})"
    return "wrong", differs


LOOP = "a loop of autograd.grad without vmap"


def differs_from(kind: str) -> str:
    return "jacrev is off" if kind == "first" else "jacrev(jacrev) is off"


def _loop_oracle(case: Case, kind: str) -> Tensor | None:
    """The expected result by ``torch.autograd.functional`` (no vmap), or ``None``."""
    f = _flat_fn(case)
    z = torch.cat([x.reshape(-1) for x in case.inputs])
    try:
        if kind == "first":
            return torch.autograd.functional.jacobian(f, z)
        return _want(kind, None, _loop_hessian(f, z))
    except Exception:
        return None


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
    big_d: int = BIG_D,
    full_d: int | None = None,
) -> dict[str, dict[str, Outcome]]:
    """``op name -> kind -> Outcome`` over the ops' small samples (NOTE [opinfo sweep]); full
    Hessians up to ``full_d`` elements (default ``max_d``)."""
    table: dict[str, dict[str, Outcome]] = {}
    state = torch.get_rng_state()
    try:
        for n, op in enumerate(ops):
            if progress is not None:
                print(f"[{n + 1}/{len(ops)}] {op_name(op)}", file=progress, flush=True)
            torch.manual_seed(0)  # the same samples in every sweep, whatever ran before
            table[op_name(op)] = _sweep_op(op, kinds, max_d, max_samples, big_d, full_d or max_d)
    finally:
        torch.set_rng_state(state)
    return table


def _sweep_op(
    op: Any, kinds: Sequence[str], max_d: int, max_samples: int, big_d: int, full_d: int
) -> dict[str, Outcome]:
    """``kind -> Outcome`` of one op: the worst class over its samples (NOTE [opinfo sweep])."""
    row: dict[str, Outcome] = {}
    for case in cases(op, max_d, max_samples, big_d):
        for kind, (cls, reason) in run_case(case, kinds, full_d).items():
            out = row.setdefault(kind, Outcome("skipped"))
            out.samples += 1
            if ORDER.index(cls) < ORDER.index(out.cls):
                out.cls, out.reason = cls, reason
            elif cls == out.cls and not out.reason:
                out.reason = reason
    if not row:
        limit = max(big_d, max_d)
        row = {k: Outcome("skipped", f"no sample of at most {limit} elements") for k in kinds}
    return row
