"""Lazy probe bases over a group of tensors, and the flat layout results are written in.

NOTE [flat layout]: a group of tensors (the outputs, or the inputs) is seen as one flat vector per
sample: with ``batch_dim`` each tensor's batch dimension is set aside and the remaining elements of
all tensors are concatenated; without it there is one virtual sample. A probe index is a position
in that flat vector. Bases are built one chunk at a time (never ``eye(m)`` up front); a one-hot
probe is broadcast over the batch, which is what makes per-sample Jacobians cost ``out`` probes
instead of ``B * out`` (seed 002's sum trick, done without the cross terms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["Group"]


@dataclass(frozen=True)
class Group:
    """Shapes of a group of tensors and where their per-sample elements sit in the flat vector."""

    shapes: tuple[torch.Size, ...]
    batch_dims: tuple[int | None, ...]  # normalised (non-negative) or None
    batch_size: int  # 1 when unbatched

    @staticmethod
    def of(tensors: Sequence[Tensor], batch_dim: int | None) -> Group:
        bds = tuple(None if batch_dim is None else batch_dim % t.dim() for t in tensors)
        bsz = 1 if batch_dim is None else tensors[0].shape[batch_dim]
        return Group(tuple(t.shape for t in tensors), bds, bsz)

    def rest_shape(self, i: int) -> torch.Size:
        """Shape of tensor ``i`` without its batch dimension."""
        shape, b = self.shapes[i], self.batch_dims[i]
        return shape if b is None else shape[:b] + shape[b + 1 :]

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(self.rest_shape(i)) for i in range(len(self.shapes)))

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)

    @cached_property
    def numel(self) -> int:
        return sum(self.sizes)

    def touched(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Tensors whose flat range meets ``[start, stop)``: (index, local start, local stop)."""
        hits = []
        for i, (off, size) in enumerate(zip(self.offsets, self.sizes)):
            lo, hi = max(start, off), min(stop, off + size)
            if lo < hi:
                hits.append((i, lo - off, hi - off))
        return hits

    def expand(self, i: int, flat: Tensor) -> Tensor:
        """``[c, rest_numel]`` (or ``[c, B, rest_numel]``) -> ``[c, *shapes[i]]``."""
        c, b = flat.shape[0], self.batch_dims[i]
        rest = self.rest_shape(i)
        if b is None:
            return flat.reshape(c, *rest)
        if flat.dim() == 2:  # the same probe for every sample: broadcast, no copy
            x = flat.reshape(c, *rest).unsqueeze(1 + b)
            return x.expand(c, *self.shapes[i])
        x = flat.reshape(c, self.batch_size, *rest)
        return x.movedim(1, 1 + b)

    def one_hot(
        self, start: int, stop: int, dtype: torch.dtype, device: torch.device
    ) -> list[Tensor | None]:
        """Probes ``start..stop-1``, one tensor per member (``None``: member untouched)."""
        c = stop - start
        out: list[Tensor | None] = [None] * len(self.shapes)
        for i, lo, hi in self.touched(start, stop):
            skip = self.offsets[i] + lo - start
            if skip == 0 and lo == 0:  # the member starts the chunk: rows past its end are zero
                flat = torch.eye(c, self.sizes[i], dtype=dtype, device=device)
            else:
                flat = torch.zeros(c, self.sizes[i], dtype=dtype, device=device)
                flat[skip : skip + hi - lo].diagonal(offset=lo).fill_(1)
            out[i] = self.expand(i, flat)
        return out

    def flatten(self, i: int, t: Tensor) -> Tensor:
        """``[c, *shapes[i]]`` -> ``[B, c, rest_numel]`` (B = 1 when unbatched)."""
        return self.probe_major(i, t).transpose(0, 1)

    def probe_major(self, i: int, t: Tensor) -> Tensor:
        """``[c, *shapes[i]]`` -> ``[c, B, rest_numel]`` (B = 1 when unbatched), a view if possible.

        Results are stored probe-major so each chunk is written contiguously; the public layout
        (batch first) is a permuted view of that storage.
        """
        c, b = t.shape[0], self.batch_dims[i]
        if b is None:
            return t.reshape(c, 1, self.sizes[i])
        return t.movedim(1 + b, 1).reshape(c, self.batch_size, self.sizes[i])  # B may be 0
