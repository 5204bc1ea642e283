"""Hessian diagonals with second order in reverse: the Taylor tape.

NOTE [taylor tape]: a forward diagonal carries ``D`` second-order coefficients through every
later layer. But second-order terms are born only at nonlinear ops (``φ''(v)·(∂_a v)²`` at an
activation, ``2 ∂_a u ∂_a v`` at a product, ``H_op[∂_a, ∂_a]`` through the general rule) and then
travel linearly to the outputs, so their sum at output ``o`` is ``Σ_e <g_e, s_e[a]>`` with
``g_e = ∂f_o/∂h_e`` the reverse-mode gradient at op ``e``. The pass carries first order only
(``K = 1 + D``), records each source ``s_e`` on a tape, keeps the op's value ``h_e`` on an
autograd graph (``Jet.live``, one extra value pass), and one backward pass per output row gives
every ``g_e``. Per sample, the inner product runs over each sample's own elements, so the batch
dimension of every taped tensor must be known: rules that keep it say where it is, any other op
forgets it, and a forgotten one makes the call rerun the forward diagonal (``NeedForward``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from torchjac._engine.taylor import Jet, TaylorFailed

__all__ = ["NeedForward", "Tape", "attach_live", "contract", "record"]


class NeedForward(Exception):
    """A taped tensor's batch dimension is unknown (see NOTE [taylor tape])."""


@dataclass
class Tape:
    """Sources of second order: (op output, ``[D, *shape]`` source, scale) triples; the source
    is ``source * scale`` (``scale`` of the op's output shape, ``None`` for 1), kept apart so
    that a source broadcast over the samples (NOTE [lazy first order]) is never written out."""

    entries: list[tuple[Jet, Tensor, Tensor | None]] = field(default_factory=list)


def record(out: Jet, source: Tensor, scale: Tensor | None = None) -> None:
    """Put a second-order source on the tape of ``out``'s pass, if it keeps one."""
    tape = out.spec.tape
    if tape is not None:
        tape.entries.append((out, source, scale))


def attach_live(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
    """Recompute ``func`` on the live values of its Jet arguments; give each output Jet its own."""
    leaves = [x for x in tree_flatten(out)[0] if isinstance(x, Tensor)]
    if not any(isinstance(x, Jet) for x in leaves):
        return
    largs = tuple(_live(a) for a in args)
    lkwargs = {k: _live(v) for k, v in kwargs.items()}
    with torch.enable_grad():
        live = func(*largs, **lkwargs)
    lives = [x for x in tree_flatten(live)[0] if isinstance(x, Tensor)]
    if len(lives) != len(leaves):
        raise TaylorFailed(f"{getattr(func, '__name__', func)} gave different outputs on values")
    for jet, value in zip(leaves, lives):
        if isinstance(jet, Jet):
            jet.live = value


def _live(a: Any) -> Any:
    if isinstance(a, Jet):
        return a.live
    if isinstance(a, (list, tuple)):
        return type(a)(_live(x) for x in a)
    if isinstance(a, dict):
        return {k: _live(v) for k, v in a.items()}
    return a


def contract(
    outs: list[Jet],
    out_cots: list[Tensor],
    tape: Tape,
    shape: tuple[int, int, int],
    batched: bool,
    like: Tensor,
) -> Tensor:
    """``[B, R, D]``: ``Σ_e <g_e, s_e[a]>`` per sample, output row and direction (``B = 1``
    when unbatched)."""
    entries = [(e, e.live, s, c) for e, s, c in tape.entries if e.live is not None]
    entries = [(e, h, s, c) for e, h, s, c in entries if h.requires_grad]
    bsz, n_rows, d = shape
    res = like.new_zeros(bsz, n_rows, d)
    if not entries or not outs or bsz == 0:
        return res
    for e, h, _, _ in entries:
        if batched and (e.bdim is None or h.shape[e.bdim] != bsz):
            raise NeedForward
    create = torch.is_grad_enabled()
    one = n_rows == 1  # a plain backward pass, no vectorisation over rows
    grads = torch.autograd.grad(
        [y.live for y in outs if y.live is not None],
        [h for _, h, _, _ in entries],
        [c[0] for c in out_cots] if one else out_cots,
        retain_graph=create,
        create_graph=create,
        allow_unused=True,
        is_grads_batched=not one,
    )
    if one:
        grads = tuple(None if g is None else g.unsqueeze(0) for g in grads)
    for (e, _, s, c), g in zip(entries, grads):
        if g is None:
            continue
        if c is None:
            w = g  # [R, *out]
        else:  # g·φ'' meets no small factor first: in float64, it would overflow float32
            wide = torch.promote_types(g.dtype, torch.float64)
            w = g.to(wide) * c.to(wide)
        s = s.to(w.dtype)
        bd = 1 + e.bdim if batched else 1  # type: ignore[operator]
        if batched and s.shape[bd] == 1 and bsz > 1:  # the same source for every sample
            rest = list(w.shape[1:])
            rest[bd - 1] = 1
            s1 = s.expand(d, *rest).movedim(bd, 1).reshape(d, -1)  # [D, n]
            w2 = w.movedim(bd, 1).reshape(n_rows, bsz, -1)
            res = res + (w2 @ s1.T).transpose(0, 1).to(res.dtype)
            continue
        if batched:
            w2 = w.movedim(bd, 1).reshape(n_rows, bsz, -1)
            s2 = s.expand(d, *w.shape[1:]).movedim(bd, 1).reshape(d, bsz, -1)
        else:
            w2, s2 = w.reshape(n_rows, 1, -1), s.expand(d, *w.shape[1:]).reshape(d, 1, -1)
        res = res + torch.einsum("rbn,dbn->brd", w2, s2).to(res.dtype)
    return res
