"""Validation shared by the front doors on the autograd graph (``jac``, ``gramian``).

One place turns ``outputs``/``inputs`` and the options into a validated ``GraphProblem``, so
both doors reject the same bad arguments with the same messages (naming the door).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from torchjac._checks import (
    Container,
    check_batch_dim,
    check_chunk_size,
    check_flag,
    check_mode,
    check_same_device,
    describe,
    flatten_inputs,
    flatten_outputs,
    input_names,
)
from torchjac._engine.core.basis import Group
from torchjac._engine.core.plan import memory_budget
from torchjac._engine.core.structure import reachable
from torchjac._engine.graph.graph_probes import GraphProblem
from torchjac._engine.kernel import kernels
from torchjac._engine.taylor.exact_norms import fused_norm, fused_norms, warn_fused_norms

__all__ = ["GraphCall", "graph_call"]


@dataclass(frozen=True)
class GraphCall:
    """A validated call: the problem, how to shape the answer, and the plan's inputs."""

    problem: GraphProblem
    container: Container
    single: bool
    mode: str
    chunk_size: int | None
    budget: int


def graph_call(
    fn: str,
    outputs: Any,
    inputs: Any,
    jac_outputs: Any,
    *,
    batch_dim: Any,
    mode: Any,
    chunk_size: Any,
    max_memory: Any,
    retain_graph: Any,
    create_graph: Any,
    allow_unused: Any,
    unused_means: str,
    visit: Callable[[Any], None] | None = None,
) -> GraphCall:
    """Validate every argument before any work; ``unused_means`` completes the unused-input fix;
    ``visit`` rides the one walk of the graph made here (on every node, once)."""
    outs, single = flatten_outputs(fn, outputs)
    ins, container = flatten_inputs(fn, inputs, allow_empty=True)  # nothing to compute: no error
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
        if not t.is_floating_point():
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
    budget = memory_budget(fn, max_memory, device)
    counted, used, norms = _walk(outs, ins, create_graph, visit)
    if not allow_unused:
        for name, u in zip(names, used):
            if not u:
                raise ValueError(
                    f"{fn}: the outputs do not depend on {name}. Pass allow_unused=True "
                    f"{unused_means}, or remove it from `inputs`."
                )
    if create_graph:  # NOTE [exact norms]: from the count's walk, or one of its own if cut short
        warn_fused_norms(fn, fused_norms(outs) if norms is None else norms)
    out_group = Group.of(outs, batch_dim)
    problem = GraphProblem(
        fn_name=fn,
        outputs=outs,
        inputs=ins,
        input_names=names,
        used=tuple(used),
        jac_outputs=jos,
        out_group=out_group,
        in_group=Group.of(ins, batch_dim) if ins else Group((), (), out_group.batch_size),
        batch_dim=batch_dim,
        create_graph=create_graph,
        retain_graph=create_graph if retain_graph is None else bool(retain_graph),
        retained=tuple(t for t in (*outs, *ins) if t.retains_grad),
    )
    if counted is not None:  # the planner's count rides this walk (NOTE [loop or vmap on a graph])
        problem.__dict__["counted"] = counted
    return GraphCall(problem, container, single, mode, chunk_size, budget)


def _walk(
    outs: tuple[Tensor, ...],
    ins: tuple[Tensor, ...],
    norms: bool,
    extra: Callable[[Any], None] | None,
) -> tuple[kernels.GraphProducts | None, list[bool], set[str] | None]:
    """One walk of the graph: the planner's count, which inputs the outputs reach (as
    ``structure.reachable``, which runs instead on a graph too big to be counted whole), and with
    ``norms`` the fused normalisations on it (NOTE [exact norms]; ``None`` when cut short)."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        norm = fused_norm(node) if norms else None
        if norm is not None:
            found.add(norm)
        if extra is not None:
            extra(node)

    counted = kernels.graph_products(outs, visit if norms or extra is not None else None)
    if counted.nodes >= kernels.MAX_WALK:
        return None, reachable(outs, ins), None
    leaves = {*counted.leaves, *(id(y) for y in outs if y.grad_fn is None)}  # an output input
    used = [
        id(x) in leaves if x.grad_fn is None else (x.grad_fn, x.output_nr) in counted.edges
        for x in ins
    ]
    return counted, used, found


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
    for i, (a, y) in enumerate(zip(jos, outs)):
        if not isinstance(a, Tensor):
            raise TypeError(f"{fn}: `jac_outputs[{i}]` must be a Tensor, got {describe(a)}.")
        if a.dim() != y.dim() + 1 or a.shape[1:] != y.shape:
            want = f"[k, {', '.join(map(str, y.shape))}]" if y.dim() else "[k]"
            raise ValueError(
                f"{fn}: `jac_outputs` {'' if single else f'[{i}] '}must have shape {want} "
                f"(k rows, then the shape of the output), got {list(a.shape)}."
            )
    ks = [a.shape[0] for a in jos]
    if len(set(ks)) > 1:
        i = next(i for i, k in enumerate(ks) if k != ks[0])
        raise ValueError(
            f"{fn}: every Tensor of `jac_outputs` must have the same number of rows k (its first "
            f"dimension), but jac_outputs[0] has k={ks[0]} (shape {list(jos[0].shape)}) and "
            f"jac_outputs[{i}] has k={ks[i]} (shape {list(jos[i].shape)})."
        )
    return tuple(a.to(device=y.device) for a, y in zip(jos, outs))
