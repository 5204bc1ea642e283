"""Ghost products on an autograd graph: the Gramian block of a Linear weight without its rows.

NOTE [graph ghost]: for a weight ``W`` used once, by ``F.linear`` on a 2-d input ``a`` (the
graph ``AddmmBackward0``/``MmBackward0`` ← ``TBackward0`` ← ``W``), row ``r`` of ``J_W`` is
``δ_rᵀ a`` with ``δ_r`` the gradient reaching the layer's output. Its Gramian block is then

    (J_W J_Wᵀ)[r, s] = <δ_r, (a aᵀ) δ_s>      (a ``[N, in]``, δ ``[m, N, out]``)

which costs ``N²·(m·out + in)`` instead of ``m·N·out·in`` for the rows plus ``m²·out·in`` for
their products. ``δ_r`` is read by a pre-hook on the layer's backward node while the rows of the
other inputs are computed (one backward pass per row), and ``W`` is left out of those passes, so
autograd never forms its gradient. It applies when the graph proves the single use, ``a`` is
saved on the node, the node lies on the path to another input (so that it runs), and the
products are cheaper; otherwise the ordinary blocks are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.graph_probes import GraphProblem

__all__ = ["GhostLayer", "find_ghost_layers", "ghost_gramian"]

_LINEAR = {"AddmmBackward0": 2, "MmBackward0": 1}  # node name -> position of the weight edge
# Rows are probed one backward pass at a time (hooks cannot read δ inside vmap); beyond this many
# rows the vectorised ordinary path is preferred.
GHOST_MAX_ROWS = 64


@dataclass(frozen=True)
class GhostLayer:
    """Input ``j`` is the weight of a linear node ``node`` whose saved input is ``a``."""

    j: int
    node: Any
    a: Tensor


def find_ghost_layers(p: GraphProblem) -> list[GhostLayer]:
    """The weights of ``p`` whose Gramian blocks are cheaper as ghost products (NOTE above)."""
    # nodes keyed by themselves (NOTE [node identity] in structure.py); leaves by id (alive)
    indeg: dict[Any, int] = {}
    consumer: dict[Any, tuple[Any, int]] = {}
    accs: dict[int, Any] = {}
    seen: set[Any] = set()
    stack = [y.grad_fn for y in p.outputs if y.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            accs[id(variable)] = node
        for pos, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            indeg[child] = indeg.get(child, 0) + 1
            consumer[child] = (node, pos)
            stack.append(child)
    m = p.n_rows
    if m > GHOST_MAX_ROWS:
        return []
    counts: dict[int, int] = {}
    for x in p.inputs:
        counts[id(x)] = counts.get(id(x), 0) + 1
    found = []
    for j, w in enumerate(p.inputs):
        acc = accs.get(id(w))
        if not p.used[j] or w.dim() != 2 or counts[id(w)] > 1 or acc is None:
            continue
        if indeg.get(acc) != 1:
            continue
        t_node, _ = consumer[acc]
        if type(t_node).__name__ != "TBackward0" or indeg.get(t_node) != 1:
            continue
        node, pos = consumer[t_node]
        if _LINEAR.get(type(node).__name__) != pos or getattr(node, "_saved_alpha", 1) != 1:
            continue
        try:
            a = node._saved_mat1 if pos == 2 else node._saved_self
        except RuntimeError:  # freed by an earlier backward: the ordinary path will say so
            continue
        if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[1] != w.shape[1]:
            continue
        n, out, inp = a.shape[0], w.shape[0], w.shape[1]
        if n * n * (m * out + inp) < m * n * out * inp + m * m * out * inp:
            found.append(GhostLayer(j, node, a))
    return found


def ghost_gramian(p: GraphProblem, ghosts: list[GhostLayer], budget: int) -> Tensor | None:
    """``[1, m, m]`` with the ghost layers' blocks as products, or ``None`` when not applicable."""
    ghosted = {g.j for g in ghosts}
    rest = [j for j, u in enumerate(p.used) if u and j not in ghosted]
    if not rest or not all(_reaches(g.node, [p.inputs[j] for j in rest]) for g in ghosts):
        return None
    m, dtype, device = p.n_rows, p.dtype, p.device
    held = m * sum(p.in_group.sizes[j] for j in rest)
    held += sum(m * g.a.shape[0] * p.inputs[g.j].shape[0] for g in ghosts)  # δ
    held += max(n * n + m * n * p.inputs[g.j].shape[0] for g in ghosts for n in [g.a.shape[0]])
    if held * dtype.itemsize > budget // 2:
        return None
    rows = [torch.empty(m, p.in_group.sizes[j], dtype=dtype, device=device) for j in rest]
    deltas = [
        torch.zeros(m, g.a.shape[0], p.inputs[g.j].shape[0], dtype=dtype, device=device)
        for g in ghosts
    ]
    current = [0]

    def hook_for(k: int) -> Any:
        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            if grad_outputs[0] is not None:
                deltas[k][current[0]] = grad_outputs[0]

        return hook

    handles = [g.node.register_prehook(hook_for(k)) for k, g in enumerate(ghosts)]
    try:
        for r in range(m):
            current[0] = r
            basis = p.out_group.one_hot(r, r + 1, dtype, device)
            sel = [i for i, b in enumerate(basis) if b is not None]
            grads = torch.autograd.grad(
                [p.outputs[i] for i in sel],
                [p.inputs[j] for j in rest],
                [basis[i][0].to(p.outputs[i].dtype) for i in sel],  # type: ignore[index]
                retain_graph=p.retain_graph or r < m - 1,
                allow_unused=True,
            )
            for store, g in zip(rows, grads):
                if g is None:
                    store[r] = 0
                else:
                    store[r] = g.reshape(-1)
    finally:
        for h in handles:
            h.remove()
    gram = sum((blk @ blk.T for blk in rows), torch.zeros(m, m, dtype=dtype, device=device))
    for layer, d in zip(ghosts, deltas):
        a = layer.a.detach().to(dtype)
        t = (a @ a.T) @ d  # [m, N, out]
        gram = gram + d.reshape(m, -1) @ t.reshape(m, -1).T
    return gram.unsqueeze(0)


def _reaches(node: Any, targets: list[Tensor]) -> bool:
    """Whether a backward pass through ``node`` continues to one of ``targets``."""
    leaves = {id(t) for t in targets if t.grad_fn is None}
    nodes = {(t.grad_fn, t.output_nr) for t in targets if t.grad_fn is not None}
    seen: set[Any] = set()  # the nodes themselves: NOTE [node identity] in structure.py
    stack = [(c, nr) for c, nr in node.next_functions if c is not None]
    while stack:
        child, nr = stack.pop()
        if (child, nr) in nodes or id(getattr(child, "variable", None)) in leaves:
            return True
        if child in seen:
            continue
        seen.add(child)
        stack.extend((c, k) for c, k in child.next_functions if c is not None)
    return False
