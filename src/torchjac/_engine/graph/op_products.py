"""Jacobian products without the Jacobian: ``J @ V`` and ``Jᵀ @ U`` for ``JacobianOperator``.

NOTE [operator products]: the rows of the operator come from *pieces*, evaluations of one
function of the column tensors (the user's function on its inputs, or the model on one batch of
data; rows stacked over the pieces in order). ``J @ V`` is forward mode: per piece,
``torch.func.jvp`` of the evaluation, vmapped over a chunk of ``V``'s columns (the tangents are
views of ``V``, reshaped to each column tensor), one pass per chunk. ``Jᵀ @ U`` is reverse mode:
per piece, one forward pass with autograd, then one vectorised backward pass per chunk of
``U``'s columns on that graph (NOTE [vmap over the graph]), summed over the pieces; a piece whose
block of ``U`` is zero is skipped. So over a data set a product costs one pass per batch and
chunk, never a second forward per batch, and its memory is one pass times a chunk: ``J`` is
never formed. Chunks come from ``plan.choose_chunk_size`` (``1`` is a loop with no vmap) and a
failing vectorised chunk is redone as a loop (NOTE [fallback]). Where forward mode cannot follow
the function (an ``autograd.Function`` without ``jvp``), ``J @ V`` is a double backward on the
piece's graph instead (NOTE [double backward]), with one ``FallbackWarning``; where that fails
too (``embedding_bag``'s backward is not differentiable), the rows of ``J``, a chunk at a time
by reverse mode, each chunk multiplied by ``V``. Both products
run the pieces with the math attention kernel (NOTE [fused attention]): the fused kernels have
neither forward mode nor a double backward, and one kernel for both keeps one random draw.

NOTE [operator draw]: every evaluation of a piece starts from the RNG state recorded for it when
the operator was built (``Draw``), so a model that draws (dropout in train mode) gives one fixed
matrix: ``J @ v`` and ``Jᵀ @ u`` are products with the same ``J`` at every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import Tensor

from torchjac._engine.core.attention import math_attention
from torchjac._engine.core.func_call import forward_jvp
from torchjac._engine.core.lean_vmap import batched_grad
from torchjac._engine.core.plan import choose_chunk_size
from torchjac._engine.core.run import run_chunks
from torchjac._errors import fallback_scope, warn_fallback

__all__ = ["CallSource", "Draw", "Piece", "offsets", "per_probe_bytes"]


@dataclass(frozen=True)
class Draw:
    """The global RNG state (CPU, the CUDA device in use) at one point (NOTE [operator draw])."""

    cpu: Tensor
    cuda: tuple[tuple[int, Tensor], ...]

    @staticmethod
    def take(device: torch.device) -> Draw:
        cuda = (device.index or 0,) if device.type == "cuda" else ()
        return Draw(torch.get_rng_state(), tuple((d, torch.cuda.get_rng_state(d)) for d in cuda))

    def apply(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


@dataclass(frozen=True)
class Piece:
    """One evaluation: ``call(*columns)`` returns the output tensors of ``shapes``."""

    call: Callable[..., tuple[Tensor, ...]]
    shapes: tuple[torch.Size, ...]
    draw: Draw | None

    def __call__(self, *columns: Tensor) -> tuple[Tensor, ...]:
        if self.draw is not None:
            self.draw.apply()
        return self.call(*columns)


def offsets(sizes: tuple[int, ...]) -> list[int]:
    out, acc = [], 0
    for s in sizes:
        out.append(acc)
        acc += s
    return out


def per_probe_bytes(n_rows: int, n_cols: int, dtype: torch.dtype) -> int:
    """A generous guess of one probe's memory (intermediates are unknown, as in func_probes)."""
    return 16 * (n_rows + n_cols) * dtype.itemsize


# opens one product: (the primal column tensors, the pieces in row order); restores on exit
Opener = Callable[[], AbstractContextManager[tuple[tuple[Tensor, ...], Iterator[Piece]]]]


@dataclass(frozen=True)
class CallSource:
    """Rows from pieces (NOTE [operator products]); columns are the primal tensors' elements."""

    fn_name: str
    col_shapes: tuple[torch.Size, ...]
    n_rows: int
    dtype: torch.dtype
    device: torch.device
    open: Opener

    @property
    def col_sizes(self) -> tuple[int, ...]:
        return tuple(s.numel() for s in self.col_shapes)

    def chunk(self, k: int, rows: int, chunk_size: int | None, budget: int, fwd: bool) -> int:
        """Columns per pass. NOTE [loop or vmap]'s loop for a few large probes is for reverse
        mode only: ``vmap(jvp)`` measured faster than a loop of ``jvp`` on W5's trunk (W8a)."""
        n = sum(self.col_sizes)
        return choose_chunk_size(
            k,
            per_probe_bytes(rows, n, self.dtype),
            budget,
            chunk_size,
            work_per_probe=0 if fwd else rows + n,
            device=self.device,
        )

    def push(self, v: Tensor, chunk_size: int | None, budget: int) -> Tensor:
        """``J @ V``: ``V [n, k]`` -> ``[m, k]`` (a view of probe-major ``[k, m]`` storage)."""
        k = v.shape[1]
        out = torch.empty(k, self.n_rows, dtype=self.dtype, device=self.device)
        cols = offsets(self.col_sizes)
        with fallback_scope(), math_attention(), self.open() as (leaves, pieces):
            # plain tensors: jvp on primals requiring grad ran 20-30% slower (W8a), even in no_grad
            primals = tuple(x.detach() for x in leaves)
            # [*shape, k]: views of V's rows, the columns last (vmapped over in_dims=-1), so no
            # transposed copy of V is made before the passes (W8a)
            tans = [
                v[o : o + s].reshape(*shape, k).to(x.dtype)
                for o, s, shape, x in zip(cols, self.col_sizes, self.col_shapes, primals)
            ]
            row = 0
            for piece in pieces:
                rows = sum(s.numel() for s in piece.shapes)
                size = self.chunk(k, rows, chunk_size, budget, True)
                with torch.no_grad():
                    self._push_piece(piece, primals, tans, out[:, row : row + rows], size)
                row += rows
        return out.T

    def _push_piece(
        self, piece: Piece, primals: tuple[Tensor, ...], tans: list[Tensor], out: Tensor, size: int
    ) -> None:
        row_offs = offsets(tuple(s.numel() for s in piece.shapes))

        def jvp(*tangents: Tensor) -> tuple[Tensor, ...]:
            return tuple(forward_jvp(piece, primals, tangents)[1])

        def probe(start: int, stop: int, batched: bool) -> tuple[Tensor, ...]:
            if batched:  # NOTE [operator draw]: one draw for every column of the chunk
                vm = torch.func.vmap(jvp, in_dims=-1, randomness="same")
                return tuple(vm(*(t[..., start:stop] for t in tans)))
            return tuple(y.unsqueeze(0) for y in jvp(*(t[..., start] for t in tans)))

        def write(start: int, stop: int, ys: tuple[Tensor, ...]) -> None:
            for o, y in zip(row_offs, ys):
                flat = y.reshape(stop - start, -1)
                out[start:stop, o : o + flat.shape[1]] = flat

        try:
            run_chunks(self.fn_name, out.shape[0], size, probe, write)
        except (RuntimeError, NotImplementedError) as err:
            if not _no_forward_ad(err):
                raise
            try:
                self._push_double_backward(piece, primals, tans, out, size)
            except (RuntimeError, NotImplementedError) as again:
                if not _no_double_backward(again):
                    raise
                how = "forward-mode AD and double backward failed, J @ V by rows of J"
                warn_fallback(self.fn_name, how, again)
                self._push_by_rows(piece, primals, tans, out, size)
            else:
                how = "forward-mode AD failed, J @ V by double backward"
                warn_fallback(self.fn_name, how, err)

    def _push_double_backward(
        self, piece: Piece, primals: tuple[Tensor, ...], tans: list[Tensor], out: Tensor, size: int
    ) -> None:
        """NOTE [double backward]: ``J v = d/du <Jᵀ u, v>`` on the piece's graph."""
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_(True) for p in primals)
            ys = piece(*leaves)
            live = [y for y in ys if y.requires_grad]
            dummies = [torch.zeros_like(y).requires_grad_(True) for y in live]
            g = torch.autograd.grad(live, leaves, dummies, create_graph=True, allow_unused=True)
            pairs = [(gj, t) for gj, t in zip(g, tans) if gj is not None and gj.requires_grad]
            out.zero_()
            if not pairs:
                return
            lives = {id(y) for y in live}
            for j in range(0, out.shape[0], size):
                stop = min(out.shape[0], j + size)
                res = batched_grad(
                    [gj for gj, _ in pairs],
                    dummies,
                    [t[..., j:stop].movedim(-1, 0) for _, t in pairs],
                    True,
                    False,
                )
                it = iter(res)
                for o, y in zip(offsets(tuple(y.numel() for y in ys)), ys):
                    r = next(it) if id(y) in lives else None
                    if r is not None:
                        out[j:stop, o : o + y.numel()] = r.reshape(stop - j, -1)

    def _push_by_rows(
        self, piece: Piece, primals: tuple[Tensor, ...], tans: list[Tensor], out: Tensor, size: int
    ) -> None:
        """``J V`` from the piece's rows of ``J``, a chunk of ``size`` rows at a time (reverse
        mode, one-hot cotangents): an op with neither forward mode nor a double backward
        (``embedding_bag``). Memory: a chunk of rows, never the piece's whole ``J``."""
        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_(True) for p in primals)
            ys = piece(*leaves)
        k = out.shape[0]
        v = torch.cat([t.reshape(-1, k) for t in tans]).to(out.dtype)  # [n, k]
        offs = offsets(tuple(y.numel() for y in ys))
        live = [i for i, y in enumerate(ys) if y.requires_grad]
        rows = out.shape[1]
        out.zero_()
        if not live:
            return

        def probe(start: int, stop: int, batched: bool) -> Tensor:
            c = stop - start
            eye = torch.zeros(c, rows, dtype=ys[live[0]].dtype, device=out.device)
            eye[torch.arange(c), torch.arange(start, stop)] = 1
            cots = [
                eye[:, offs[i] : offs[i] + ys[i].numel()].reshape(c, *ys[i].shape) for i in live
            ]
            outs = [ys[i] for i in live]
            if batched:
                grads = batched_grad(outs, list(leaves), cots, True, False)
            else:
                one = [torch.autograd.grad(outs, leaves, [t[j] for t in cots], retain_graph=True,
                                           allow_unused=True) for j in range(c)]  # fmt: skip
                grads = tuple(None if g[0] is None else torch.stack(g) for g in zip(*one))
            j = torch.cat(
                [
                    torch.zeros(c, x.numel(), dtype=out.dtype, device=out.device)
                    if g is None
                    else g.reshape(c, -1).to(out.dtype)
                    for g, x in zip(grads, leaves)
                ],
                dim=1,
            )
            return j @ v  # [c, k]

        def write(start: int, stop: int, jv: Tensor) -> None:
            out[:, start:stop] = jv.T

        run_chunks(self.fn_name, rows, size, probe, write)

    def pull(self, u: Tensor, chunk_size: int | None, budget: int) -> Tensor:
        """``Jᵀ @ U``: ``U [m, k]`` -> ``[n, k]``, summed over the pieces (a view of probe-major
        ``[k, n]`` storage: each probe's gradients are written contiguously)."""
        k = u.shape[1]
        ut = u.T.contiguous()  # [k, m]
        out = torch.empty(k, sum(self.col_sizes), dtype=self.dtype, device=self.device)
        cols = offsets(self.col_sizes)
        fresh = [True] * len(cols)  # no piece has written column tensor j yet: copy, not add
        with fallback_scope(), math_attention(), self.open() as (primals, pieces):
            leaves = tuple(
                p if p.requires_grad and p.is_leaf else p.detach().requires_grad_(True)
                for p in primals
            )
            row = 0
            for piece in pieces:
                rows = sum(s.numel() for s in piece.shapes)
                block = ut[:, row : row + rows]
                row += rows
                if not bool(block.any()):  # zero rows contribute nothing (to_dense's one-hots)
                    continue
                size = self.chunk(k, rows, chunk_size, budget, False)
                self._pull_piece(piece, leaves, block, out, cols, fresh, size)
        for j, (o, s) in enumerate(zip(cols, self.col_sizes)):
            if fresh[j]:
                out[:, o : o + s].zero_()
        return out.T

    def _pull_piece(
        self,
        piece: Piece,
        leaves: tuple[Tensor, ...],
        u: Tensor,
        out: Tensor,
        cols: list[int],
        fresh: list[bool],
        size: int,
    ) -> None:
        with torch.enable_grad():
            ys = piece(*leaves)
        row_offs = offsets(tuple(y.numel() for y in ys))
        live = [i for i, y in enumerate(ys) if y.requires_grad]
        if not live:
            return
        k = u.shape[0]
        cots = [
            u[:, row_offs[i] : row_offs[i] + ys[i].numel()].reshape(k, *ys[i].shape).to(ys[i].dtype)
            for i in live
        ]
        outs = [ys[i] for i in live]
        first = list(fresh)

        def probe(start: int, stop: int, batched: bool) -> tuple[Tensor | None, ...]:
            if batched:
                return batched_grad(outs, list(leaves), [c[start:stop] for c in cots], True, False)
            grads = torch.autograd.grad(
                outs, leaves, [c[start] for c in cots], retain_graph=True, allow_unused=True
            )
            return tuple(None if g is None else g.unsqueeze(0) for g in grads)

        def write(start: int, stop: int, grads: tuple[Tensor | None, ...]) -> None:
            for j, (o, g) in enumerate(zip(cols, grads)):
                region = out[start:stop, o : o + leaves[j].numel()]
                if g is None:
                    if first[j]:
                        region.zero_()
                elif first[j]:
                    region.copy_(g.reshape(stop - start, -1))
                else:
                    region.add_(g.reshape(stop - start, -1))
                fresh[j] = False

        run_chunks(self.fn_name, k, size, probe, write)


def _no_double_backward(err: BaseException) -> bool:
    """Whether an error says a backward is not differentiable (``derivative for ... is not
    implemented``)."""
    text = str(err).lower()
    return "derivative for" in text and "not implemented" in text


def _no_forward_ad(err: BaseException) -> bool:
    """Whether an error says forward-mode AD is missing (then a double backward can still work)."""
    text = str(err).lower()
    return any(
        s in text
        for s in ("forward ad", "forward-mode", "forward mode", "jvp", "not implemented for")
    )
