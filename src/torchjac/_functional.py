"""``jacobian``, ``hessian``, ``hessian_diagonal``, ``laplacian``: derivatives of functions.

Each front door validates, calls the function once (NOTE [function probes]),
plans, runs the engine and shapes the result; second derivatives go through the Taylor-mode
propagation when it is the cheaper plan (NOTE [taylor mode]) and through nested AD otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor

from torchjac._checks import unflatten
from torchjac._distributed_doors import split_function
from torchjac._engine.func.func_probes import solve_jacobian
from torchjac._engine.func.second import second_derivatives
from torchjac._functional_steps import (
    finish,
    in_shape,
    lead_of,
    outputs_check,
    rows_of,
    running,
    setup,
)

__all__ = ["hessian", "hessian_diagonal", "jacobian", "laplacian"]

Inputs = Tensor | Iterable[Tensor] | Mapping[str, Tensor]


def jacobian(
    func: Callable[..., Any],
    inputs: Inputs,
    *,
    batch_dim: int | None = None,
    mode: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    max_memory: float | str | None = None,
    create_graph: bool = False,
    process_group: Any = None,
    gather: str | bool = "all",
) -> Any:
    r"""Jacobian of ``func`` at ``inputs``: :math:`J_{ij} = \partial f_i / \partial x_j`.

    ``func`` is called as ``func(inputs)`` for a Tensor or a mapping and ``func(*inputs)`` for a
    tuple; it returns a Tensor or a sequence of Tensors (rows concatenated in order), plus an aux
    value when ``has_aux`` (returned as ``(jacobian, aux)``).

    Shapes, rows then columns: for an input ``x`` the result is ``out.shape + x.shape`` (one
    Tensor output) or ``[m] + x.shape`` (a sequence of outputs with ``m`` elements in all), in the
    container of ``inputs``. With ``batch_dim=b``, ``func`` is called on the whole batch as the
    user would, sample ``i`` of the output must depend only on sample ``i`` of the inputs
    (checked: ``BatchCouplingError``), and the result is per sample, batch first:
    ``[B] + out_rest + in_rest``, with ``out`` probes broadcast over the batch (never the
    ``[B, ..., B, ...]`` cross terms).

    ``func`` may be evaluated more than once; every evaluation sees the random numbers a plain
    call would draw at this point (dropout in train mode: the Jacobian of one realisation), and
    the global RNG state, and the buffers of the modules ``func`` reaches (BatchNorm's running
    statistics), are as they were when the call returns, on success or error (NOTE [one draw
    per call], NOTE [module state]). The same holds for :func:`hessian`,
    :func:`hessian_diagonal` and :func:`laplacian`.

    Args:
        func: the function.
        inputs: a Tensor, a sequence of Tensors or a mapping ``str -> Tensor`` (floating).
        batch_dim: the batch dimension of every input and output (default: none).
        mode: ``"auto"`` (fewest probes: forward for tall Jacobians, reverse for wide ones;
            with at most 4 input elements per sample, forward without counting rows),
            ``"rev"`` (rows: batched backward passes on the graph of one call) or ``"fwd"``
            (columns: every column in one Taylor-mode pass, NOTE [taylor mode], or chunks of
            ``jvp`` when ``chunk_size`` asks for fewer; falls back to rows, with one
            ``FallbackWarning``, when forward mode cannot follow ``func``: a custom
            ``autograd.Function``, a ``torch.no_grad()`` block, an op without forward AD).
        has_aux: ``func`` returns ``(output, aux)``. The aux value is the one of the call the
            result came from; it carries an autograd graph only with ``create_graph`` when
            that call was the Taylor-mode pass.
        chunk_size: probes per vectorised pass; ``1`` is a plain loop. Default: from
            ``max_memory`` (bytes or a string like ``"512MiB"``; default a share of free memory).
        create_graph: make the result differentiable (w.r.t. the inputs and anything ``func``
            closes over, such as model parameters).
        process_group: a ``torch.distributed`` process group to split the work over; every
            rank calls with the same arguments (SPMD). With ``batch_dim`` each rank computes a
            balanced range of samples (``func`` is called on that range, and on the whole batch
            once to check that no sample reaches another and that ``func`` draws no random
            numbers: ``BatchCouplingError`` / ``ValueError``); without, a range of the rows of
            the flattened output, or for a tall ``jacobian`` (``mode="fwd"``, or ``"auto"``
            with more output than input elements, inputs of one dtype) a range of its columns
            (``func`` is called whole). Not with ``has_aux`` or ``create_graph``. An error on
            any rank raises on every rank. Default ``None``: this process alone. See the docs
            page "Several processes".
        gather: ``"all"`` (default): the whole result on every rank; ``"rank0"``: on rank 0,
            ``None`` elsewhere; ``False``: ``(shard, index)``, this rank's part and the slice
            it covers: ``result[index]`` with ``batch_dim``; ``result.reshape(m, *rest)[index]``
            by rows (``m`` elements of the output); by columns the shard is one Tensor
            ``[*rows, n_r]`` of ``R[index]``, ``R`` the result with every input flattened and
            concatenated on the last axis (``index`` is ``(slice(None),)`` without
            ``process_group``). The same two options for every function of this module.

    Example:
        >>> import torch, torchjac as tj
        >>> tj.jacobian(lambda x: x ** 2, torch.tensor([1.0, 2.0]))
        tensor([[2., 0.],
                [0., 4.]])
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
        >>> tj.jacobian(net, torch.randn(8, 3), batch_dim=0).shape  # [B, out, in]
        torch.Size([8, 4, 3])
    """
    if process_group is not None or gather != "all":  # NOTE [split and gather]
        return split_function(jacobian, "jacobian", locals())
    fn = "jacobian"
    p, mode, chunk_size, budget = setup(
        fn, func, inputs, batch_dim, mode, has_aux, chunk_size, max_memory, create_graph
    )
    with running(p):  # the shaping too: under no_grad, a view of the result would lose its graph
        flat, t = solve_jacobian(p, mode, chunk_size, budget, outputs_check(p))
        rows, lead = rows_of(p, t), lead_of(p, t)
        res = [r.reshape((*lead, *rows, *in_shape(p, t, j))) for j, r in enumerate(flat)]
    return finish(p, t, unflatten(p.container, res))


def hessian(
    func: Callable[..., Any],
    inputs: Inputs,
    *,
    batch_dim: int | None = None,
    mode: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    max_memory: float | str | None = None,
    create_graph: bool = False,
    process_group: Any = None,
    gather: str | bool = "all",
) -> Any:
    r"""Hessian of ``func``: :math:`H_{oij} = \partial^2 f_o / \partial x_i \partial x_j`.

    Shapes: ``out.shape + x_i.shape + x_j.shape`` for inputs ``x_i``, ``x_j`` (a sequence of
    outputs gives ``[m]`` rows); per sample with ``batch_dim``: ``[B] + out_rest + in_rest +
    in_rest``. Several inputs give nested containers (``H[i][j]``, tuple of tuples or dict of
    dicts), as ``torch.autograd.functional.hessian``. Arguments as in :func:`jacobian`;
    ``mode="auto"`` takes the cheaper of the Taylor-mode propagation of full second-order jets
    (small inputs, e.g. PINNs) and forward over reverse; ``"fwd"`` is forward over reverse,
    ``"rev"`` reverse over reverse.

    Example:
        >>> import torch, torchjac as tj
        >>> tj.hessian(lambda x: (x ** 3).sum(), torch.tensor([1.0, 2.0]))
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    if process_group is not None or gather != "all":  # NOTE [split and gather]
        return split_function(hessian, "hessian", locals())
    fn = "hessian"
    p, mode, chunk_size, budget = setup(
        fn, func, inputs, batch_dim, mode, has_aux, chunk_size, max_memory, create_graph
    )
    with running(p):
        check = outputs_check(p)
        flat, t = second_derivatives(p, "full", mode, chunk_size, budget, check)  # [B, R, D, D]
        rows, lead, g = rows_of(p, t), lead_of(p, t), t.in_group
        blocks = [
            [
                flat[
                    :,
                    :,
                    g.offsets[i] : g.offsets[i] + g.sizes[i],
                    g.offsets[j] : g.offsets[j] + g.sizes[j],
                ].reshape((*lead, *rows, *in_shape(p, t, i), *in_shape(p, t, j)))
                for j in range(len(g.shapes))
            ]
            for i in range(len(g.shapes))
        ]
        kind, _ = p.container
        res = (
            blocks[0][0]
            if kind == "tensor"
            else unflatten(p.container, [unflatten(p.container, row) for row in blocks])
        )
    return finish(p, t, res)


def hessian_diagonal(
    func: Callable[..., Any],
    inputs: Inputs,
    *,
    batch_dim: int | None = None,
    mode: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    max_memory: float | str | None = None,
    create_graph: bool = False,
    process_group: Any = None,
    gather: str | bool = "all",
) -> Any:
    r"""Diagonal of the Hessian: :math:`d_{oi} = \partial^2 f_o / \partial x_i^2`, exactly.

    Shapes: ``out.shape + x.shape`` for each input ``x`` (in the container of ``inputs``); per
    sample with ``batch_dim``: ``[B] + out_rest + in_rest``. ``mode="auto"`` propagates (value,
    first derivatives) forward through ``func`` and brings the second-order terms born at each
    nonlinear op back to the outputs with one reverse sweep (NOTE [taylor tape]); where the
    batch dimension of an intermediate is unknown it propagates the diagonal itself forward
    (NOTE [taylor mode]). Either way O(B·D) extra memory per activation, never the full Hessian.
    ``"fwd"`` is forward over reverse, ``"rev"`` reverse over reverse (both nested AD, one
    probe per output row and input element). Other arguments as in :func:`jacobian`.

    Example:
        >>> import torch, torchjac as tj
        >>> x = torch.tensor([0.5, 1.0])
        >>> tj.hessian_diagonal(lambda x: x.sin().sum() + x.sum() ** 2, x)  # -sin(x) + 2
        tensor([1.5206, 1.1585])
    """
    if process_group is not None or gather != "all":  # NOTE [split and gather]
        return split_function(hessian_diagonal, "hessian_diagonal", locals())
    return _diagonal_or_trace("hessian_diagonal", "diag", locals())


def laplacian(
    func: Callable[..., Any],
    inputs: Inputs,
    *,
    batch_dim: int | None = None,
    mode: str = "auto",
    has_aux: bool = False,
    chunk_size: int | None = None,
    max_memory: float | str | None = None,
    create_graph: bool = False,
    process_group: Any = None,
    gather: str | bool = "all",
) -> Any:
    r"""Laplacian: :math:`\Delta f_o = \sum_i \partial^2 f_o / \partial x_i^2` over all inputs.

    Shape: ``out.shape`` (a sequence of outputs gives ``[m]``); per sample with ``batch_dim``:
    ``[B] + out_rest``. ``mode="auto"`` propagates (value, first derivatives, Laplacian)
    forward through ``func`` (the forward Laplacian, NOTE [taylor mode]): O(B·D) extra memory.
    ``"fwd"``/``"rev"``: nested AD (forward or reverse over reverse). Other arguments as in
    :func:`jacobian`.

    Example:
        >>> import torch, torchjac as tj
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
        >>> tj.laplacian(lambda x: (x ** 3).sum(-1), x, batch_dim=0)  # 6 (x1 + x2)
        tensor([18., 18.])
    """
    if process_group is not None or gather != "all":  # NOTE [split and gather]
        return split_function(laplacian, "laplacian", locals())
    return _diagonal_or_trace("laplacian", "trace", locals())


def _diagonal_or_trace(fn: str, kind: str, a: dict[str, Any]) -> Any:
    p, mode, chunk_size, budget = setup(
        fn,
        a["func"],
        a["inputs"],
        a["batch_dim"],
        a["mode"],
        a["has_aux"],
        a["chunk_size"],
        a["max_memory"],
        a["create_graph"],
    )
    with running(p):
        check = outputs_check(p)
        flat, t = second_derivatives(p, kind, mode, chunk_size, budget, check)  # [B, R(, D)]
        rows, lead, g = rows_of(p, t), lead_of(p, t), t.in_group
        if kind == "trace":
            return finish(p, t, flat.reshape((*lead, *rows)))
        res = [
            flat[:, :, g.offsets[j] : g.offsets[j] + g.sizes[j]].reshape(
                (*lead, *rows, *in_shape(p, t, j))
            )
            for j in range(len(g.shapes))
        ]
        return finish(p, t, unflatten(p.container, res))
