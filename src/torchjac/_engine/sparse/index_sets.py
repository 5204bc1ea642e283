"""Index sets of many tensor elements at once: which inputs each element depends on.

NOTE [index sets]: the dependence of a tensor's elements on the ``n`` input elements is a boolean
matrix ``D`` (one row per element, one column per input element), held in one of two forms:

- *padded rows* (``[rows, K]``): row ``i`` lists the columns of row ``i`` of ``D``, with the
  value ``n`` for "none"; entries may repeat and sit in any order. Taking rows (broadcasting,
  slicing, gathering, padding, a stencil's neighbours) is one gather, a union one
  concatenation. Repeats are sorted out when the width passes twice the width at the last
  clean-up (and at least ``CLEAN_WIDTH``), and at the end.
- *pairs* (``row``, ``col``): the nonzeros sorted by row then column, without duplicates; for
  rows of very different lengths (one dense row among short ones: padding would waste memory)
  and for ops that merge rows (reductions, products).

Every rule of NOTE [sparsity tracing] is built from ``gather`` (row ``i`` of the result is the
union of rows ``idx[i, :]``, ``-1`` for none: broadcasting, slicing, stencils), ``relabel``
(rows sent to new rows and merged: ``D_out = L D_in`` in the boolean semiring) and ``union``
(an output reading several inputs), on whichever form the operands are in: padded rows when
every operand has them, pairs otherwise. A matrix is padded when that takes at most
``2 nnz + rows`` slots. A union is lazy: it only lists its operands, and is formed when first
read, from the distinct matrices at the bottom of the unions it is made of (a chain of
elementwise ops costs no tensor work, and ``u`` met twice in ``-Δu - λ e^u`` is one operand);
an elementwise op's union does not even look whether an operand is empty (a slice of the
padding may be: it then adds only "none"s when the union is formed).
All of it is vectorised tensor code; the cost is the number of (element, input) pairs moved,
never ``rows × n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from torchjac._engine.sparse.index_forms import (
    least,
    padded_to_pairs,
    pairs_to_padded,
    remember,
    shrink,
    sorted_unique,
    take_pairs,
    wasteful,
)

__all__ = ["Sets"]

CLEAN_WIDTH = 8  # padded widths up to this keep their repeats until the end
IDENTITIES = 4  # identity sets kept (``Sets.identity``)
IDENTITY_ROWS = 2**20  # the largest kept


class Sets:
    """A boolean ``[rows, n]`` matrix: padded rows and/or sorted unique pairs (int64), or a
    lazy union of matrices."""

    __slots__ = (
        "_col",
        "_counts",
        "_ell",
        "_ext",
        "_live",
        "_no_ell",
        "_parts",
        "_row",
        "_starts",
        "n",
        "ref",
        "rows",
    )

    def __init__(
        self,
        rows: int,
        n: int,
        row: Tensor | None = None,
        col: Tensor | None = None,
        *,
        ell: Tensor | None = None,
        ref: int = 1,
        parts: list[Sets] | None = None,
        checked: bool = True,
    ) -> None:
        self.rows, self.n = rows, n
        self._row, self._col = row, col  # both or neither
        self._ell = ell
        self._parts = parts  # a lazy union of these (all live, when ``checked``)
        self.ref = ref  # the padded width at the last clean-up (repeats trigger)
        self._ext: Tensor | None = None
        self._no_ell = False  # the pairs' rows are too uneven to pad
        self._live: bool | None = True if parts and checked else None
        self._counts: Tensor | None = None
        self._starts: Tensor | None = None

    @staticmethod
    def empty(rows: int, n: int) -> Sets:
        return Sets(rows, n, ell=torch.zeros(rows, 0, dtype=torch.long), ref=0)

    @staticmethod
    def identity(n: int) -> Sets:
        """Row ``i`` is ``{i}``: the input's own sets, one kept per size (at most
        ``IDENTITIES`` of them, of up to ``IDENTITY_ROWS`` rows), with what reading them
        derives (a Sets is never written: every operation makes a new one)."""
        found = _identities.get(n)
        if found is None:
            ar = torch.arange(n)
            found = Sets(n, n, ar, ar, ell=ar.view(n, 1))
            if n <= IDENTITY_ROWS:
                remember(_identities, n, found, IDENTITIES)
        return found

    @staticmethod
    def from_keys(rows: int, n: int, keys: Tensor) -> Sets:
        """From ``row * n + col`` codes, in any order, duplicates allowed."""
        keys = sorted_unique(keys)
        return Sets(rows, n, keys // max(n, 1), keys % max(n, 1))

    # ---- the forms ----------------------------------------------------------------------
    def _formed(self) -> Sets:
        """Form a lazy union (once): from the distinct matrices at its bottom."""
        if self._parts is not None:
            leaves, seen, stack = [], set(), list(self._parts)
            while stack:
                s = stack.pop()
                if id(s) in seen:
                    continue
                seen.add(id(s))
                if s._parts is not None:
                    stack.extend(s._parts)
                else:
                    leaves.append(s)
            formed = _union_now(leaves, self.rows, self.n)
            self._row, self._col, self._ell = formed._row, formed._col, formed._ell
            self.ref, self._parts = formed.ref, None
        return self

    def _pairs(self) -> tuple[Tensor, Tensor]:
        self._formed()
        if self._row is None or self._col is None:
            assert self._ell is not None
            self._row, self._col, self._counts = padded_to_pairs(self._ell, self.n)
        return self._row, self._col

    @property
    def row(self) -> Tensor:
        return self._pairs()[0]

    @property
    def col(self) -> Tensor:
        return self._pairs()[1]

    def ell(self) -> Tensor | None:
        """The padded rows, made from the pairs when that wastes little; ``None`` otherwise."""
        self._formed()
        if self._ell is None and not self._no_ell:
            nnz = self.nnz
            width = int(self.counts.max()) if nnz and self.rows else 0
            if wasteful(self.rows, width, nnz):
                self._no_ell = True
                return None
            e = pairs_to_padded(self.row, self.col, self.starts, self.rows, width, self.n)
            self._ell, self.ref = e, width
        return self._ell

    @property
    def nnz(self) -> int:
        return int(self._pairs()[0].numel())

    @property
    def live(self) -> bool:
        """Some element depends on some input."""
        if self._live is None:
            if self._parts is not None:  # an unchecked lazy union
                self._live = self._any_part_live()
            elif self._ell is not None:
                e = self._ell
                self._live = bool(e.numel()) and bool(least(e) < self.n)
            else:
                self._live = bool(self.row.numel())
        return self._live

    def _any_part_live(self) -> bool:
        """Some matrix at the bottom of this lazy union is live: a walk down the unions not
        yet asked, without recursion (a chain of elementwise ops nests as deep as it is
        long), each matrix met once."""
        assert self._parts is not None
        stack, seen = list(self._parts), set()
        while stack:
            s = stack.pop()
            if id(s) in seen:
                continue
            seen.add(id(s))
            if s._live is None and s._parts is not None:
                stack.extend(s._parts)
            elif s.live:
                return True
        return False

    @property
    def maybe_live(self) -> bool:
        """``False`` only when known to depend on no input without looking at the entries
        (a constant's sets): ``live`` may still be ``False`` when this is ``True``."""
        if self._live is not None:
            return self._live
        e = self._ell
        return not (self._parts is None and e is not None and e.numel() == 0)

    @property
    def counts(self) -> Tensor:
        if self._counts is None:
            self._counts = torch.bincount(self.row, minlength=self.rows)[: self.rows]
        return self._counts

    @property
    def starts(self) -> Tensor:
        if self._starts is None:
            self._starts = torch.cumsum(self.counts, 0) - self.counts
        return self._starts

    # ---- the three operations -----------------------------------------------------------
    def gather(self, idx: Tensor, shifted: bool = False) -> Sets:
        """Row ``i`` of the result is the union of rows ``idx[i, :]`` of this one (``idx``
        ``[r]`` or ``[r, s]``, ``-1`` for none; any order, repeats allowed). ``shifted``:
        ``idx`` is one more (``0`` for none)."""
        r = idx.shape[0] if idx.dim() else 1
        idx = idx.long().reshape(r, math.prod(idx.shape[1:]))  # not ``-1``: ``idx`` may be empty
        if r == 0 or not self.live:
            return Sets.empty(r, self.n)
        e = self.ell()
        if e is not None:
            if self._ext is None:  # a first row of "none", for the -1s
                self._ext = torch.cat([e.new_full((1, e.shape[1]), self.n), e])
            at = idx.reshape(-1) if shifted else idx.reshape(-1) + 1
            ext = self._ext.view(-1) if self._ext.shape[1] == 1 else self._ext  # 1-D: 4x faster
            picked = ext.index_select(0, at).view(r, -1)
            return _tidy(Sets(r, self.n, ell=picked, ref=self.ref))
        if shifted:
            idx = idx - 1
        if idx.shape[1] == 1 and bool((idx >= 0).all()):
            return self._take_pairs(idx.view(-1))
        out = torch.arange(r).view(-1, 1).expand_as(idx)
        ok = idx >= 0
        return self._take_pairs(idx[ok]).relabel(out[ok], r)

    def strided(self, shape: Sequence[int], stride: Sequence[int], offset: int) -> Sets | None:
        """The rows a strided view (``shape``, ``stride``, ``offset`` over rows) reads, from
        contiguous padded rows (one copy), else ``None``."""
        e = self._formed()._ell
        if e is None or not e.is_contiguous():
            return None
        k, rows = e.shape[1], math.prod(shape)
        if k == 0:
            return Sets.empty(rows, self.n)
        at = e.storage_offset() + offset * k
        view = e.as_strided((*shape, k), (*(s * k for s in stride), 1), at)
        return Sets(rows, self.n, ell=view.reshape(rows, k), ref=self.ref)

    def take(self, idx: Tensor) -> Sets:
        """Row ``i`` of the result is row ``idx[i]`` of this one (any order, repeats allowed)."""
        return self.gather(idx.reshape(-1))

    def _take_pairs(self, idx: Tensor) -> Sets:
        if idx.numel() == 0:
            return Sets.empty(0, self.n)
        return Sets(idx.numel(), self.n, *take_pairs(self.col, self.counts, self.starts, idx))

    def relabel(self, to: Tensor, rows: int) -> Sets:
        """Row ``i`` goes to row ``to[i]`` of a ``rows``-row result; rows meeting there merge."""
        if not self.live:
            return Sets.empty(rows, self.n)
        to = to.reshape(-1).long()
        kept = to.numel() < 2 or bool((to[1:] > to[:-1]).all())  # order kept: nothing merges
        padded = self._formed()._ell
        if kept and padded is not None:
            e = padded.new_full((rows, padded.shape[1]), self.n)
            e[to] = padded
            return Sets(rows, self.n, ell=e, ref=self.ref)
        row, col = self._pairs()
        if kept:
            return Sets(rows, self.n, to[row], col)
        return Sets.from_keys(rows, self.n, to[row] * self.n + col)

    def pairs(self, out: Tensor, src: Tensor, rows: int) -> Sets:
        """``D_out = L D``: output ``out[k]`` reads element ``src[k]`` (the pairs of ``L``)."""
        return self.take(src).relabel(out, rows)

    @staticmethod
    def union(parts: Sequence[Sets], rows: int, n: int) -> Sets:
        """The union of same-shaped matrices: lazy (NOTE [index sets])."""
        live = [p for p in parts if p.live]
        if not live:
            return Sets.empty(rows, n)
        if len(live) == 1:
            return live[0]
        return Sets(rows, n, parts=live)

    @staticmethod
    def lazy_union(parts: Sequence[Sets], rows: int, n: int) -> Sets:
        """``union`` without looking at whether the parts are empty (that look reads every
        entry of a fresh slice): ``live`` asks the parts when first asked, and an empty part
        only adds "none"s to the padded rows when the union is formed."""
        if not parts:
            return Sets.empty(rows, n)
        if len(parts) == 1:
            return parts[0]
        return Sets(rows, n, parts=list(parts), checked=False)

    # ---- the rest -----------------------------------------------------------------------
    def dense_to(self, rows: int) -> Sets:
        """Every one of ``rows`` rows is the union of all of this matrix's rows."""
        padded = self._formed()._ell
        cols = torch.unique(self.col if padded is None else padded[padded < self.n])
        if cols.numel() == 0 or rows == 0:
            return Sets.empty(rows, self.n)
        return Sets(rows, self.n, ell=cols.view(1, -1).expand(rows, -1), ref=cols.numel())

    def keep_rows(self, mask: Tensor) -> Sets:
        """The nonzeros of the rows where ``mask`` (``[rows]`` bool) is False."""
        padded = self._formed()._ell
        if padded is not None:
            e = padded.masked_fill(mask.view(-1, 1), self.n)
            return Sets(self.rows, self.n, ell=e, ref=self.ref)
        keep = ~mask[self.row]
        return Sets(self.rows, self.n, self.row[keep], self.col[keep])

    def forms(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The padded rows, and the pairs' rows and columns, as held (``None``: a form not
        made; one of the two always is), a lazy union formed first. Read only."""
        self._formed()
        return self._ell, self._row, self._col


_identities: dict[int, Sets] = {}


def _union_now(parts: list[Sets], rows: int, n: int) -> Sets:
    """The union of formed, live matrices: one concatenation of padded rows, else pairs."""
    if len(parts) == 1:
        return parts[0]
    padded = [p.ell() for p in parts]
    if all(e is not None for e in padded):
        e = torch.cat(padded, 1)  # type: ignore[arg-type]
        return _tidy(Sets(rows, n, ell=e, ref=max(p.ref for p in parts)))
    return Sets.from_keys(rows, n, torch.cat([p.row * n + p.col for p in parts]))


def _tidy(s: Sets) -> Sets:
    """Sort out the repeats of padded rows grown past their trigger (NOTE [index sets]); to
    pairs if padding would then waste memory."""
    e = s._ell
    assert e is not None
    if e.shape[1] <= max(CLEAN_WIDTH, 2 * s.ref):
        return s
    got = shrink(e, s.n)
    if isinstance(got, tuple):
        return Sets(s.rows, s.n, *got)
    return Sets(s.rows, s.n, ell=got, ref=max(got.shape[1], 1))
