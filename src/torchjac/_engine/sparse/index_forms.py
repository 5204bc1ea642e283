"""The two forms of NOTE [index sets] as plain tensors, and the conversions between them.

*Padded rows* are an int64 ``[rows, K]`` tensor listing each row's columns, ``n`` for "none",
with repeats and in any order; *pairs* are int64 ``row`` and ``col`` tensors, sorted by row then
column, without duplicates. These kernels take and return tensors only, with no choice of
form: :class:`~torchjac._engine.sparse.index_sets.Sets` chooses, these compute.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "csr",
    "least",
    "padded_to_pairs",
    "pairs_to_padded",
    "remember",
    "shrink",
    "sorted_unique",
    "take_pairs",
    "wasteful",
]


def clean(e: Tensor, n: int) -> Tensor:
    """Each row sorted, repeats replaced by ``n`` (so a row's real entries stay in order)."""
    if e.shape[1] < 2:
        return e
    s = torch.sort(e, 1).values
    s[:, 1:].masked_fill_(s[:, 1:] == s[:, :-1], n)
    return s


def wasteful(rows: int, width: int, nnz: int) -> bool:
    """Padding ``nnz`` entries to ``rows`` rows of ``width`` takes over ``2 nnz + rows`` slots
    (one long row among short ones): pairs instead."""
    return rows * width > 2 * nnz + rows


def shrink(e: Tensor, n: int) -> Tensor | tuple[Tensor, Tensor]:
    """Padded rows without repeats, at the least width; or pairs, if that width is
    ``wasteful``."""
    rows = e.shape[0]
    c = torch.sort(clean(e, n), 1).values  # the "none"s last
    counts = (c < n).sum(1)
    k = int(counts.max()) if counts.numel() else 0
    if wasteful(rows, k, int(counts.sum())):
        return torch.repeat_interleave(torch.arange(rows), counts), c.masked_select(c < n)
    return c[:, :k].contiguous()


def take_pairs(col: Tensor, counts: Tensor, starts: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """The pairs of rows ``idx`` (each in ``0..rows-1``) of the pairs ``col`` (``counts``
    and ``starts``: each row's number of pairs and first pair), as rows ``0..len(idx)-1``."""
    c = counts.index_select(0, idx)
    total = int(c.sum())
    new_row = torch.repeat_interleave(torch.arange(idx.numel()), c, output_size=total)
    shift = starts.index_select(0, idx) - (torch.cumsum(c, 0) - c)  # source - result
    pos = torch.repeat_interleave(shift, c, output_size=total) + torch.arange(total)
    return new_row, col.index_select(0, pos)


def padded_to_pairs(e: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(row, col, counts)``: the pairs of padded rows, and the entries of each row."""
    s = clean(e, n)
    keep = s < n
    counts = keep.sum(1)
    return torch.repeat_interleave(torch.arange(e.shape[0]), counts), s.masked_select(keep), counts


def pairs_to_padded(
    row: Tensor, col: Tensor, starts: Tensor, rows: int, width: int, n: int
) -> Tensor:
    """Padded rows ``[rows, width]`` from pairs (``starts``: where each row's pairs begin)."""
    e = torch.full((rows, width), n, dtype=torch.long)
    if col.numel():
        e[row, torch.arange(col.numel()) - starts[row]] = col
    return e


def remember(cache: dict[Any, Any], key: Any, value: Any, limit: int) -> None:
    """``cache[key] = value`` in a cache of at most ``limit`` entries, the oldest dropped first."""
    if key not in cache and len(cache) >= limit:
        del cache[next(iter(cache))]
    cache[key] = value


BETA_WARNING = "Sparse CSR tensor support is in beta"


def csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, ...]) -> Tensor:
    """``torch.sparse_csr_tensor`` without torch's "beta" warning (torch's, not the user's):
    hidden while torch may still issue it (``catch_warnings`` cost a W9 call 18 us): a
    ``TORCH_WARN_ONCE`` already issued stays silent unless ``torch.set_warn_always(True)``,
    which makes it show every time and is asked at each call."""
    if _beta_warned_once() and not torch.is_warn_always_enabled():
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", BETA_WARNING, UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


@functools.cache
def _beta_warned_once() -> bool:
    """Whether torch issues its beta warning once per process (a ``TORCH_WARN_ONCE``) and so
    never again (unless ``torch.set_warn_always(True)``, asked by the caller at each call):
    two tiny tensors made here, all their warnings hidden, say so."""
    crow, col = torch.tensor([0, 1]), torch.tensor([0])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.sparse_csr_tensor(crow, col, torch.ones(1), (1, 1), check_invariants=False)
    return sum(BETA_WARNING in str(w.message) for w in seen) <= 1


def sorted_unique(keys: Tensor) -> Tensor:
    """Sorted, without duplicates. Keys are mostly a few sorted runs (the parts of a union):
    NumPy's stable sort (timsort) merges runs, 8x faster than ``torch.sort`` on them."""
    ordered = torch.from_numpy(np.sort(keys.numpy(), kind="stable"))
    return torch.unique_consecutive(ordered)


def least(e: Tensor) -> int:
    """The least entry (NumPy's reduction on CPU: 5x faster than torch's on these sizes)."""
    if e.device.type == "cpu":
        return int(e.numpy().min())
    return int(e.min())
