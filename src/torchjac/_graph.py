"""``jac``: Jacobians of tensors already on the autograd graph."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torchjac._checks import unflatten
from torchjac._engine.graph.graph_probes import GraphProblem, solve
from torchjac._engine.graph.graph_release import keep_retained_grads
from torchjac._graph_args import graph_call

__all__ = ["jac"]


def jac(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | Mapping[str, Tensor],
    jac_outputs: Tensor | Sequence[Tensor] | None = None,
    *,
    batch_dim: int | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    max_memory: float | str | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    allow_unused: bool = False,
) -> Any:
    r"""Jacobian of ``outputs`` (already computed) with respect to ``inputs``.

    Math: :math:`J_{ij} = \partial y_i / \partial x_j`, optionally left-multiplied by
    ``jac_outputs`` (the chain rule): :math:`J' = A J`.

    Shapes follow one rule, rows then columns. For an input ``x``, the result is
    ``outputs.shape + x.shape`` when ``outputs`` is one Tensor, and ``[m] + x.shape`` when it is
    a sequence (``m`` elements in all, rows concatenated in order). With ``jac_outputs`` of shape
    ``[k] + outputs.shape`` (or a sequence of ``[k] + y_i.shape``) the result has ``k`` rows.
    With ``batch_dim=b`` the result is per sample, batch first: ``[B] + out_rest + in_rest``.
    The result has the container of ``inputs``: a Tensor, a tuple or a dict.

    Args:
        outputs: a Tensor or a sequence of Tensors on the autograd graph.
        inputs: a Tensor, an iterable of Tensors or a mapping ``str -> Tensor``, each requiring
            grad; an empty one gives ``()`` or ``{}``.
        jac_outputs: left factor, ``[k] + outputs.shape`` (see above). Default: the identity.
        batch_dim: the batch dimension shared by all outputs and inputs; samples must be
            independent, which is checked (one backward pass): ``BatchCouplingError`` otherwise.
        mode: ``"auto"`` (fewest probes; a column on a graph costs a double backward),
            ``"rev"`` (rows, vector-Jacobian products) or ``"fwd"`` (columns).
        chunk_size: probes per vectorised pass; ``1`` is a plain loop. Default: chosen from
            ``max_memory``.
        max_memory: bytes (a number) or a string like ``"512MiB"``; default: a quarter of the free
            memory of the device.
        retain_graph: keep the graph of ``outputs`` for later use; default ``create_graph``,
            as in ``torch.autograd.grad``. ``False`` frees it by the time the call returns,
            whatever the plan, as ``torch.autograd.grad(outputs, inputs)`` does: pass ``True``
            to call ``backward`` through the outputs afterwards.
        create_graph: make the result differentiable (for higher-order derivatives).
        allow_unused: zeros for an input the outputs do not depend on (default: an error).

    Example:
        >>> import torch, torchjac as tj
        >>> param = torch.tensor([1., 2.], requires_grad=True)
        >>> y1 = torch.tensor([-1., 1.]) @ param
        >>> y2 = (param ** 2).sum()
        >>> tj.jac([y1, y2], [param])
        (tensor([[-1.,  1.],
                [ 2.,  4.]]),)
        >>> x = torch.randn(5, 3, requires_grad=True)
        >>> tj.jac(x.sin(), x, batch_dim=0).shape  # per sample: [B, out, in]
        torch.Size([5, 3, 3])
        >>> tj.jac(x.sin(), []), tj.jac(x.sin(), {})  # no inputs: nothing to compute
        ((), {})
    """
    call = graph_call(
        "jac",
        outputs,
        inputs,
        jac_outputs,
        batch_dim=batch_dim,
        mode=mode,
        chunk_size=chunk_size,
        max_memory=max_memory,
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=allow_unused,
        unused_means="to get zeros for it",
    )
    problem = call.problem
    if not problem.inputs:  # nothing to compute: () or {}
        return unflatten(call.container, [])
    # create_graph=True under torch.no_grad(): differentiable, as with torch.autograd.grad
    enable = problem.create_graph and not torch.is_grad_enabled()
    keep = keep_retained_grads(problem.retained)  # NOTE [retain_grad]
    with keep, torch.enable_grad() if enable else contextlib.nullcontext():
        flat = solve(problem, call.mode, call.chunk_size, call.budget, native=True)
        shaped = [_shape(problem, j, r, call.single) for j, r in enumerate(flat)]
        return unflatten(call.container, shaped)


def _shape(problem: GraphProblem, j: int, res: Tensor, single: bool) -> Tensor:
    """``[B, R, n_j]``, or ``[R, *x_j.shape]`` without ``batch_dim`` (NOTE [native rows]) -> the
    public layout (see ``jac``'s docstring)."""
    g_out, g_in = problem.out_group, problem.in_group
    if problem.jac_outputs is not None:
        rows: tuple[int, ...] = (res.shape[0 if problem.batch_dim is None else 1],)
    elif single:
        rows = tuple(g_out.rest_shape(0))
    else:
        rows = (g_out.numel,)
    if problem.batch_dim is None:
        return res.reshape((*rows, *g_in.shapes[j]))  # () when both are 0-d
    return res.reshape(g_in.batch_size, *rows, *g_in.rest_shape(j))
