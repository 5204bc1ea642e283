"""Index sets of many tensor elements at once: which inputs each element depends on.

NOTE [index sets]: the dependence of a tensor's elements on the ``n`` input elements is a boolean
matrix ``D`` (one row per element, one column per input element), stored as its nonzeros sorted
by row then column, without duplicates. Every rule of NOTE [sparsity tracing] is built from three
operations on such matrices: ``take`` (row ``i`` of the result is row ``idx[i]``: broadcasting,
slicing, gathering), ``relabel`` (rows sent to new rows and merged: ``D_out = L D_in`` in the
boolean semiring, for an op whose local pattern ``L`` is given as (output, input) pairs) and
``union`` (an output reading several inputs). All three are vectorised tensor code; the cost is
the number of (element, input) pairs moved, never ``rows × n``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

__all__ = ["Sets", "csr"]


@dataclass(frozen=True, eq=False)
class Sets:
    """A boolean ``[rows, n]`` matrix: nonzeros ``(row[k], col[k])``, sorted, unique (int64)."""

    rows: int
    n: int
    row: Tensor
    col: Tensor

    @staticmethod
    def empty(rows: int, n: int) -> Sets:
        none = torch.zeros(0, dtype=torch.long)
        return Sets(rows, n, none, none)

    @staticmethod
    def identity(n: int) -> Sets:
        ar = torch.arange(n)
        return Sets(n, n, ar, ar)

    @staticmethod
    def from_keys(rows: int, n: int, keys: Tensor) -> Sets:
        """From ``row * n + col`` codes, in any order, duplicates allowed."""
        keys = _sorted_unique(keys)
        return Sets(rows, n, keys // max(n, 1), keys % max(n, 1))

    @property
    def nnz(self) -> int:
        return int(self.row.numel())

    @cached_property
    def counts(self) -> Tensor:
        return torch.bincount(self.row, minlength=self.rows)[: self.rows]

    @cached_property
    def starts(self) -> Tensor:
        return torch.cumsum(self.counts, 0) - self.counts

    def take(self, idx: Tensor) -> Sets:
        """Row ``i`` of the result is row ``idx[i]`` of this one (any order, repeats allowed)."""
        idx = idx.reshape(-1).long()
        if self.nnz == 0 or idx.numel() == 0:
            return Sets.empty(idx.numel(), self.n)
        c = self.counts[idx]
        total = int(c.sum())
        new_row = torch.repeat_interleave(torch.arange(idx.numel()), c, output_size=total)
        shift = self.starts[idx] - (torch.cumsum(c, 0) - c)  # source start - result start
        pos = torch.repeat_interleave(shift, c, output_size=total) + torch.arange(total)
        return Sets(idx.numel(), self.n, new_row, self.col[pos])

    def relabel(self, to: Tensor, rows: int) -> Sets:
        """Row ``i`` goes to row ``to[i]`` of a ``rows``-row result; rows meeting there merge."""
        if self.nnz == 0:
            return Sets.empty(rows, self.n)
        to = to.reshape(-1).long()
        if to.numel() < 2 or bool((to[1:] > to[:-1]).all()):  # order kept: nothing merges
            return Sets(rows, self.n, to[self.row], self.col)
        return Sets.from_keys(rows, self.n, to[self.row] * self.n + self.col)

    def pairs(self, out: Tensor, src: Tensor, rows: int) -> Sets:
        """``D_out = L D``: output ``out[k]`` reads element ``src[k]`` (the pairs of ``L``)."""
        return self.take(src).relabel(out, rows)

    def all_rows(self) -> Tensor:
        """The union of every row: the columns any element depends on."""
        return torch.unique(self.col)

    def dense_to(self, rows: int) -> Sets:
        """Every one of ``rows`` rows is the union of all of this matrix's rows."""
        cols = self.all_rows()
        if cols.numel() == 0 or rows == 0:
            return Sets.empty(rows, self.n)
        r = torch.arange(rows).repeat_interleave(cols.numel())
        return Sets(rows, self.n, r, cols.repeat(rows))

    @staticmethod
    def union(parts: Sequence[Sets], rows: int, n: int) -> Sets:
        live = [p for p in parts if p.nnz]
        if not live:
            return Sets.empty(rows, n)
        if len(live) == 1:
            return live[0]
        return Sets.from_keys(rows, n, torch.cat([p.row * n + p.col for p in live]))

    def keep_rows(self, mask: Tensor) -> Sets:
        """The nonzeros of the rows where ``mask`` (``[rows]`` bool) is False."""
        keep = ~mask[self.row]
        return Sets(self.rows, self.n, self.row[keep], self.col[keep])

    def to_csr(self) -> Tensor:
        """Boolean sparse CSR ``[rows, n]``."""
        crow = torch.zeros(self.rows + 1, dtype=torch.long)
        crow[1:] = torch.cumsum(self.counts, 0)
        values = torch.ones(self.nnz, dtype=torch.bool)
        return csr(crow, self.col.clone(), values, (self.rows, self.n))


def csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, ...]) -> Tensor:
    """``torch.sparse_csr_tensor`` without torch's "beta" warning (torch's, not the user's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _sorted_unique(keys: Tensor) -> Tensor:
    """Sorted, without duplicates. Keys are mostly a few sorted runs (the parts of a union):
    NumPy's stable sort (timsort) merges runs, 8x faster than ``torch.sort`` on them."""
    ordered = torch.from_numpy(np.sort(keys.numpy(), kind="stable"))
    return torch.unique_consecutive(ordered)
