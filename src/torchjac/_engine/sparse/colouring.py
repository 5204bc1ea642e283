"""Greedy distance-2 colouring of a sparsity pattern, and the compressed probes it allows.

NOTE [colouring]: two columns of a pattern may share a forward probe when no row holds both
(they are at distance 2 in the bipartite row-column graph otherwise); then the Jacobian-vector
product with the sum of their unit vectors shows each entry of both alone: ``J[i, j] = (J s_c)[i]``
for the colour ``c`` of column ``j``, read by one gather. Rows are coloured the same way on the
transposed pattern for reverse probes (``s_cᵀ J``). The greedy colouring visits columns in
largest-first order (by ``Σ_{rows r of j} |r|``, the size of the neighbourhood a column can
conflict with, ties by index) and gives each the smallest colour no row of it has used yet: a
bit mask of used colours per row makes a column cost one OR per row it meets, so the whole
colouring costs O(nnz) mask operations, whatever the number of colours.

NOTE [lattice colouring]: a stencil on a grid is coloured optimally by a linear form of the grid
index, ``c = (i_0 + a_1 i_1 + ... ) mod p`` (5 colours for the five-point stencil: ``(i + 2j) mod
5``; 7 for the 3-D seven-point one), where greedy orders give 7 to 9. ``lattice_colouring``
tries ``p`` from the longest row (no colouring has fewer colours) to two more, and a few
multipliers each, over ``x``'s shape; a candidate is kept only if every row's columns get
distinct colours (one ``bincount`` over the (row, column) pairs: exact, so any pattern is safe
to try, and rows are coloured from the same pairs, with no transposed pattern), else it
declines (``None``) and the greedy colouring runs. Vectorised, it also avoids the greedy Python
loop on large grids. A fast path (NOTE [fast paths]): the Jacobian is the same either way.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from torchjac._engine.core.fast import enabled

__all__ = ["Colouring", "colour_columns", "lattice_colouring"]

LATTICE_EXTRA = 2  # colours over the lower bound a lattice colouring may use
LATTICE_MULTIPLIERS = 8  # multiplier vectors tried per number of colours


@dataclass(frozen=True)
class Colouring:
    """``colour[j]`` for each of the ``n`` columns (or rows), ``count`` colours in all."""

    colour: Tensor  # int64 [n]
    count: int

    def seeds(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """The probes of colours ``start..stop-1``: ``[stop - start, n]`` indicator rows."""
        c = torch.arange(start, stop).view(-1, 1)
        return (self.colour.view(1, -1) == c).to(dtype)


def colour_columns(crow: Tensor, col: Tensor, n: int) -> Colouring:
    """Greedy largest-first distance-2 colouring of the columns of a CSR pattern (NOTE
    [colouring]): columns sharing a row get different colours."""
    m = crow.numel() - 1
    if n == 0:
        return Colouring(torch.zeros(0, dtype=torch.long), 0)
    lengths = crow[1:] - crow[:-1]
    rows_of = torch.repeat_interleave(torch.arange(m), lengths)
    degree = torch.zeros(n, dtype=torch.long).index_add_(0, col, lengths[rows_of])
    order = torch.sort(-degree, stable=True).indices.tolist()
    # the rows of each column: the pattern transposed (CSC)
    by_col = torch.sort(col, stable=True)
    col_rows = rows_of[by_col.indices].tolist()
    col_start = torch.zeros(n + 1, dtype=torch.long)
    col_start[1:] = torch.cumsum(torch.bincount(col, minlength=n), 0)
    starts = col_start.tolist()
    used = [0] * m
    colour = [0] * n
    for j in order:
        rows = col_rows[starts[j] : starts[j + 1]]
        mask = 0
        for r in rows:
            mask |= used[r]
        bit = ~mask & (mask + 1)  # the lowest colour free in all its rows
        colour[j] = bit.bit_length() - 1
        for r in rows:
            used[r] |= bit
    colours = torch.tensor(colour, dtype=torch.long)
    return Colouring(colours, int(colours.max()) + 1)


def valid(group: Tensor, member: Tensor, colour: Tensor, count: int) -> bool:
    """The members of each group (a row's columns: ``(group, member)`` pairs, groups
    ``0..max``) have distinct colours."""
    if group.numel() == 0:
        return True
    hits = torch.bincount(torch.add(colour.index_select(0, member), group, alpha=count))
    return bool(hits.max() <= 1)


@functools.lru_cache(maxsize=64)
def _lattice(shape: tuple[int, ...], a: tuple[int, ...], p: int) -> Colouring:
    """``(index · a) mod p`` over the grid ``shape`` (cached: only read, never written)."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij"))
    colour = (grid.reshape(len(shape), -1) * torch.tensor(a).view(-1, 1)).sum(0) % p
    return Colouring(colour, int(colour.max()) + 1)


def lattice_colouring(
    group: Tensor, member: Tensor, shape: tuple[int, ...], lower: int
) -> Colouring | None:
    """A colouring ``(index · a) mod p`` of the members (over the grid ``shape``) such that
    each group's members differ (NOTE [lattice colouring]), or ``None`` when none within
    ``LATTICE_EXTRA`` of ``lower`` (the largest group) is valid."""
    n = math.prod(shape)
    if not enabled() or n == 0 or member.numel() == 0 or len(shape) > 4 or lower >= n:
        return None
    for p in range(max(lower, 1), min(lower + LATTICE_EXTRA, n) + 1):
        tails = itertools.permutations(range(1, p), len(shape) - 1)  # distinct, nonzero
        tried = list(itertools.islice(tails, LATTICE_MULTIPLIERS))
        for tail in sorted(tried, key=lambda t: 1 in t):  # a repeated 1 mostly fails: last
            found = _lattice(shape, (1, *tail), p)
            if valid(group, member, found.colour, p):
                return found
    return None
