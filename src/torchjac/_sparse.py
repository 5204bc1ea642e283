"""``sparsity_pattern`` and ``sparse_jacobian``: sparse Jacobians of a function of one Tensor.

The pattern comes from the operations ``func`` runs (NOTE [sparsity tracing]), the colouring
from the pattern (NOTE [colouring]), the values from one compressed probe per colour (NOTE
[compressed probes]); a pattern passed back in keeps its colourings, so a Newton loop colours
once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchjac._checks import (
    check_batch_dim,
    check_chunk_size,
    check_mode,
    check_pattern,
    check_sparse_args,
)
from torchjac._engine.core.func_call import FuncProblem
from torchjac._engine.core.func_state import call_state
from torchjac._engine.core.plan import memory_budget
from torchjac._engine.func.func_probes import Traced
from torchjac._engine.sparse.index_forms import csr
from torchjac._engine.sparse.index_sets import Sets
from torchjac._engine.sparse.sparse_plan import pattern_csr, plan_from, plan_of
from torchjac._engine.sparse.sparse_probes import compressed_jacobian
from torchjac._engine.sparse.sparsity import trace_pattern
from torchjac._errors import fallback_scope, warn_fallback
from torchjac._sparse_batch import per_sample_blocks

__all__ = ["sparse_jacobian", "sparsity_pattern"]


def _problem(fn: str, func: Callable[..., Any], x: Tensor) -> FuncProblem:
    if x.is_inference():  # inference tensors cannot join a graph: copy
        with torch.inference_mode(False):
            x = x.clone()
    return FuncProblem(fn, func, ("tensor", ()), (x,), ("x",), False, None, False)


def _detect(p: FuncProblem, graph: bool = False) -> tuple[Sets, Traced | None]:
    """Trace ``func`` once (within a call's state): the pattern's index sets (NOTE [index
    sets]) and, with ``graph``, the call's autograd graph for reverse probes (NOTE
    [compressed probes])."""
    y, trace, leaf = trace_pattern(p.call_raw, p.inputs[0], graph)
    outs, _ = p.split(y)
    if not p.single:
        raise TypeError(
            f"{p.fn_name}: func must return one Tensor, got a sequence of {len(y)}. Return "
            "torch.cat([t.reshape(-1) for t in outputs]) to get their rows in one Jacobian."
        )
    reasons = []
    if trace.dense_ops:
        ops = ", ".join(sorted(set(trace.dense_ops)))
        reasons.append(f"each output of these ops depends on each of its inputs: {ops}")
    if trace.branches:
        ops = ", ".join(sorted(set(trace.branches)))
        reasons.append(f"func reads values of x ({ops}): the pattern holds for this branch")
    if reasons:
        warn_fallback(p.fn_name, "the sparsity pattern is a superset", "; ".join(reasons))
    traced = None if leaf is None else Traced.of(p, outs, (leaf,))
    return trace.sets, traced


def sparsity_pattern(func: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    r"""Every entry of the Jacobian of ``func`` at ``x`` that can be nonzero, for every ``x``.

    The pattern :math:`P_{ij} = 1` unless :math:`\partial f_i / \partial x_j = 0` for all
    values of ``x``, found by propagating index sets through the operations ``func`` runs
    (elementwise ops, slicing, indexing, ``gather``/``scatter``, ``torch.roll``, padding,
    reductions, matrix products and convolutions, whose constant zeros stay zeros): one call of
    ``func``, no derivative taken. An operation without a rule makes each of its outputs depend
    on each of its inputs (a superset, never a missed entry), and a ``FallbackWarning`` names
    it; so does a Python branch on a value of ``x``, for which the pattern holds at the branch
    taken. ``func`` is called once, on a copy of ``x``, seeing the random numbers a plain call
    would draw (the global RNG state is restored).

    Shapes: ``func`` maps one Tensor ``x`` to one Tensor ``y``; the result is a boolean sparse
    CSR Tensor ``[m, n]`` with ``m = y.numel()``, ``n = x.numel()``, both flattened row-major
    (the layout of ``tj.jacobian(func, x).reshape(m, n)``).

    Example:
        >>> import torch, torchjac as tj
        >>> def laplacian_1d(u):  # periodic second difference
        ...     return torch.roll(u, 1) - 2 * u + torch.roll(u, -1)
        >>> P = tj.sparsity_pattern(laplacian_1d, torch.zeros(5))
        >>> P.to_dense().int()
        tensor([[1, 1, 0, 0, 1],
                [1, 1, 1, 0, 0],
                [0, 1, 1, 1, 0],
                [0, 0, 1, 1, 1],
                [1, 0, 0, 1, 1]], dtype=torch.int32)
    """
    fn = "sparsity_pattern"
    x = check_sparse_args(fn, func, x)
    p = _problem(fn, func, x)
    with fallback_scope(), torch.inference_mode(False), call_state(func, p.inputs) as state:
        p.state = state
        return pattern_csr(_detect(p)[0])


def sparse_jacobian(
    func: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    pattern: Tensor | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    max_memory: float | str | None = None,
    batch_dim: int | None = None,
) -> Tensor:
    r"""The Jacobian :math:`J_{ij} = \partial f_i / \partial x_j` of ``func`` at ``x``, sparse.

    Columns that share no row of the pattern (:func:`sparsity_pattern`, detected when
    ``pattern`` is ``None``) get one colour (a lattice colouring over ``x``'s grid where one
    fits, else greedy distance-2 colouring, largest first); one
    forward probe per colour, :math:`J s_c` with :math:`s_c` the sum of its columns' unit
    vectors, holds every entry of those columns, read back by a gather. ``mode="rev"`` colours
    rows and pulls back :math:`s_c^T J`; ``"auto"`` takes the side with fewer colours (reverse
    on ties: one batched backward pass has less overhead than ``jvp`` under ``vmap``, 2x
    faster on W9 at N = 64, even at N = 256). A 2-D five-point stencil needs 5 probes at any
    grid size, where a dense Jacobian needs one per input element. One extra probe along a
    fixed test direction checks the result: a Jacobian with a nonzero outside ``pattern``
    raises ``ValueError``, never a wrong answer.

    Shapes: ``func`` maps one Tensor ``x`` to one Tensor ``y``; the result is a sparse CSR
    Tensor ``[m, n]`` (``m = y.numel()``, ``n = x.numel()``, flattened row-major) with ``x``'s
    dtype, equal to ``tj.jacobian(func, x).reshape(m, n)``, its entries those of the pattern.

    Args:
        func: the function of one Tensor.
        x: the point (a dense floating Tensor).
        pattern: a boolean sparse CSR ``[m, n]`` holding every entry that can be nonzero (as
            :func:`sparsity_pattern` returns). The colourings are cached on it, so passing the
            same pattern again (a Newton loop) skips detection and colouring.
        mode: ``"auto"``, ``"fwd"`` (column colouring, ``jvp``) or ``"rev"`` (row colouring,
            batched backward passes); forward falls back to reverse, with one
            ``FallbackWarning``, when forward-mode AD cannot follow ``func``, and reverse
            chosen by ``"auto"`` to forward when reverse-mode AD cannot.
        chunk_size: probes per vectorised pass (``1``: a loop). Default: from ``max_memory``
            (bytes or a string like ``"512MiB"``; default a share of free memory).
        batch_dim: the batch dimension of ``x`` and of the output: the result is then the
            per-sample blocks, a batched sparse CSR ``[B, m_s, n_s]`` (``m_s``, ``n_s`` the
            elements of one sample, the batch dimension set aside), all blocks with one pattern
            (the union of the samples'). ``pattern`` is still the whole batch's ``[m, n]``. A
            nonzero linking two samples raises ``BatchCouplingError``. The probes cost what one
            sample's would: colours are shared across the batch.

    Example:
        >>> import torch, torchjac as tj
        >>> def residual(u):  # -u'' + u**3 with zero Dirichlet ends
        ...     p = torch.nn.functional.pad(u, (1, 1))
        ...     return 2 * u - p[:-2] - p[2:] + u ** 3
        >>> u = torch.linspace(0, 1, 6, dtype=torch.float64)
        >>> J = tj.sparse_jacobian(residual, u)
        >>> J.layout, J.shape, J.values().numel()  # tridiagonal: 3 colours, 16 entries
        (torch.sparse_csr, torch.Size([6, 6]), 16)
        >>> torch.equal(J.to_dense(), tj.jacobian(residual, u))
        True
    """
    fn = "sparse_jacobian"
    x = check_sparse_args(fn, func, x)
    pattern = check_pattern(fn, pattern, x.numel())
    batch_dim, _ = check_batch_dim(fn, batch_dim, [("x", x)])
    mode = check_mode(fn, mode)
    chunk_size = check_chunk_size(fn, chunk_size)
    if max_memory is not None:
        memory_budget(fn, max_memory, x.device)  # checked now, used if the probes need it
    p = _problem(fn, func, x)
    with fallback_scope(), torch.inference_mode(False), call_state(func, p.inputs) as state:
        p.state = state
        if pattern is None:  # NOTE [pattern plan]
            sets, traced = _detect(p, graph=mode != "fwd")
            plan = plan_from(sets)
        else:
            plan, traced = plan_of(pattern), None
        auto = mode == "auto"
        if auto:
            mode = plan.side(tuple(x.shape))
        with torch.no_grad():
            values, y_shape = compressed_jacobian(
                p, p.inputs[0], plan, mode, chunk_size, max_memory, traced, auto
            )
    rows, cols = plan.rows, plan.cols
    if batch_dim is not None:
        return per_sample_blocks(fn, rows, cols, values, tuple(x.shape), tuple(y_shape), batch_dim)
    dev = x.device
    return csr(plan.crow.to(dev, copy=True), cols.to(dev, copy=True), values, (plan.m, plan.n))
