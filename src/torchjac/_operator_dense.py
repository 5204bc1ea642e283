"""Dense and scipy views of a ``JacobianOperator`` (or its Gram operators), from products only.

``dense_by_blocks`` applies the operator to blocks of the identity, on the cheaper side (columns
when ``n <= m``, else rows through the transpose). ``dense_batched`` uses a declared batch
dimension: the Jacobian is block diagonal (sample ``b``'s rows depend only on sample ``b``'s
columns), so a probe broadcast over the samples (one-hot per sample, NOTE [flat layout]) gives a
row (or column) of every sample's block at once: ``min(out, in)`` probes instead of
``B * min(out, in)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchjac._engine.core.basis import Group

__all__ = ["dense_batched", "dense_by_blocks", "scipy_operator"]


def _block(side: int, m: int, n: int, itemsize: int, budget: int) -> int:
    """Identity columns per product: the block and its product within a quarter of the budget."""
    return max(1, min(side, budget // max(4 * (m + n) * itemsize, 1)))


def dense_by_blocks(op: Any, budget: int) -> Tensor:
    m, n = op.shape
    out = torch.empty(m, n, dtype=op.dtype, device=op.device)
    by_columns = n <= m
    side = n if by_columns else m
    step = _block(side, m, n, op.dtype.itemsize, budget)
    for start in range(0, side, step):
        stop = min(side, start + step)
        eye = torch.zeros(side, stop - start, dtype=op.dtype, device=op.device)
        eye[start:stop].fill_diagonal_(1)
        if by_columns:
            out[:, start:stop] = op @ eye
        else:
            out[start:stop] = (op.T @ eye).T
    return out


def _sample_index(group: Group) -> Tensor:
    """``[B, rest]``: the flat position (in the layout rule's order) of each sample's elements."""
    parts, base = [], 0
    for shape, bd in zip(group.shapes, group.batch_dims):
        numel = shape.numel()
        idx = torch.arange(base, base + numel).reshape(shape)
        parts.append(idx.movedim(0 if bd is None else bd, 0).reshape(group.batch_size, -1))
        base += numel
    return torch.cat(parts, dim=1)


def dense_batched(op: Any, g_out: Group, g_in: Group, budget: int) -> Tensor:
    m, n = op.shape
    out = torch.zeros(m, n, dtype=op.dtype, device=op.device)
    rows, cols = _sample_index(g_out).to(op.device), _sample_index(g_in).to(op.device)
    by_rows = g_out.numel <= g_in.numel
    side = g_out.numel if by_rows else g_in.numel
    step = _block(side, m, n, op.dtype.itemsize, budget)
    for start in range(0, side, step):
        stop = min(side, start + step)
        probes = torch.zeros(m if by_rows else n, stop - start, dtype=op.dtype, device=op.device)
        index = rows if by_rows else cols
        for j in range(start, stop):
            probes[index[:, j], j - start] = 1  # the same probe for every sample
        res = op.T @ probes if by_rows else op @ probes
        for j in range(start, stop):
            if by_rows:  # res[cols, j]: sample b's row r, against sample b's columns
                out[rows[:, j, None], cols] = res[cols, j - start]
            else:
                out[rows, cols[:, j, None]] = res[rows, j - start]
    return out


def scipy_operator(op: Any, name: str) -> Any:
    """``scipy.sparse.linalg.LinearOperator`` of ``op``: float64 numpy in and out."""
    try:
        import numpy as np
        from scipy.sparse.linalg import LinearOperator
    except ImportError as err:
        raise ImportError(
            f"{name}.to_scipy() needs scipy: pip install scipy (or pip install 'torchjac[scipy]')."
        ) from err

    def apply(a: Any, x: Any) -> Any:
        t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64))
        res = a @ t.to(device=op.device, dtype=op.dtype)
        return res.to(device="cpu", dtype=torch.float64).numpy()

    return LinearOperator(
        op.shape,
        matvec=lambda x: apply(op, x.reshape(-1)),
        rmatvec=lambda x: apply(op.T, x.reshape(-1)),
        matmat=lambda x: apply(op, x),
        rmatmat=lambda x: apply(op.T, x),
        dtype=np.float64,
    )
