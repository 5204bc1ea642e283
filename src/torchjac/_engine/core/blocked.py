"""``J₁ J₂ᵀ`` of per-sample Jacobians built in probe chunks, under a memory budget.

NOTE [blocked kernel]: when a per-sample Jacobian must be formed (the general path, or a layer
whose closed form is cheaper materialised), ``K[i, a, j, b] = <J₁[i, a], J₂[j, b]>`` is built from
chunks of probes (output elements ``a``): ``make(start, stop)`` gives ``[N, c, P]`` for probes
``start..stop-1``. If both sides fit in the budget they are formed once; otherwise each pair of
chunks is formed and multiplied, and a side's chunk is recomputed for every chunk of the other
(for ``K(x, x)`` only the upper blocks, mirrored). Only two chunks are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["blocked_kernel", "copy_transposed_", "self_gram", "symmetrize_"]

_SELF_GRAM_MIN = 256  # rows and columns from which ``self_gram`` goes by block rows
_SELF_GRAM_BLOCKS = 4

Make = Callable[[int, int], Tensor]  # (start, stop) -> [N, c, P]


def blocked_kernel(
    shape: tuple[int, int, int, int],
    make1: Make,
    make2: Make | None,
    bytes_per_probe: tuple[int, int],
    budget: int,
    like: Tensor,
) -> Tensor:
    """``[N₁·k₁, N₂·k₂]``; ``make2=None`` means side 2 is side 1 (a symmetric kernel)."""
    n1, k1, n2, k2 = shape
    b1, b2 = max(bytes_per_probe[0], 1), max(bytes_per_probe[1], 1)
    if k1 * b1 + (0 if make2 is None else k2 * b2) <= budget:
        j1 = make1(0, k1).reshape(n1 * k1, -1)
        if make2 is None:
            return self_gram(j1)
        return j1 @ make2(0, k2).reshape(n2 * k2, -1).T
    c1 = max(1, budget // 2 // b1)
    c2 = c1 if make2 is None else max(1, budget // 2 // b2)
    out = torch.empty(n1, k1, n2, k2, dtype=like.dtype, device=like.device)
    for a0 in range(0, k1, c1):
        a1 = min(k1, a0 + c1)
        left = make1(a0, a1)
        for b0 in range(a0 if make2 is None else 0, k2, c2):
            b1_ = min(k2, b0 + c2)
            other = make1 if make2 is None else make2
            right = left if make2 is None and b0 == a0 else other(b0, b1_)
            block = torch.einsum("iap,jbp->iajb", left, right)
            out[:, a0:a1, :, b0:b1_] = block
            if make2 is None and b0 != a0:
                out[:, b0:b1_, :, a0:a1] = block.permute(2, 3, 0, 1)
    return out.reshape(n1 * k1, n2 * k2)


def self_gram(j: Tensor) -> Tensor:
    """``j @ j.T``, by block rows from the diagonal on when ``j`` is big enough that skipping the
    lower blocks pays (one thread: ``[320, 1152]`` 1.9 against 2.6 ms in 4 block rows; but
    ``[320, 72]`` 0.20 against 0.16 and ``[16, 65536]`` 0.88 against 0.65, so those run whole).
    Below the diagonal blocks, the upper ones transposed."""
    m, p = j.shape
    if m < _SELF_GRAM_MIN or p < _SELF_GRAM_MIN or j.requires_grad:
        return j @ j.T
    out = torch.empty(m, m, dtype=j.dtype, device=j.device)
    step = -(-m // _SELF_GRAM_BLOCKS)
    for i0 in range(0, m, step):
        i1 = min(m, i0 + step)
        row = j[i0:i1] @ j[i0:].T  # this block row, from the diagonal block on
        out[i0:i1, i0:] = row
        out[i1:, i0:i1] = row[:, i1 - i0 :].T
    return out


def symmetrize_(kernel: Tensor, block: int = 256) -> Tensor:
    """``(K + Kᵀ) / 2`` of a square ``K`` in place, bitwise equal, one pair of blocks at a time.

    The transposed read of ``K + K.T`` walks memory across rows: on one thread it took 4.5 s
    for ``12288²`` float32 against 1.6 s by blocks of 256 (and no second ``[n, n]`` buffer).
    """
    if kernel.requires_grad:
        return (kernel + kernel.T) / 2
    n = kernel.shape[0]
    for i in range(0, n, block):
        for j in range(i, n, block):
            upper, lower = (
                kernel[i : i + block, j : j + block],
                kernel[j : j + block, i : i + block],
            )
            mean = (upper + lower.T) / 2
            upper.copy_(mean)
            lower.copy_(mean.T)
    return kernel


def copy_transposed_(dst: Tensor, src: Tensor, block: int = 256) -> Tensor:
    """``dst.copy_(src.T)`` for 2-D tensors, one block at a time (the transposed read of a
    whole ``[4096, 4096]`` float32 block took ~0.7 s on one thread, by blocks ~0.15 s)."""
    rows, cols = src.shape
    for i in range(0, rows, block):
        for j in range(0, cols, block):
            dst[j : j + block, i : i + block].copy_(src[i : i + block, j : j + block].T)
    return dst
