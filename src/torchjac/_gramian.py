"""``gramian``: ``J Jᵀ`` of tensors already on the autograd graph, one block of ``J`` at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from torchjac._engine.graph.gram_graph import graph_gramian
from torchjac._engine.graph.graph_ghost import Consumers
from torchjac._engine.graph.graph_release import keep_retained_grads
from torchjac._errors import fallback_scope
from torchjac._graph_args import graph_call

__all__ = ["gramian"]


def gramian(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | Mapping[str, Tensor],
    *,
    batch_dim: int | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    max_memory: float | str | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    allow_unused: bool = False,
) -> Tensor:
    r"""Gramian :math:`G = J J^\top` of ``outputs`` (already computed) w.r.t. ``inputs``.

    Math: :math:`G_{ik} = \sum_j \langle \partial y_i / \partial x_j, \partial y_k / \partial x_j
    \rangle`, the inner products of all pairs of gradients of the output elements (their squared
    norms on the diagonal, conflicts where negative). ``J`` is never held whole: ``G`` is summed
    over the inputs, one block ``J_j J_jᵀ`` at a time, under ``max_memory``; an input too large
    for one block is streamed by row chunks. A weight used once by ``F.linear`` on a 2-d input
    ``a`` adds ``<δ_r, (a aᵀ) δ_s>`` (``δ`` the gradient at the layer's output) when that is
    cheaper than its rows, which are then never formed.

    Shapes: rows as in :func:`torchjac.jac`, twice: ``outputs.shape * 2`` for one Tensor,
    ``[m, m]`` for a sequence (``m`` elements in all, rows concatenated in order). With
    ``batch_dim=b`` samples are independent, so ``J`` is block-diagonal and the result is the
    per-sample Gramians, batch first: ``[B] + out_rest + out_rest`` (one Tensor) or ``[B, m, m]``
    with ``m`` the per-sample elements (a sequence).

    Args:
        outputs: a Tensor or a sequence of Tensors on the autograd graph.
        inputs: a Tensor, an iterable of Tensors or a mapping ``str -> Tensor``, each requiring
            grad; their blocks are summed (none: the zero matrix).
        batch_dim: the batch dimension shared by all outputs and inputs; samples must be
            independent, which is checked (one backward pass): ``BatchCouplingError`` otherwise.
        mode: how each block of ``J`` is probed: ``"auto"`` (fewest probes), ``"rev"`` (rows)
            or ``"fwd"`` (columns by double backward).
        chunk_size: probes per vectorised pass; ``1`` is a plain loop. Default: from
            ``max_memory``.
        max_memory: bytes (a number) or a string like ``"512MiB"``; default: a quarter of the free
            memory of the device. Half of it holds blocks of ``J``, the rest the probes.
        retain_graph: keep the graph of ``outputs`` for later use; default ``create_graph``,
            as in ``torch.autograd.grad``. ``False`` frees it by the time the call returns: pass
            ``True`` to call ``backward`` through the outputs afterwards (example below).
        create_graph: make the result differentiable.
        allow_unused: an input the outputs do not depend on adds nothing (default: an error).

    Example:
        >>> import torch, torchjac as tj
        >>> weight = torch.tensor([[1., 2.], [3., 4.]], requires_grad=True)
        >>> bias = torch.tensor([0.5, -0.5], requires_grad=True)
        >>> y1 = weight @ torch.tensor([1., -1.]) + bias
        >>> y2 = (weight ** 2).sum() + (bias ** 2).sum()
        >>> tj.gramian([y1, y2], [weight, bias])
        tensor([[  3.,   0.,  -1.],
                [  0.,   3.,  -3.],
                [ -1.,  -3., 122.]])
        >>> x = torch.randn(5, 3, requires_grad=True)
        >>> tj.gramian(x.sin(), x, batch_dim=0).shape  # per sample: [B, out, out]
        torch.Size([5, 3, 3])

        Multi-task training: weigh the tasks from the Gramian of their losses on the shared
        parameters, then backward through the same losses, so the graph must be kept:

        >>> shared = torch.nn.Linear(3, 4)
        >>> heads = [torch.nn.Linear(4, 1) for _ in range(2)]
        >>> features = shared(torch.randn(8, 3)).tanh()
        >>> losses = torch.stack([head(features).pow(2).mean() for head in heads])
        >>> g = tj.gramian(losses, list(shared.parameters()), retain_graph=True)  # [2, 2]
        >>> weights = 1 / g.diagonal().sqrt().clamp_min(1e-12)  # each task's gradient at norm 1
        >>> losses.backward(weights)
        >>> shared.weight.grad.shape
        torch.Size([4, 3])
    """
    walked = Consumers()  # for NOTE [graph ghost], from the validation's walk
    call = graph_call(
        "gramian",
        outputs,
        inputs,
        None,
        batch_dim=batch_dim,
        mode=mode,
        chunk_size=chunk_size,
        max_memory=max_memory,
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=allow_unused,
        unused_means="to let it add nothing",
        visit=walked.visit,
    )
    problem, single = call.problem, call.single
    g_out = problem.out_group
    rows = tuple(g_out.rest_shape(0)) if single else (g_out.numel,)
    lead = () if problem.batch_dim is None else (g_out.batch_size,)
    if not problem.inputs:  # no columns: the zero matrix of the rows
        bsz, m = g_out.batch_size, g_out.numel
        gram = torch.zeros(bsz, m, m, dtype=problem.dtype, device=problem.device)
        return gram.reshape((*lead, *rows, *rows))
    keep = keep_retained_grads(problem.retained)  # NOTE [retain_grad]
    # create_graph=True under torch.no_grad(): differentiable, as jac and autograd.grad, down to
    # the final reshape (a view made under no_grad would be a leaf that only claims a graph)
    grad_on = torch.enable_grad() if create_graph else contextlib.nullcontext()
    with keep, grad_on, fallback_scope():  # several blocks may each fall back: warn once
        gram = graph_gramian(problem, call.mode, call.chunk_size, call.budget, walked)
        return gram.reshape((*lead, *rows, *rows))
