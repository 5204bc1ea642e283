"""``jac``: Jacobians of tensors already on the autograd graph."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torchjac._checks import (
    check_batch_dim,
    check_chunk_size,
    check_flag,
    check_mode,
    check_same_device,
    describe,
    flatten_inputs,
    flatten_outputs,
    input_names,
    unflatten,
)
from torchjac._engine.basis import Group
from torchjac._engine.graph_probes import GraphProblem, solve
from torchjac._engine.plan import memory_budget
from torchjac._engine.structure import reachable

__all__ = ["jac"]


def jac(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Iterable[Tensor] | Mapping[str, Tensor],
    jac_outputs: Tensor | Sequence[Tensor] | None = None,
    *,
    batch_dim: int | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
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
            grad.
        jac_outputs: left factor, ``[k] + outputs.shape`` (see above). Default: the identity.
        batch_dim: the batch dimension shared by all outputs and inputs; samples must be
            independent, which is checked (one backward pass): ``BatchCouplingError`` otherwise.
        mode: ``"auto"`` (fewest probes; a column on a graph costs a double backward),
            ``"rev"`` (rows, vector-Jacobian products) or ``"fwd"`` (columns).
        chunk_size: probes per vectorised pass; ``1`` is a plain loop. Default: chosen from
            ``max_memory``.
        max_memory: bytes (int) or a string like ``"512MiB"``; default: a quarter of the free
            memory of the device.
        retain_graph: keep the graph of ``outputs`` for later use; default ``create_graph``.
            ``False`` lets torchjac free the graph on its last pass; it does so when the rows
            take several passes or a loop, otherwise the graph goes with the outputs.
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
    """
    fn = "jac"
    outs, single = flatten_outputs(fn, outputs)
    ins, container = flatten_inputs(fn, inputs)
    names = input_names(container, len(ins))
    out_names = ("outputs",) if single else tuple(f"outputs[{i}]" for i in range(len(outs)))
    mode = check_mode(fn, mode)
    chunk_size = check_chunk_size(fn, chunk_size)
    create_graph = bool(check_flag(fn, "create_graph", create_graph))
    allow_unused = bool(check_flag(fn, "allow_unused", allow_unused))
    retain_graph = check_flag(fn, "retain_graph", retain_graph, allow_none=True)
    named = list(zip(out_names, outs)) + list(zip(names, ins))
    device = check_same_device(fn, named)
    for name, t in named:
        if not (t.is_floating_point() or t.is_complex()) or t.is_complex():
            raise TypeError(f"{fn}: {name} must have a real floating dtype, got {describe(t)}.")
    for name, y in zip(out_names, outs):
        if not y.requires_grad:
            raise ValueError(
                f"{fn}: {name} is not on the autograd graph (requires_grad=False). Compute it "
                "from tensors that require grad, outside torch.no_grad()."
            )
    for name, x in zip(names, ins):
        if not x.requires_grad:
            raise ValueError(
                f"{fn}: {name} does not require grad. Call x.requires_grad_() before computing "
                "the outputs from it."
            )
    batch_dim, _ = check_batch_dim(fn, batch_dim, named)
    jos = _check_jac_outputs(fn, jac_outputs, outs, single)
    used = reachable(outs, ins)
    if not allow_unused:
        for name, u in zip(names, used):
            if not u:
                raise ValueError(
                    f"{fn}: the outputs do not depend on {name}. Pass allow_unused=True to get "
                    "zeros for it, or remove it from `inputs`."
                )
    problem = GraphProblem(
        fn_name=fn,
        outputs=outs,
        inputs=ins,
        input_names=names,
        used=tuple(used),
        jac_outputs=jos,
        out_group=Group.of(outs, batch_dim),
        in_group=Group.of(ins, batch_dim),
        batch_dim=batch_dim,
        create_graph=create_graph,
        retain_graph=create_graph if retain_graph is None else bool(retain_graph),
    )
    # create_graph=True under torch.no_grad(): differentiable, as with torch.autograd.grad
    with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
        flat = solve(problem, mode, chunk_size, memory_budget(fn, max_memory, device))
        return unflatten(container, [_shape(problem, j, r, single) for j, r in enumerate(flat)])


def _check_jac_outputs(
    fn: str, jac_outputs: Any, outs: tuple[Tensor, ...], single: bool
) -> tuple[Tensor, ...] | None:
    if jac_outputs is None:
        return None
    if isinstance(jac_outputs, Tensor):
        jos: tuple[Any, ...] = (jac_outputs,)
    elif isinstance(jac_outputs, Sequence) and not isinstance(jac_outputs, str):
        jos = tuple(jac_outputs)
    else:
        raise TypeError(
            f"{fn}: `jac_outputs` must be a Tensor or a sequence of Tensors like `outputs`, got "
            f"{describe(jac_outputs)}."
        )
    if len(jos) != len(outs):
        raise ValueError(
            f"{fn}: `jac_outputs` must have one Tensor per output ({len(outs)}), got {len(jos)}."
        )
    k = None
    for i, (a, y) in enumerate(zip(jos, outs)):
        if not isinstance(a, Tensor):
            raise TypeError(f"{fn}: `jac_outputs[{i}]` must be a Tensor, got {describe(a)}.")
        if a.dim() != y.dim() + 1 or a.shape[1:] != y.shape or (k is not None and a.shape[0] != k):
            want = f"[k, {', '.join(map(str, y.shape))}]" if y.dim() else "[k]"
            raise ValueError(
                f"{fn}: `jac_outputs` {'' if single else f'[{i}] '}must have shape {want} "
                f"(k rows, then the shape of the output), with the same k for every output; "
                f"got {list(a.shape)}."
            )
        k = a.shape[0]
    return tuple(a.to(device=y.device) for a, y in zip(jos, outs))


def _shape(problem: GraphProblem, j: int, res: Tensor, single: bool) -> Tensor:
    """``[B, R, n_j]`` -> the public layout (see ``jac``'s docstring)."""
    g_out, g_in = problem.out_group, problem.in_group
    if problem.jac_outputs is not None:
        rows: tuple[int, ...] = (res.shape[1],)
    elif single:
        rows = tuple(g_out.rest_shape(0))
    else:
        rows = (g_out.numel,)
    if problem.batch_dim is None:
        return res.reshape((*rows, *g_in.shapes[j]))  # () when both are 0-d
    return res.reshape(g_in.batch_size, *rows, *g_in.rest_shape(j))
