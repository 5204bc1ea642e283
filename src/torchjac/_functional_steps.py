"""The steps every function front door shares: validate and build the problem, run one public
call (NOTE [one draw per call], NOTE [module state], NOTE [exact norms]), shape the result."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from torchjac._checks import (
    check_batch_dim,
    check_chunk_size,
    check_flag,
    check_func_inputs,
    check_mode,
)
from torchjac._engine.core.func_call import FuncProblem
from torchjac._engine.core.func_state import call_state
from torchjac._engine.core.plan import memory_budget
from torchjac._engine.func.func_probes import Traced
from torchjac._engine.taylor.exact_norms import exact_norms
from torchjac._engine.taylor.taylor_run import TaylorResult
from torchjac._errors import fallback_scope

__all__ = ["finish", "in_shape", "lead_of", "outputs_check", "rows_of", "running", "setup"]


def setup(
    fn: str,
    func: Any,
    inputs: Any,
    batch_dim: Any,
    mode: Any,
    has_aux: Any,
    chunk_size: Any,
    max_memory: Any,
    create_graph: Any,
) -> tuple[FuncProblem, str, int | None, int]:
    ins, container, names, device, batch_dim = check_func_inputs(fn, func, inputs, batch_dim)
    mode = check_mode(fn, mode)
    chunk_size = check_chunk_size(fn, chunk_size)
    has_aux = check_flag(fn, "has_aux", has_aux)
    create_graph = check_flag(fn, "create_graph", create_graph)
    budget = memory_budget(fn, max_memory, device)
    if any(x.is_inference() for x in ins):  # inference tensors cannot join a graph: copy them
        with torch.inference_mode(False):
            ins = tuple(x.clone() if x.is_inference() else x for x in ins)
    problem = FuncProblem(
        fn, func, container, ins, names, bool(has_aux), batch_dim, bool(create_graph)
    )
    return problem, mode, chunk_size, budget


def outputs_check(p: FuncProblem) -> Callable[[tuple[Tensor, ...]], None]:
    def check(outs: tuple[Tensor, ...]) -> None:
        if p.batch_dim is None:
            return
        out_names = (
            ["the output of func"]
            if p.single
            else [f"the output of func[{i}]" for i in range(len(outs))]
        )
        named = list(zip(p.input_names, p.inputs)) + list(zip(out_names, outs))
        check_batch_dim(p.fn_name, p.batch_dim, named)

    return check


@contextmanager
def running(p: FuncProblem) -> Iterator[None]:
    """One public call: one ``FallbackWarning`` at most, one random draw and the modules' buffers
    as found (NOTE [one draw per call], NOTE [module state]). Derivatives need autograd even
    under ``torch.inference_mode()``; the result needs a graph only with ``create_graph`` (and
    then has one under ``torch.no_grad()`` too, as with ``torch.autograd.grad``)."""
    with (
        fallback_scope(),
        call_state(p.func, p.inputs) as state,
        torch.inference_mode(False),
        torch.enable_grad() if p.create_graph else torch.no_grad(),
        exact_norms(graph=True)
        if p.create_graph
        else contextlib.nullcontext(),  # NOTE [exact norms]
    ):
        p.state = state
        try:
            yield
        finally:
            p.state = None


def rows_of(p: FuncProblem, t: Traced | TaylorResult) -> tuple[int, ...]:
    return tuple(t.out_group.rest_shape(0)) if p.single else (t.out_group.numel,)


def lead_of(p: FuncProblem, t: Traced | TaylorResult) -> tuple[int, ...]:
    return () if p.batch_dim is None else (t.in_group.batch_size,)


def in_shape(p: FuncProblem, t: Traced | TaylorResult, j: int) -> tuple[int, ...]:
    g = t.in_group
    return tuple(g.shapes[j]) if p.batch_dim is None else tuple(g.rest_shape(j))


def finish(p: FuncProblem, t: Traced | TaylorResult, result: Any) -> Any:
    """``result``, with the aux value when ``has_aux``: without ``create_graph`` its tensors carry
    no graph, whichever plan ran (a pass of rows calls ``func`` on inputs of its own that
    require grad, so its aux hung on that internal graph)."""
    if not p.has_aux:
        return result
    aux = t.aux if p.create_graph else tree_map(_detached, t.aux)
    return result, aux


def _detached(a: Any) -> Any:
    return a.detach() if isinstance(a, Tensor) else a
