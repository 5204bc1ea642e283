"""Result buffers: large ones are asked to live on huge pages (Linux, CPU).

NOTE [huge pages]: a large Jacobian is written once into fresh memory, and on CPU the cost of
that first touch is the kernel's page faults, one per 4 KiB page: writing 84 MiB of per-sample
Jacobians (W3) took 40-50 ms in page faults against 6 ms for the same copy into memory already
touched. Buffers of at least 32 MiB (which glibc always maps afresh, so no heap memory is
involved) are advised ``MADV_HUGEPAGE`` before their first write: 2 MiB pages, 512 times fewer
faults. Not below 32 MiB: smaller buffers come from glibc's heap, where the advice measured 5x
slower (a 10 MiB buffer, W3b), the kernel compacting memory for every reuse. It is a hint on
memory torchjac has just allocated and hands to the caller; it changes
no global setting, and when it is unavailable (another OS, a kernel with transparent huge pages
off, no libc) nothing happens. ``TORCHJAC_HUGE_PAGES=0`` turns it off. (PyTorch's own
``THP_MEM_ALLOC_ENABLE=1`` does the same for every allocation of the process.)
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["empty", "zeros"]

_HUGE_PAGE = 2 << 20
_MIN_BYTES = 32 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux") or os.environ.get("TORCHJAC_HUGE_PAGES") == "0":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty``, on huge pages when large and on the CPU (NOTE [huge pages])."""
    t = torch.empty(tuple(shape), dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < _MIN_BYTES:
        return t
    advise = _madvise()
    if advise is not None:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # the whole huge pages inside
        stop = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if stop > start:
            advise(start, stop - start, _MADV_HUGEPAGE)  # a hint: its failure changes nothing
    return t


def zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.zeros`` with the memory of :func:`empty`."""
    return empty(shape, dtype, device).zero_()
