"""The general per-sample path's lookups with ``scale_grad_by_freq``: the whole call's counts.

NOTE [per-sample index counts]: torch's derivative of an embedding lookup with
``scale_grad_by_freq=True`` divides each row's gradient by the number of times its index occurs
in the call, and the per-sample Jacobian ``[N, C, *p]`` is by definition the block of rows of the
whole batched call's Jacobian: the counts of the whole call, all samples together (the closed
form of ``nn.Embedding`` divides by those, NOTE [embedding forward rules] too). The general
per-sample path runs the model on one sample at a time, where torch would count the sample's
indices only (``F.embedding`` in a hand-written ``forward`` was off by 0.2). There every lookup
with the option runs as the plain lookup, its tangent divided by the counts the same lookup
(the same call, in order) has in the model run on the whole batch. Those counts are recorded,
by one forward on the whole batch without a graph, only when a sample's run meets such a lookup
(``NeedCounts``), so a model without one pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from torchjac._engine.core.forward_rules import lookup_of

__all__ = ["LookupCounts", "NeedCounts", "WholeCallCounts"]


class NeedCounts(Exception):
    """A sample's run met a lookup with ``scale_grad_by_freq`` before the counts were recorded."""


class WholeCallCounts:
    """The index counts of each lookup with ``scale_grad_by_freq`` in the whole batch's run, in
    call order (NOTE [per-sample index counts])."""

    def __init__(self, fn_name: str) -> None:
        self.fn_name = fn_name
        self.counts: list[Tensor] | None = None

    def record(self, run_whole: Callable[[], Any]) -> None:
        """Run the model on the whole batch (no graph, the random state kept) and keep counts."""
        recorder = LookupCounts()
        rng = torch.get_rng_state()
        try:
            with torch.no_grad(), recorder:
                run_whole()
        finally:
            torch.set_rng_state(rng)
        self.counts = recorder.counts

    def per_sample(self) -> TorchFunctionMode:
        """The mode a sample's run goes under: lookups divided by the whole call's counts."""
        return _Replay(self.counts, self.fn_name)


class LookupCounts(TorchFunctionMode):
    """Records the index counts of every lookup with ``scale_grad_by_freq`` run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[Tensor] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        lookup = lookup_of(func, args, kwargs)
        if lookup is not None and lookup.by_freq:
            self.counts.append(lookup.counts())
        return func(*args, **kwargs)


class _Replay(TorchFunctionMode):
    def __init__(self, counts: list[Tensor] | None, fn_name: str) -> None:
        super().__init__()
        self.counts, self.fn_name, self.seen = counts, fn_name, 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        lookup = lookup_of(func, args, kwargs)
        if lookup is None or not lookup.by_freq:
            return func(*args, **kwargs)
        if self.counts is None:
            raise NeedCounts
        rows = lookup.weight.shape[0]
        if self.seen >= len(self.counts) or self.counts[self.seen].shape[0] != rows:
            raise ValueError(
                f"{self.fn_name}: a lookup with `scale_grad_by_freq=True` (F.embedding) ran "
                "on one sample that the model on the whole batch does not run in the same "
                "order: its derivative divides by the whole call's index counts, so a sample's "
                "run must make the batch's lookups. Drop `batch_dim` for the full Jacobian."
            )
        counts = self.counts[self.seen]
        self.seen += 1
        return lookup.adjusted(lookup.plain(), counts)
