"""``J @ V`` and ``Jᵀ @ U`` on an existing autograd graph, for ``JacobianOperator.from_graph``.

NOTE [operator on a graph]: ``Jᵀ @ U`` is one vectorised backward pass per chunk of ``U``'s
columns (NOTE [vmap over the graph]). ``J @ V`` is a double backward (NOTE [double backward]):
``g(u) = Jᵀ u`` is built once, on the first ``J @ V``, with dummy cotangents ``u`` and
``create_graph=True``, and kept with the operator; each chunk of columns is then one backward
pass of ``g``. Every pass keeps the graph (``retain_graph=True``): the operator holds the
outputs, so the graph lives exactly as long as the operator. Where the backward is not
differentiable (``@once_differentiable``), ``J @ V`` is computed from chunks of rows instead,
``J[r] @ V`` with ``J[r] = (Jᵀ E_r)ᵀ`` (one ``FallbackWarning``). Autograd writes every pass's
gradient into the ``.grad`` of a ``retain_grad()`` output or input: each product gives them their
``.grad`` back as it found it (NOTE [retain_grad]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchjac._engine.core.plan import choose_chunk_size
from torchjac._engine.core.run import run_chunks
from torchjac._engine.graph.graph_columns import DifferentiableCheck
from torchjac._engine.graph.graph_probes import GraphProblem
from torchjac._engine.graph.graph_release import keep_retained_grads
from torchjac._engine.graph.op_products import offsets, per_probe_bytes
from torchjac._errors import fallback_scope, warn_fallback

__all__ = ["GraphSource"]


class GraphSource:
    """Products on the graph of ``problem`` (its outputs all require grad)."""

    def __init__(self, problem: GraphProblem) -> None:
        self.p = problem
        self.fn_name = problem.fn_name
        self.n_rows = problem.out_group.numel
        self.col_sizes = problem.in_group.sizes
        self.dtype, self.device = problem.dtype, problem.device
        self._double: tuple[dict[int, Tensor], list[Tensor], DifferentiableCheck] | None = None

    def chunk(self, k: int, chunk_size: int | None, budget: int) -> int:
        n = sum(self.col_sizes)
        return choose_chunk_size(
            k,
            per_probe_bytes(self.n_rows, n, self.dtype),
            budget,
            chunk_size,
            work_per_probe=self.n_rows + n,
            device=self.device,
        )

    def pull(self, u: Tensor, chunk_size: int | None, budget: int) -> Tensor:
        """``Jᵀ @ U``: ``U [m, k]`` -> ``[n, k]`` (a view of probe-major ``[k, n]`` storage)."""
        p, k = self.p, u.shape[1]
        out = torch.zeros(k, sum(self.col_sizes), dtype=self.dtype, device=self.device)
        ut = u.T.contiguous()
        rows = offsets(p.out_group.sizes)
        cots = [
            ut[:, o : o + y.numel()].reshape(k, *y.shape).to(y.dtype)
            for o, y in zip(rows, p.outputs)
        ]
        cols = offsets(self.col_sizes)

        def probe(start: int, stop: int, batched: bool) -> tuple[Tensor | None, ...]:
            return p.grad(p.outputs, p.inputs, [c[start:stop] for c in cots], batched, False)

        def write(start: int, stop: int, grads: tuple[Tensor | None, ...]) -> None:
            for o, s, g in zip(cols, self.col_sizes, grads):
                if g is not None:
                    out[start:stop, o : o + s] = g.reshape(stop - start, s)

        with fallback_scope(), torch.enable_grad(), keep_retained_grads(self.p.retained):
            run_chunks(self.fn_name, k, self.chunk(k, chunk_size, budget), probe, write)
        return out.T

    def push(self, v: Tensor, chunk_size: int | None, budget: int) -> Tensor:
        """``J @ V``: ``V [n, k]`` -> ``[m, k]`` (NOTE [operator on a graph])."""
        size = self.chunk(v.shape[1], chunk_size, budget)
        with fallback_scope(), torch.enable_grad(), keep_retained_grads(self.p.retained):
            try:
                return self._columns(v, size)
            except RuntimeError as err:
                what = "J @ V by double backward failed, computed from rows"
                warn_fallback(self.fn_name, what, err)
            return self._from_rows(v, chunk_size, budget)

    def _setup(self) -> tuple[dict[int, Tensor], list[Tensor], DifferentiableCheck]:
        if self._double is None:
            p = self.p
            dummies = [torch.zeros_like(y).requires_grad_(True) for y in p.outputs]
            g = torch.autograd.grad(
                p.outputs,
                p.inputs,
                dummies,
                retain_graph=True,
                create_graph=True,
                allow_unused=True,
            )
            trans = {j: gj for j, gj in enumerate(g) if gj is not None}
            for j, gj in trans.items():
                if not gj.requires_grad:
                    raise RuntimeError(f"the backward of {p.input_names[j]} is not differentiable")
            self._double = (trans, dummies, DifferentiableCheck(p, trans, dummies))
        return self._double

    def _columns(self, v: Tensor, size: int) -> Tensor:
        p, k = self.p, v.shape[1]
        out = torch.zeros(k, self.n_rows, dtype=self.dtype, device=self.device)
        trans, dummies, check = self._setup()
        if not trans:
            return out.T
        vt = v.T.contiguous()
        cols = offsets(self.col_sizes)
        tans = {
            j: vt[:, cols[j] : cols[j] + self.col_sizes[j]].reshape(k, *p.inputs[j].shape)
            for j in trans
        }
        rows = offsets(p.out_group.sizes)

        def probe(start: int, stop: int, batched: bool) -> tuple[Tensor | None, ...]:
            chunk = [tans[j][start:stop].to(p.inputs[j].dtype) for j in trans]
            jv = p.grad(list(trans.values()), dummies, chunk, batched, False)
            check(jv)
            return jv

        def write(start: int, stop: int, jv: tuple[Tensor | None, ...]) -> None:
            for o, y, t in zip(rows, p.outputs, jv):
                if t is not None:
                    out[start:stop, o : o + y.numel()] = t.reshape(stop - start, -1)

        run_chunks(self.fn_name, k, size, probe, write)
        return out.T

    def _from_rows(self, v: Tensor, chunk_size: int | None, budget: int) -> Tensor:
        out = torch.empty(self.n_rows, v.shape[1], dtype=self.dtype, device=self.device)
        step = self.chunk(self.n_rows, chunk_size, budget)
        for start in range(0, self.n_rows, step):
            stop = min(self.n_rows, start + step)
            eye = torch.zeros(self.n_rows, stop - start, dtype=self.dtype, device=self.device)
            eye[start:stop].fill_diagonal_(1)
            out[start:stop] = self.pull(eye, chunk_size, budget).T @ v
        return out
