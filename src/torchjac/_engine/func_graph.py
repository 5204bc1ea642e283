"""When ``torch.func`` cannot trace a function: the autograd graph instead.

NOTE [graph fallback]: ``torch.func`` refuses some functions that plain autograd runs: an
old-style ``autograd.Function`` (no ``setup_context``), a module that updates a buffer in place
(BatchNorm in train mode). The function is then called once with plain autograd and its Jacobian
taken on that graph by the graph engine (``graph_probes``), batch-coupling check included, with
one ``FallbackWarning``. Second derivatives have no such fallback: the coupling check still runs
(so BatchNorm in train mode reports the coupling) and the ``torch.func`` error is raised.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchjac._checks import check_batch_dim
from torchjac._engine.basis import Group
from torchjac._engine.func_call import FuncProblem
from torchjac._engine.graph_probes import GraphProblem, solve
from torchjac._engine.structure import check_independent, reachable

__all__ = ["TraceFailed", "graph_jacobian"]


class TraceFailed(Exception):
    """``torch.func.vjp`` could not call the function (see NOTE [graph fallback])."""


def _graph_problem(p: FuncProblem) -> tuple[GraphProblem, object]:
    xs = tuple(x if x.requires_grad else x.detach().requires_grad_(True) for x in p.inputs)
    with torch.enable_grad():
        outs, aux = p.call(*xs)
    if p.batch_dim is not None:
        names = [f"the output of func[{i}]" for i in range(len(outs))]
        check_batch_dim(p.fn_name, p.batch_dim, [*zip(p.input_names, xs), *zip(names, outs)])
    outs = tuple(y if y.requires_grad else y + 0 * xs[0].sum() for y in outs)
    used = reachable(outs, xs)
    problem = GraphProblem(
        fn_name=p.fn_name,
        outputs=outs,
        inputs=xs,
        input_names=p.input_names,
        used=tuple(used),
        jac_outputs=None,
        out_group=Group.of(outs, p.batch_dim),
        in_group=Group.of(xs, p.batch_dim),
        batch_dim=p.batch_dim,
        create_graph=p.create_graph,
        retain_graph=p.create_graph,
    )
    return problem, aux


def graph_jacobian(
    p: FuncProblem, mode: str, chunk_size: int | None, budget: int
) -> tuple[list[Tensor], Group, Group, object]:
    """``[B, rows, n_j]`` per input, the output and input groups, and the aux value."""
    problem, aux = _graph_problem(p)
    return solve(problem, mode, chunk_size, budget), problem.out_group, problem.in_group, aux


def graph_coupling_check(p: FuncProblem) -> None:
    """Only the batch-coupling check, on the plain autograd graph."""
    if p.batch_dim is None:
        return
    g, _ = _graph_problem(p)
    check_independent(
        p.fn_name,
        p.batch_dim,
        g.out_group,
        g.in_group,
        p.input_names,
        g.dtype,
        g.device,
        lambda cots: g.grad(g.outputs, g.inputs, [c.unsqueeze(0) for c in cots], False, False),
    )
