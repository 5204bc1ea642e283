"""Kernel blocks ``J₁ J₂ᵀ`` of per-sample parameter Jacobians from layer factors, without ``J``.

NOTE [ghost products]: for a layer of kind "outer" (Linear, Conv; see NOTE [layer capture]) the
per-sample Jacobian of the weight is ``Σ_t D[n, k, t] ⊗ A[n, t]``, so inner products between
samples ``i, j`` and probes ``a, b`` factor:

    <J_W[i, a], J_W[j, b]> = Σ_g Σ_{t,s} (D₁[i,a,t,g] · D₂[j,b,s,g]) (A₁[i,t,g] · A₂[j,s,g])
    <J_b[i, a], J_b[j, b]> = Σ_g (Σ_t D₁[i, a, t, g]) · (Σ_s D₂[j, b, s, g])

With one position (an MLP) that is ``(δδᵀ) ⊙ (aaᵀ)``: two small matrix products instead of
``N·C·o·i`` numbers. A parameter used several times (a layer called twice, tied weights of one
kind) concatenates its uses along ``t``, which gives the cross terms. When positions are many
(convolutions: ``T₁·T₂`` pairs) or the uses are of mixed kinds, the per-sample Jacobian of that
one parameter is materialised instead (``write_use``) and multiplied; only one parameter's block
lives at a time. The cheaper of the two is chosen by counting multiply-adds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from torchjac._engine.core.blocked import Make, blocked_kernel
from torchjac._engine.modules.closed_forms import Use, write_use

__all__ = ["UseD", "layer_kernel", "param_kernel"]

# (use, its canonical D for the probes) as given by ``layers.deltas``.
UseD = tuple[Use, Tensor]


def param_kernel(
    name: str, side1: Sequence[UseD], side2: Sequence[UseD], shape: torch.Size, budget: int
) -> Tensor | None:
    """``Σ_p J₁[i, a, p] J₂[j, b, p]`` over the elements ``p`` of parameter ``name``.

    Returns ``[N₁·k₁, N₂·k₂]`` or ``None`` when a side has no use of ``name``.
    """
    if not side1 or not side2:
        return None
    kinds = {u.kind for u, _ in (*side1, *side2)}
    role = "weight" if side1[0][0].weight == name else "bias"
    if kinds == {"outer"} and _same_layout(side1, side2):
        if role == "bias":
            return _bias_ghost(side1, side2)
        if _ghost_is_cheaper(side1, side2, budget):
            return _weight_ghost(side1, side2, with_bias=False)
    d1, d2 = side1[0][1], side2[0][1]
    per = (3 * d1.shape[0] * shape.numel() * d1.dtype.itemsize,) * 2
    return blocked_kernel(
        (d1.shape[0], d1.shape[1], d2.shape[0], d2.shape[1]),
        _materialise(name, side1, shape),
        None if side2 is side1 else _materialise(name, side2, shape),
        (per[0], 3 * d2.shape[0] * shape.numel() * d2.dtype.itemsize),
        budget,
        d1,
    )


def layer_kernel(side1: Sequence[UseD], side2: Sequence[UseD]) -> Tensor | None:
    """Weight and bias of one Linear-like layer together, ``(δ₁δ₂ᵀ) ⊙ (a₁a₂ᵀ + 1)``.

    Only for one use of one position per sample, with both its weight and bias asked for (an
    MLP): the ``δ`` products are then shared. ``None`` when that does not hold.
    """
    if len(side1) != 1 or len(side2) != 1:
        return None
    (u1, d1), (u2, d2) = side1[0], side2[0]
    if u1.kind != "outer" or u2.kind != "outer" or u1.weight is None or u1.bias is None:
        return None
    if (u1.weight, u1.bias) != (u2.weight, u2.bias) or d1.shape[2] != 1 or d2.shape[2] != 1:
        return None
    if not _same_layout(side1, side2):
        return None
    return _weight_ghost(side1, side2, with_bias=True)


def _same_layout(side1: Sequence[UseD], side2: Sequence[UseD]) -> bool:
    shapes = {(d.shape[3], d.shape[4], u.a.shape[3]) for u, d in (*side1, *side2)}
    return len(shapes) == 1


def _cat(side: Sequence[UseD]) -> tuple[Tensor, Tensor]:
    """Uses concatenated along positions: ``A [N, T, G, i]``, ``D [N, k, T, G, o]``."""
    a = torch.cat([u.a for u, _ in side], dim=1) if len(side) > 1 else side[0][0].a
    d = torch.cat([d for _, d in side], dim=2) if len(side) > 1 else side[0][1]
    return a.to(d.dtype), d


def _bias_ghost(side1: Sequence[UseD], side2: Sequence[UseD]) -> Tensor:
    s1 = sum(d.sum(2) for _, d in side1)  # [N, k, G, o]
    s2 = s1 if side2 is side1 else sum(d.sum(2) for _, d in side2)
    assert isinstance(s1, Tensor) and isinstance(s2, Tensor)
    return s1.flatten(0, 1).flatten(1) @ s2.flatten(0, 1).flatten(1).T


def _ghost_is_cheaper(side1: Sequence[UseD], side2: Sequence[UseD], budget: int) -> bool:
    (_, d1), (_, d2) = side1[0], side2[0]
    n1, k1, n2, k2 = d1.shape[0], d1.shape[1], d2.shape[0], d2.shape[1]
    g, o, i = d1.shape[3], d1.shape[4], side1[0][0].a.shape[3]
    t1 = sum(d.shape[2] for _, d in side1)
    t2 = sum(d.shape[2] for _, d in side2)
    ghost = n1 * k1 * t1 * n2 * k2 * t2 * g * (o + 1) + n1 * t1 * n2 * t2 * g * i
    explicit = (n1 * k1 * t1 + n2 * k2 * t2) * g * o * i + n1 * k1 * n2 * k2 * g * o * i
    pairs_bytes = n1 * k1 * t1 * n2 * k2 * t2 * g * d1.dtype.itemsize
    return ghost <= explicit and (t1 * t2 == 1 or pairs_bytes <= budget)


def _weight_ghost(side1: Sequence[UseD], side2: Sequence[UseD], with_bias: bool) -> Tensor:
    """See NOTE [ghost products]; ``with_bias`` adds the bias term (one position only)."""
    a1, d1 = _cat(side1)
    a2, d2 = (a1, d1) if side2 is side1 else _cat(side2)
    n1, k1, t1, g, o = d1.shape
    n2, k2, t2 = d2.shape[:3]
    if t1 == 1 and t2 == 1:
        dg1 = d1[:, :, 0].permute(2, 0, 1, 3).reshape(g, n1 * k1, o)
        dg2 = d2[:, :, 0].permute(2, 0, 1, 3).reshape(g, n2 * k2, o)
        ag1, ag2 = a1[:, 0].transpose(0, 1), a2[:, 0].transpose(0, 1)  # [G, N, i]
        dd = torch.bmm(dg1, dg2.transpose(1, 2)).view(g, n1, k1, n2, k2)
        aa = torch.bmm(ag1, ag2.transpose(1, 2)).view(g, n1, 1, n2, 1)
        if with_bias:
            aa = aa + 1
        out = (dd * aa).sum(0) if g > 1 else (dd.mul_(aa))[0]
        return out.reshape(n1 * k1, n2 * k2)
    dg1 = d1.permute(3, 0, 1, 2, 4).reshape(g, n1 * k1 * t1, o)
    dg2 = d2.permute(3, 0, 1, 2, 4).reshape(g, n2 * k2 * t2, o)
    ag1 = a1.permute(2, 0, 1, 3).reshape(g, n1 * t1, -1)
    ag2 = a2.permute(2, 0, 1, 3).reshape(g, n2 * t2, -1)
    dd = torch.bmm(dg1, dg2.transpose(1, 2)).view(g, n1, k1, t1, n2, k2, t2)
    aa = torch.bmm(ag1, ag2.transpose(1, 2)).view(g, n1, 1, t1, n2, 1, t2)
    return (dd * aa).sum(dim=(0, 3, 6)).reshape(n1 * k1, n2 * k2)


def _materialise(name: str, side: Sequence[UseD], shape: torch.Size) -> Make:
    """Per-sample Jacobian of one parameter for a chunk of probes, ``[N, c, P]``, all uses."""

    def make(start: int, stop: int) -> Tensor:
        d0 = side[0][1]
        n = d0.shape[0]
        target = torch.empty(n, stop - start, *shape, dtype=d0.dtype, device=d0.device)
        written: set[str] = set()
        for use, d in side:
            write_use(use, d[:, start:stop], {name: target}, written)
        return target.reshape(n, stop - start, -1)

    return make
