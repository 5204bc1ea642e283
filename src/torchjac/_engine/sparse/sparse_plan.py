"""What a sparse Jacobian needs from its pattern alone, worked out once per pattern.

NOTE [pattern plan]: everything ``sparse_jacobian`` derives from the pattern and not from ``x``
is kept in one :class:`PatternPlan`: the (row, column) pairs of its entries (explicit ``False``
entries dropped), the CSR row pointers, the longest row and column, the colourings of both sides
(per grid shape: NOTE [lattice colouring]), the side ``"auto"`` takes, the flat positions
that read each entry out of the compressed block, and the check's weights laid out as that block
(NOTE [compressed probes]). The plan is cached
on the pattern tensor (a private attribute) under a key of the pattern's shape, the addresses of
its index and value tensors and their version counters, so an in-place change of the pattern
makes a new plan, and a pattern passed back in (a Newton loop) costs no detection, colouring or
index work. A pattern detected within the call has its plan made from the index sets at once,
with no pattern tensor, and kept in a small cache of recent detected patterns (at most
``DETECTED_PLANS`` of them, ``DETECTED_SLOTS`` index slots in all): a call whose detection
finds index sets equal, tensor for tensor (``torch.equal``: exact, so any change of the
pattern makes a new plan), to a kept one takes its plan, colourings and probes included, so a
detection costs its trace only. The plan's tensors are never handed out: a result gets copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchjac._engine.sparse.colouring import Colouring, colour_columns, lattice_colouring
from torchjac._engine.sparse.index_forms import csr, padded_to_pairs, sorted_unique
from torchjac._engine.sparse.index_sets import Sets

__all__ = ["PatternPlan", "csr_parts", "pattern_csr", "plan_from", "plan_of"]

_ATTR = "_torchjac_plan"
DETECTED_PLANS = 4  # plans of detected patterns kept (NOTE [pattern plan])
DETECTED_SLOTS = 2**18  # index slots (int64) of the kept patterns, in all

_detected: list[tuple[tuple[Any, ...], tuple[Tensor, ...], PatternPlan]] = []  # oldest first


def _key(pattern: Tensor) -> tuple[Any, ...]:
    parts = (pattern.crow_indices(), pattern.col_indices(), pattern.values())
    return (tuple(pattern.shape), *((t.data_ptr(), t._version) for t in parts))


def _crow(group: Tensor, size: int) -> Tensor:
    crow = torch.zeros(size + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(group, minlength=size), 0)
    return crow


@dataclass(eq=False)
class PatternPlan:
    """The pattern's entries (CPU, CSR order) and what is derived from them alone."""

    m: int
    n: int
    crow: Tensor
    rows: Tensor
    cols: Tensor
    colourings: dict[tuple[str, tuple[int, ...]], Colouring] = field(default_factory=dict)
    sides: dict[tuple[int, ...], str] = field(default_factory=dict)
    cache: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)

    def longest(self, side: str) -> int:
        """The longest row (``"fwd"``) or column (``"rev"``): no colouring of that side's
        probes has fewer colours."""
        key = ("longest", side)
        if key not in self.cache:
            if not self.cols.numel():
                most = torch.tensor(0)
            elif side == "fwd":
                most = (self.crow[1:] - self.crow[:-1]).max()
            else:
                most = torch.bincount(self.cols, minlength=self.n).max()
            self.cache[key] = most
        return int(self.cache[key])

    def colouring(self, side: str, grid: tuple[int, ...]) -> Colouring:
        """Columns (``"fwd"``) or rows (``"rev"``) coloured: the lattice over ``grid`` (``x``'s
        shape) first (NOTE [lattice colouring]), else greedy (NOTE [colouring])."""
        key = (side, grid)
        if key in self.colourings:
            return self.colourings[key]
        group, member, size = (
            (self.rows, self.cols, self.n) if side == "fwd" else (self.cols, self.rows, self.m)
        )
        shape = grid if size == math.prod(grid) else (size,)
        found = lattice_colouring(group, member, shape, self.longest(side))
        if found is None:
            found = self._greedy(side, grid)
        self.colourings[key] = found
        return found

    def _greedy(self, side: str, grid: tuple[int, ...]) -> Colouring:
        if side == "fwd":
            return colour_columns(self.crow, self.cols, self.n)
        # the transposed pattern in CSR order (NumPy's stable sort: see index_sets)
        order = torch.from_numpy(
            np.argsort((self.cols * self.m + self.rows).numpy(), kind="stable")
        )
        r, c = self.cols[order], self.rows[order]
        if self.m == self.n and torch.equal(r * self.n + c, self.rows * self.n + self.cols):
            return self.colouring("fwd", grid)  # symmetric: rows conflict exactly as columns
        return colour_columns(_crow(r, self.n), c, self.m)

    def side(self, grid: tuple[int, ...]) -> str:
        """The side with fewer colours, reverse on ties. The longest row (column) bounds the
        column (row) colours from below: the second side is coloured only if that bound can
        beat the first's count (a dense row makes column colouring useless, and costly)."""
        if grid not in self.sides:
            low = {side: self.longest(side) for side in ("fwd", "rev")}
            first, second = sorted(("rev", "fwd"), key=lambda s: low[s])  # rev first on ties
            count, chosen = self.colouring(first, grid).count, first
            if low[second] < count or (low[second] == count and second == "rev"):
                other = self.colouring(second, grid).count
                if other < count or (other == count and second == "rev"):
                    chosen = second
            self.sides[grid] = chosen
        return self.sides[grid]

    def on(self, name: str, device: torch.device) -> Tensor:
        """``rows`` or ``cols`` on ``device`` (cached; never handed out)."""
        key = (name, device)
        if key not in self.cache:
            self.cache[key] = getattr(self, name).to(device)
        return self.cache[key]

    def index(self, side: str, grid: tuple[int, ...], device: torch.device) -> Tensor:
        """Flat positions of the entries in the compressed block, one probe a row: ``[C + 1,
        m]`` forward (entry ``(i, j)`` at ``(colour[j], i)``), ``[C + 1, n]`` reverse
        (``(colour[i], j)``)."""
        key = ("index", side, grid, device)
        if key not in self.cache:
            col = self.colouring(side, grid)
            if side == "fwd":
                flat = torch.add(self.rows, col.colour.index_select(0, self.cols), alpha=self.m)
            else:
                flat = torch.add(self.cols, col.colour.index_select(0, self.rows), alpha=self.n)
            self.cache[key] = flat.to(device)
        return self.cache[key]

    def check_weights(self, side: str, grid: tuple[int, ...], r: Tensor, keep: bool) -> Tensor:
        """``[C + 1, lines]``, laid out as the compressed block: at ``(c, l)`` the sum of the
        check direction ``r`` over the entries of line ``l`` whose other index has colour ``c``
        (one at most, for a valid colouring), and ``-1`` in the last row, so that
        ``(block * W).sum(0)`` is the sparse product with ``r`` minus the AD one (NOTE
        [compressed probes]). Kept (``keep``) per side, grid, dtype and device."""
        key = ("check", side, grid, r.dtype, r.device)
        found = self.cache.get(key)
        if found is not None:
            return found
        count = self.colouring(side, grid).count
        lines = self.m if side == "fwd" else self.n
        at = self.on("cols" if side == "fwd" else "rows", r.device)
        w = torch.zeros((count + 1) * lines, dtype=r.dtype, device=r.device)
        w.index_add_(0, self.index(side, grid, r.device), r.index_select(0, at))
        w[count * lines :] = -1
        w = w.view(count + 1, lines)
        if keep:
            self.cache[key] = w
        return w


def plan_from(sets: Sets) -> PatternPlan:
    """The plan of a pattern detected within the call: a kept one if its index sets are equal
    (NOTE [pattern plan]), else made from them at once (no pattern tensor: nobody else sees
    it)."""
    key, parts = _fingerprint(sets)
    for i, (k, kept, plan) in enumerate(_detected):
        if k == key and all(torch.equal(a, b) for a, b in zip(kept, parts)):
            _detected.append(_detected.pop(i))  # the most recent last
            return plan
    crow, rows, cols = csr_parts(sets)
    plan = PatternPlan(sets.rows, sets.n, crow, rows, cols)
    if sum(t.numel() for t in parts) <= DETECTED_SLOTS:
        _detected.append((key, tuple(t.clone() for t in parts), plan))  # read only
        while len(_detected) > DETECTED_PLANS or _slots() > DETECTED_SLOTS:
            _detected.pop(0)
    return plan


def csr_parts(sets: Sets) -> tuple[Tensor, Tensor, Tensor]:
    """CSR row pointers ``[rows + 1]``, and the row and the column of each entry, of index
    sets (fresh tensors)."""
    crow = torch.zeros(sets.rows + 1, dtype=torch.long)
    ell, row, col = sets.forms()
    if row is None or col is None:  # straight from the padded rows: no pairs kept
        assert ell is not None
        row, col, counts = padded_to_pairs(ell, sets.n)
        torch.cumsum(counts, 0, out=crow[1:])
        return crow, row, col
    crow[1:] = torch.cumsum(sets.counts, 0)
    return crow, row.clone(), col.clone()


def pattern_csr(sets: Sets) -> Tensor:
    """The boolean sparse CSR ``[rows, n]`` of index sets."""
    crow, _, col = csr_parts(sets)
    return csr(crow, col, torch.ones(col.numel(), dtype=torch.bool), (sets.rows, sets.n))


def _fingerprint(sets: Sets) -> tuple[tuple[Any, ...], tuple[Tensor, ...]]:
    """A key (the form and sizes) and the tensors that hold index sets in that form: two with
    equal keys and equal tensors (``torch.equal``) are equal."""
    ell, row, col = sets.forms()
    if ell is not None:
        return ("ell", sets.rows, sets.n, tuple(ell.shape)), (ell,)
    assert row is not None and col is not None
    return ("pairs", sets.rows, sets.n, row.numel()), (row, col)


def _slots() -> int:
    return sum(t.numel() for _, parts, _ in _detected for t in parts)


def plan_of(pattern: Tensor) -> PatternPlan:
    """The plan cached on ``pattern`` (NOTE [pattern plan]), made if missing or stale."""
    key = _key(pattern)
    found = getattr(pattern, _ATTR, None)
    if isinstance(found, tuple) and found[0] == key:
        return found[1]
    m, n = pattern.shape
    # int64, whatever the pattern's (SciPy's indptr and indices are int32)
    crow, col = pattern.crow_indices().cpu().long(), pattern.col_indices().cpu().long()
    rows = torch.repeat_interleave(torch.arange(m), crow[1:] - crow[:-1])
    keep = pattern.values().cpu()
    keys = rows * n + col
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
        # not canonical (torch builds it unchecked): an entry twice would be read out twice,
        # its value doubled by any sum of the result; sorted, each entry once (kept if any
        # of its copies is True)
        keys = sorted_unique(keys[keep])
        rows, cols = keys // max(n, 1), keys % max(n, 1)
        plan = PatternPlan(m, n, _crow(rows, m), rows, cols)
    elif bool(keep.all()):
        plan = PatternPlan(m, n, crow.clone(), rows, col.clone())
    else:
        rows, cols = rows[keep], col[keep]
        plan = PatternPlan(m, n, _crow(rows, m), rows, cols)
    setattr(pattern, _ATTR, (key, plan))
    return plan
