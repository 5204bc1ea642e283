"""Per-sample blocks of a sparse Jacobian: ``sparse_jacobian(..., batch_dim=b)``.

The Jacobian of the whole batch is computed as for one Tensor (its pattern is block diagonal:
colours are shared across samples, so the probes cost what one sample's do), then each nonzero
is sent to its sample's block. Blocks share one pattern, the union of the samples' patterns (a
sample may hold explicit zeros where another has a nonzero), so the result is one batched CSR
Tensor ``[B, m_s, n_s]``. A nonzero linking two samples raises ``BatchCouplingError``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchjac._checks import check_batch_dim
from torchjac._engine.sparse.index_forms import csr
from torchjac._errors import BatchCouplingError, coupling_fix

__all__ = ["per_sample_blocks"]


def _samples(shape: tuple[int, ...], b: int) -> tuple[Tensor, Tensor, int]:
    """For each flat (row-major) index of ``shape``: its sample along ``b``, its index within
    the sample (the other dimensions, row-major), and the sample size."""
    n, batch = math.prod(shape), shape[b]
    size = n // batch if batch else 0
    order = torch.arange(n).view(shape).movedim(b, 0).reshape(-1)
    sample, rest = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    sample[order] = torch.arange(batch).repeat_interleave(size)
    rest[order] = torch.arange(size).repeat(batch)
    return sample, rest, size


def per_sample_blocks(
    fn: str,
    rows: Tensor,
    cols: Tensor,
    values: Tensor,
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...],
    batch_dim: int,
) -> Tensor:
    """The batched CSR ``[B, m_s, n_s]`` of the per-sample blocks of a block-diagonal Jacobian."""
    named = [("x", torch.empty(x_shape, device="meta"))]
    named.append(("the output of func", torch.empty(y_shape, device="meta")))
    check_batch_dim(fn, batch_dim, named)
    b_in, b_out = batch_dim % len(x_shape), batch_dim % len(y_shape)
    s_in, r_in, n_s = _samples(x_shape, b_in)
    s_out, r_out, m_s = _samples(y_shape, b_out)
    rows, cols = rows.cpu(), cols.cpu()
    coupled = s_out[rows] != s_in[cols]
    if bool(coupled.any()):
        k = int(coupled.nonzero()[0])
        raise BatchCouplingError(
            f"{fn}: `batch_dim={batch_dim}` declares the samples independent, but output sample "
            f"{int(s_out[rows[k]])} depends on input sample {int(s_in[cols[k]])} (the "
            f"flattened Jacobian's entry ({int(rows[k])}, {int(cols[k])}) can be nonzero; an "
            "op taken as dense by the sparsity pattern also links samples). " + coupling_fix(fn)
        )
    batch = x_shape[b_in]
    keys = r_out[rows] * n_s + r_in[cols]
    common = torch.unique(keys)
    block = torch.zeros(batch, common.numel(), dtype=values.dtype, device=values.device)
    where = torch.searchsorted(common, keys).to(values.device)
    block[s_out[rows].to(values.device), where] = values
    crow = torch.zeros(m_s + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(common // max(n_s, 1), minlength=m_s), 0)
    col = common % max(n_s, 1)
    dev = values.device
    return csr(
        crow.to(dev).repeat(batch, 1), col.to(dev).repeat(batch, 1), block, (batch, m_s, n_s)
    )
