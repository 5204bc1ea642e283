"""Gramians on an autograd graph in one vectorised pass: Linear weights as ghost products.

NOTE [graph ghost]: for a weight ``W`` used once, by ``F.linear`` on a 2-d input ``a`` (the
graph ``AddmmBackward0``/``MmBackward0`` ← ``TBackward0`` ← ``W``; a 3-d input is flattened to 2-d
by ``F.linear`` before the product, so it counts), row ``r`` of ``J_W`` is ``δ_rᵀ a`` with ``δ_r``
the gradient reaching the layer's output. Its Gramian block is then

    (J_W J_Wᵀ)[r, s] = <δ_r, (a aᵀ) δ_s>      (a ``[N, in]``, δ ``[m, N, out]``)

``δ`` is asked of autograd directly, as the gradient of the node's output edge (a
``GradientEdge`` among the inputs of the same vectorised pass that gives the rows of every other
input), so ``W``'s own gradient, ``m·N·out·in`` multiply-adds, is never formed. Nor do the tensor
hooks of ``W`` ever see it: a weight with such hooks (``W.register_hook``, which may change its
gradient) is left to the ordinary rows, which run them. (Hooks on the layer's output or on its
node cannot be seen from the graph; torch itself leaves a tensor's hooks out of the gradient it
captures for that tensor when the tensor's node also runs in the pass.)

NOTE [ghost or rows]: each such weight is taken as a ghost product or as ordinary rows (its
gradient formed in the pass, then ``J_W J_Wᵀ``), whichever the cost model says is cheaper. Both
ride the same pass, so the passes (``⌈m / chunk⌉``, each costing per graph node) are the same and
drop out; what differs is the multiply-adds,

    rows:  m·N·out·in + m²·out·in          ghost: N²·in + m·N²·out + m²·N·out

and the operators: a ghost product takes a few more (``a aᵀ``, ``K δ``, ``δᵀ (K δ)``, the sum,
counted as ``GHOST_EXTRA_OPS``), each ~``plan.LOOP_NODE_S`` on a CPU, which decides tiny layers. A
weight left as rows is still taken through its edge when ``N`` or ``out`` is small
(``ROWS_FROM_DELTA_MAX``): its rows are then one batched product of ``δ``'s transposed view against
a broadcast ``a``, where autograd's weight gradient under vmap is slower for such layers (measured,
with a copy of ``δ`` then one product: 64→512 on N=32, 4 rows, 3.5 against 3.0 ms; 64→64 on N=256,
16 rows, 4.2 against 3.5 ms; larger layers measured even, 0.98-1.01 on W5c's cells, so they keep
autograd's rows). A ghost wins when ``N`` is below ``in`` (wide layers, small batches) or ``m`` is
large; measured on the sweep of ``benchmarks/w5_sweep.py`` (W5c). Everything is held at once (``δ``
of every ghost and the rows of every other input); when that does not fit half the memory budget, or
a pass with edges is not possible, the block-by-block path of NOTE [gramian blocks] runs instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.core import fast
from torchjac._engine.core.lean_vmap import batch_way, vmap_first
from torchjac._engine.core.plan import LOOP_NODE_S, MAC_S, choose_graph_chunk_size
from torchjac._engine.core.run import FinalError, run_chunks
from torchjac._engine.graph.graph_probes import GraphProblem, freed_message
from torchjac._engine.kernel import kernels

__all__ = ["Consumers", "GhostLayer", "find_ghost_layers", "ghost_gramian", "ghost_is_cheaper"]

_LINEAR = {"AddmmBackward0": 2, "MmBackward0": 1}  # node name -> position of the weight edge
GHOST_EXTRA_OPS = 5  # NOTE [ghost or rows]
ROWS_FROM_DELTA_MAX = 64  # NOTE [ghost or rows]: rows from δ when N or out is at most this
_EDGE = getattr(torch.autograd.graph, "GradientEdge", None)


@dataclass(frozen=True)
class GhostLayer:
    """Input ``j`` is the weight of a linear node ``node`` whose saved input is ``a``; its block
    is a ghost product, or (``ghost=False``) its rows ``δ_rᵀ a``, made here from ``δ`` in one
    product (NOTE [ghost or rows])."""

    j: int
    node: Any
    a: Tensor
    ghost: bool = True


def ghost_is_cheaper(m: int, n: int, out: int, inp: int) -> bool:
    """NOTE [ghost or rows]: ``m`` rows, a layer ``in -> out`` applied to ``n`` rows of input."""
    rows = (m * n * out * inp + m * m * out * inp) * MAC_S + LOOP_NODE_S
    ghost = (n * n * inp + m * n * n * out + m * m * n * out) * MAC_S
    return ghost + GHOST_EXTRA_OPS * LOOP_NODE_S < rows


@dataclass
class Consumers:
    """Each node's consumers in a graph, from one walk (``visit`` on every node): how many, the
    last seen with its edge position, and the ``AccumulateGrad`` node of each leaf. Nodes are
    keyed by themselves (NOTE [node identity] in structure.py), leaves by ``id`` (alive)."""

    indeg: dict[Any, int] = field(default_factory=dict)
    consumer: dict[Any, tuple[Any, int]] = field(default_factory=dict)
    accs: dict[int, Any] = field(default_factory=dict)

    def visit(self, node: Any) -> None:
        variable = getattr(node, "variable", None)
        if variable is not None:
            self.accs[id(variable)] = node
        indeg, consumer = self.indeg, self.consumer
        for pos, (child, _) in enumerate(node.next_functions):
            if child is not None:
                indeg[child] = indeg.get(child, 0) + 1
                consumer[child] = (node, pos)


def find_ghost_layers(
    p: GraphProblem,
    cheaper: Callable[[int, int, int, int], bool] | None = None,
    walked: Consumers | None = None,
) -> list[GhostLayer]:
    """The weights of ``p`` whose Gramian blocks are cheaper as ghost products (NOTE above), by
    ``cheaper(m, N, out, in)`` (default ``ghost_is_cheaper``); none with the fast paths off.
    ``walked``: the consumers, collected by the walk that set ``p.counted`` (else walked here)."""
    if _EDGE is None or not fast.enabled():
        return []
    cheaper = ghost_is_cheaper if cheaper is None else cheaper
    if not any(x.dim() == 2 for x in p.inputs):
        return []
    if walked is None:
        walked = Consumers()
        p.walk(walked.visit)  # the planner's walk (NOTE [loop or vmap on a graph]), made once
    indeg, consumer, accs = walked.indeg, walked.consumer, walked.accs
    if p.counted.nodes >= kernels.MAX_WALK:
        return []  # a graph too big to have been walked whole
    counts: dict[int, int] = {}
    for x in p.inputs:
        counts[id(x)] = counts.get(id(x), 0) + 1
    found = []
    for j, w in enumerate(p.inputs):
        acc = accs.get(id(w))
        if not p.used[j] or w.dim() != 2 or counts[id(w)] > 1 or acc is None:
            continue
        if w._backward_hooks:  # NOTE [graph ghost]: its hooks would never see its gradient
            continue
        if indeg.get(acc) != 1:
            continue
        t_node, _ = consumer[acc]
        if type(t_node).__name__ != "TBackward0" or indeg.get(t_node) != 1:
            continue
        node, pos = consumer[t_node]
        if _LINEAR.get(type(node).__name__) != pos or getattr(node, "_saved_alpha", 1) != 1:
            continue
        if not _nameable(node):  # not a node an edge can name
            continue
        try:
            a = node._saved_mat1 if pos == 2 else node._saved_self
        except RuntimeError:  # freed by an earlier backward: the ordinary path will say so
            continue
        if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[1] != w.shape[1]:
            continue
        ghost = cheaper(p.n_rows, a.shape[0], w.shape[0], w.shape[1])
        if ghost or min(a.shape[0], w.shape[0]) <= ROWS_FROM_DELTA_MAX:
            found.append(GhostLayer(j, node, a, ghost))
    return found


def ghost_gramian(
    p: GraphProblem,
    ghosts: list[GhostLayer],
    chunk_size: int | None,
    budget: int,
    free: tuple[bool, list[bool]] = (False, []),
) -> Tensor | None:
    """``[1, m, m]`` from one vectorised pass (rows of the other inputs, ``δ`` of the ghosts), or
    ``None`` when it does not fit half of ``budget`` or edges cannot be asked for.

    ``free``: (whether the graph is to be freed, a list to append ``True`` to once this pass has
    freed it), NOTE [one pass frees]; a ghost's node must then run in the pass (its bias is one
    of the inputs), else the pass stops at its edge and leaves it unfreed."""
    if _EDGE is None:
        return None
    ghosted = {g.j for g in ghosts}
    rest = [j for j, u in enumerate(p.used) if u and j not in ghosted]
    if not rest and not ghosts:  # nothing used: the general path's zeros
        return None
    m, dtype, device = p.n_rows, p.dtype, p.device
    shapes = [p.inputs[j].shape for j in rest]
    shapes += [torch.Size((g.a.shape[0], p.inputs[g.j].shape[0])) for g in ghosts]
    per_row = sum(math.prod(s) for s in shapes)
    big = max(
        (
            g.a.shape[0] ** 2
            + m * p.inputs[g.j].numel()
            + m * g.a.shape[0] * p.inputs[g.j].shape[0]
            for g in ghosts
        ),
        default=0,
    )
    if (m * per_row + 2 * big) * dtype.itemsize > budget // 2:
        return None
    targets: list[Any] = [p.inputs[j] for j in rest] + [_EDGE(g.node, 0) for g in ghosts]
    store: list[Tensor | None] = [None] * len(targets)
    counted = p.counted
    chunk = choose_graph_chunk_size(
        m,
        4 * per_row * dtype.itemsize,
        budget // 2,
        chunk_size,
        nodes=counted.nodes,
        macs=2 * counted.macs,
        products=2 * counted.products,
        device=device,
    )

    rest_ids = {id(p.inputs[j]) for j in rest}
    way = batch_way(p.outputs)  # NOTE [wrong batching rules]: other than functorch's, a loop
    freeing = (
        free[0]
        and way == "functorch"
        and not p.create_graph
        and counted.builtin
        and chunk >= max(m, 2)
        and all(
            id(getattr(g.node.next_functions[0][0], "variable", None)) in rest_ids for g in ghosts
        )
    )

    def probe(start: int, stop: int, batched: bool) -> list[Tensor]:
        basis = p.out_group.one_hot(start, stop, dtype, device)
        sel = [i for i, b in enumerate(basis) if b is not None]
        outs = [p.outputs[i] for i in sel]
        cots = [basis[i].to(p.outputs[i].dtype) for i in sel]  # type: ignore[union-attr]
        for t in p.retained:  # NOTE [retain_grad]: a pass never adds to an earlier one's
            t.grad = None

        def one(*c: Tensor) -> list[Tensor]:
            keep = not freeing
            grads = torch.autograd.grad(outs, targets, list(c), keep, False, allow_unused=True)
            return [
                torch.zeros(s, dtype=dtype, device=device) if g is None else g
                for g, s in zip(grads, shapes)
            ]

        if not freeing:
            return _pass(one, cots, batched and way == "functorch")
        try:
            return _pass(one, cots, batched)
        except TypeError:  # a torch whose autograd.grad takes no edges
            raise
        except Exception as err:  # NOTE [one pass frees]: final, never retried as a loop
            raise FinalError(freed_message(p.fn_name, err)) from err

    def write(start: int, stop: int, grads: list[Tensor]) -> None:
        for k, g in enumerate(grads):
            if start == 0 and stop == m:
                store[k] = g  # one pass made every row: it is the storage
                continue
            target = store[k]
            if target is None:
                target = store[k] = torch.empty((m, *shapes[k]), dtype=dtype, device=device)
            target[start:stop] = g

    try:
        run_chunks(p.fn_name, m, chunk, probe, write)
    except TypeError:  # a torch whose autograd.grad takes no edges: the general path
        if freeing:
            raise
        return None
    except Exception as err:
        if freeing and not isinstance(err, FinalError):  # NOTE [one pass frees]
            raise RuntimeError(freed_message(p.fn_name, err)) from err
        raise
    if freeing:
        free[1].append(True)
    gram = torch.zeros(m, m, dtype=dtype, device=device)
    for g in store[: len(rest)]:
        r = _row_matrix(g.to(dtype))  # type: ignore[union-attr]
        gram.addmm_(r, r.T)
    for layer, d in zip(ghosts, store[len(rest) :]):
        assert d is not None
        a = layer.a.detach().to(dtype)
        if layer.ghost:
            gram += _ghost_block(a, d.to(dtype))
        else:
            r = _rows_from_delta(a, d.to(dtype))
            gram.addmm_(r, r.T)
    return gram.unsqueeze(0)


def _nameable(node: Any) -> bool:
    return isinstance(node, torch.autograd.graph.Node)


def _ghost_block(a: Tensor, d: Tensor) -> Tensor:
    """``G[r, s] = <δ_r, (a aᵀ) δ_s>`` for ``a [N, in]``, ``δ [m, N, out]``: NOTE [graph ghost].

    ``K δ_s`` for every ``s`` is one batched product against a broadcast ``K = a aᵀ``, in
    ``δ``'s own layout, so ``δ`` is never copied (a transposed copy for one ``[m·out, N]``
    product measured 1.4x slower: 3.4 against 2.3 ms for m=16, N=128, 256→256)."""
    m, n, out = d.shape
    k = a @ a.T  # [N, N]
    t = torch.bmm(k.expand(m, n, n), d)  # [m, N, out]: (K δ_s)
    return d.reshape(m, n * out) @ t.view(m, n * out).T


def _rows_from_delta(a: Tensor, d: Tensor) -> Tensor:
    """The rows ``δ_rᵀ a`` of a Linear weight, ``[m, out·in]``: one batched product of ``δ``'s
    transposed view against a broadcast ``a`` (no copy of ``δ``; a copy to ``[m·out, N]`` for
    one product measured 1.6-1.9x slower)."""
    m, n, out = d.shape
    return torch.bmm(d.transpose(1, 2), a.expand(m, n, a.shape[1])).view(m, out * a.shape[1])


def _pass(one: Callable[..., list[Tensor]], cots: list[Tensor], batched: bool) -> list[Tensor]:
    """One pass of ``one`` over the cotangents: vectorised over their first dimension, or one
    probe at a time."""
    if batched:
        return list(vmap_first(one)(*cots))
    rows = [one(*[c[i] for c in cots]) for i in range(cots[0].shape[0])]
    return [torch.stack(g) for g in zip(*rows)]


def _row_matrix(g: Tensor) -> Tensor:
    """``[m, *shape]`` -> ``[m, n]``, a view when the trailing dimensions are only permuted: the
    Gramian ``R Rᵀ`` does not depend on the order of the columns."""
    order = sorted(range(1, g.dim()), key=lambda i: -g.stride()[i])
    return g.permute(0, *order).reshape(g.shape[0], -1)
