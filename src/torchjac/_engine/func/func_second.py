"""Second derivatives of a function by nested AD: the general path behind the Taylor mode.

NOTE [nested second derivatives]: with ``g_o(x) = J(x)^T e_o`` (a pullback, one output row ``o``),
a column ``a`` of the Hessian block of output ``o`` is ``d/dt g_o(x + t e_a)``: forward over
reverse (``jvp`` of the pullback) or reverse over reverse (a second pullback, by symmetry of the
Hessian). A probe is a pair ``(o, a)``; pairs are vmapped in chunks; a diagonal keeps entry
``a`` of each. Probes are one-hot and broadcast over the batch (NOTE [flat layout]).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchjac._engine.core.basis import Group
from torchjac._engine.core.func_call import FuncProblem, forward_jvp
from torchjac._engine.core.plan import choose_chunk_size
from torchjac._engine.core.run import run_chunks
from torchjac._engine.func.func_probes import Traced, bytes_per_probe

__all__ = ["graph_pairs", "hessian_pairs", "one_hot_at"]

Sink = Callable[[Tensor, Tensor, Tensor], None]  # (rows o [c], cols a [c], block [B, c, D])


def one_hot_at(group: Group, idx: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """One-hot probes at flat positions ``idx`` (any order), one tensor ``[c, *shape]`` a member."""
    c = idx.numel()
    out = []
    for i, (off, size) in enumerate(zip(group.offsets, group.sizes)):
        flat = torch.zeros(c, size, dtype=like[i].dtype, device=like[i].device)
        local = idx - off
        hit = (local >= 0) & (local < size)
        flat[torch.nonzero(hit).flatten(), local[hit]] = 1
        out.append(group.expand(i, flat))
    return tuple(out)


def hessian_pairs(
    p: FuncProblem, t: Traced, mode: str, chunk_size: int | None, budget: int, sink: Sink
) -> None:
    """Every pair ``(o, a)`` of NOTE [nested second derivatives]; ``sink`` gets ``H[:, o, a]``."""
    ins, outs = p.inputs, t.outputs
    n_rows, n_cols = t.out_group.numel, t.in_group.numel
    n_pairs = n_rows * n_cols
    device = p.device

    def pair(cots: tuple[Tensor, ...], tans: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        def grad(*xs: Tensor) -> tuple[Tensor, ...]:
            return tuple(torch.func.vjp(p.outputs_of_copies, *xs)[1](cots))

        if mode == "fwd":
            # NOTE [grad mode in nested AD]: some backward formulas (det, solve) take a faster,
            # non-differentiable branch when grad mode is off; forward over reverse needs the
            # differentiable one, whatever the caller's grad mode.
            with torch.enable_grad():
                return tuple(forward_jvp(grad, ins, tans)[1])
        return tuple(torch.func.vjp(grad, *ins)[1](tans))

    def probe(start: int, stop: int, batched: bool) -> tuple[Tensor, ...]:
        k = torch.arange(start, stop, device=device)
        cots = one_hot_at(t.out_group, k // n_cols, outs)
        tans = one_hot_at(t.in_group, k % n_cols, ins)
        if batched:
            return tuple(torch.vmap(pair, randomness="same")(cots, tans))  # one draw per call
        return tuple(h.unsqueeze(0) for h in pair(_first(cots), _first(tans)))

    def write(start: int, stop: int, hs: tuple[Tensor, ...]) -> None:
        k = torch.arange(start, stop, device=device)
        flat = [t.in_group.flatten(j, h) for j, h in enumerate(hs)]
        sink(k // n_cols, k % n_cols, torch.cat(flat, dim=2) if len(flat) > 1 else flat[0])

    per_probe = 3 * bytes_per_probe(p, outs)
    run_chunks(
        p.fn_name, n_pairs, choose_chunk_size(n_pairs, per_probe, budget, chunk_size), probe, write
    )


def _first(probes: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(x[0] for x in probes)


def graph_pairs(t: Traced, sink: Sink) -> None:
    """Every pair by reverse over reverse on the autograd graph of ``t``, as a loop over rows.

    The path for functions torch.func cannot transform (an ``autograd.Function`` without
    ``setup_context``): one differentiable pullback per output row, then one backward pass per
    column of it (NOTE [nested second derivatives]).
    """
    outs, xs = t.outputs, t.graph_inputs
    n_cols = t.in_group.numel
    with torch.enable_grad():  # NOTE [grad mode in nested AD]
        for o in range(t.out_group.numel):
            row = torch.tensor([o], device=xs[0].device)
            cots = one_hot_at(t.out_group, row, outs)
            grads = t.pullback([c[0] for c in cots], create_graph=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]  # else: linear in x
            for a in range(n_cols):
                col = torch.tensor([a], device=xs[0].device)
                tans = one_hot_at(t.in_group, col, xs)
                hs: Sequence[Tensor | None] = [None] * len(xs)
                if live:
                    hs = torch.autograd.grad(
                        [grads[i] for i in live],
                        xs,
                        [tans[i][0].to(grads[i].dtype) for i in live],
                        retain_graph=True,
                        create_graph=t.create_graph,
                        allow_unused=True,
                    )
                flat = [
                    t.in_group.flatten(j, (x.new_zeros(x.shape) if h is None else h).unsqueeze(0))
                    for j, (h, x) in enumerate(zip(hs, xs))
                ]
                block = torch.cat(flat, dim=2)
                sink(row, col, block if t.create_graph else block.detach())
