"""Output sensitivities ``δ`` of captured layers by backward passes, and the coupling check that
rides along with the first of them (see NOTE [layer capture] in ``layers``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from torchjac._engine.core.lean_vmap import batched_grad
from torchjac._engine.core.structure import sample_masks
from torchjac._engine.modules.closed_forms import Use
from torchjac._engine.modules.layers import Capture
from torchjac._errors import BatchCouplingError, coupling_fix

__all__ = ["CouplingCheck", "LayerCoupled", "deltas", "retry_declining"]

T = TypeVar("T")


def deltas(
    cap: Capture, cotangents: Tensor, batched: bool = True, check: CouplingCheck | None = None
) -> list[Tensor | None]:
    """Canonical ``D`` for every use (see the module docstring), for ``cotangents`` ``[k, *out]``.

    One backward pass (vectorised over the ``k`` probes when ``batched``, else one pass per
    probe). A use the output does not reach gets ``None``. A pending ``check`` rides along: its
    two probes are added to this pass (NOTE [coupling check] in ``structure``).
    """
    if check is None or not check.pending:
        return _backward(cap, cotangents, (), batched)[0]
    k = cotangents.shape[0]
    cots = torch.cat([cotangents.to(check.cotangents.dtype), check.cotangents])
    ds, gs = _backward(cap, cots, check.extra, batched)
    check.verify(ds, gs, k)
    return [None if d is None else d[:, :k] for d in ds]


def _backward(
    cap: Capture, cotangents: Tensor, extra: Sequence[Tensor], batched: bool
) -> tuple[list[Tensor | None], list[Tensor | None]]:
    """One backward pass over the probes of ``cotangents``: ``δ`` per use, gradient per extra.

    Vectorised by ``is_grads_batched``: ``convolution_backward`` has no batching rule there and
    runs once per probe inside the pass, which still measured faster than a loop of plain passes
    (4.3 against 5.0 ms for ten probes through a small CNN); by functorch's vmap where the graph
    holds an op the legacy one gets wrong (NOTE [wrong batching rules]).
    """
    es = [u.e for u in cap.uses]
    targets = es + list(extra)
    if not targets:
        return [], []
    if not cap.output.requires_grad:  # nothing reaches the output (a no_grad forward): zeros
        return [None] * len(es), [None] * len(extra)
    cot = cotangents.to(cap.output.dtype)
    if batched:  # NOTE [wrong batching rules]: the legacy vmap unless the graph makes it wrong
        grads: Sequence[Tensor | None] = batched_grad(
            [cap.output], targets, [cot], True, False, prefer="legacy"
        )
    else:
        per_probe = [
            torch.autograd.grad([cap.output], targets, [c], retain_graph=True, allow_unused=True)
            for c in cot
        ]
        grads = [None if gs[0] is None else torch.stack(gs) for gs in zip(*per_probe)]
    ds: list[Tensor | None] = [
        None if g is None else u.rows(g) for u, g in zip(cap.uses, grads[: len(es)])
    ]
    return ds, list(grads[len(es) :])


class CouplingCheck:
    """Raise ``BatchCouplingError`` when an output sample depends on another sample.

    One probe per set S of ``structure.sample_masks`` and one per complement (NOTE [coupling
    check] in ``structure``): a random cotangent on S; the ``δ`` of every use, and the gradient of
    every given batched input (leaves requiring grad), must vanish outside S. The probes ride
    along with the first ``deltas`` pass (``pending`` until then), or run alone (``run``); a
    model ``proven`` per sample by its structure needs none (NOTE [sequential proof]).
    """

    def __init__(
        self,
        fn_name: str,
        cap: Capture,
        batch_dim: int,
        inputs: Sequence[tuple[str, Tensor]],
        describe_use: Callable[[Use], str],
        proven: bool = False,
    ) -> None:
        out = cap.output
        self.fn_name, self.cap, self.batch_dim = fn_name, cap, batch_dim
        self.inputs, self.describe_use = list(inputs), describe_use
        self.extra = [t for _, t in inputs]
        bd = batch_dim % out.dim()
        self.proven = proven
        self.pending = out.shape[bd] > 1 and not proven
        probes = _cached_probes if out.numel() <= 1 << 16 else _probes  # never hold large ones
        self.cotangents, self.outside = probes(tuple(out.shape), bd, out.dtype, out.device)

    def run(self) -> None:
        """The check on its own (one backward pass per probe), unless already done."""
        if self.pending:
            ds, gs = _backward(self.cap, self.cotangents, self.extra, batched=False)
            self.verify(ds, gs, 0)

    def verify(self, ds: list[Tensor | None], gs: list[Tensor | None], first: int) -> None:
        """Check a pass whose probes from ``first`` on were this check's."""
        for h, outside in enumerate(self.outside):
            for use, d in zip(self.cap.uses, ds):
                if d is not None and bool((d[:, first + h][outside].nan_to_num(0.0) != 0).any()):
                    _raise_coupled(self.fn_name, self.batch_dim, self.describe_use(use), use)
            for (name, x), g in zip(self.inputs, gs):
                if g is None:
                    continue
                per_sample = g[first + h].movedim(self.batch_dim % x.dim(), 0)[outside]
                if bool((per_sample.nan_to_num(0.0) != 0).any()):
                    _raise_coupled(self.fn_name, self.batch_dim, name)
        self.pending = False


def _probes(
    shape: tuple[int, ...], bd: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, list[Tensor]]:
    """The check's cotangents ``[M, *shape]`` and the samples outside each set (never mutated)."""
    bsz = shape[bd]
    sets = [m for s in sample_masks(bsz, device, rows=True) for m in (s, ~s)] if bsz > 1 else []
    gen = torch.Generator().manual_seed(7)
    cot = torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    view = [1] * len(shape)
    view[bd] = bsz
    if not sets:
        return cot.new_empty(0), []
    return torch.stack([cot * m.reshape(view).to(dtype) for m in sets]), [~m for m in sets]


_cached_probes = functools.lru_cache(maxsize=16)(_probes)


class LayerCoupled(BatchCouplingError):
    """Coupling seen at a closed form's use: its layer may only have its input's batch at
    another dim than assumed (NOTE [layer batch axis]); ``module`` is that layer."""

    def __init__(self, message: str, module: object) -> None:
        super().__init__(message)
        self.module = module


def retry_declining(run: Callable[[frozenset, list[Capture]], T]) -> T:
    """``run(declined, caps)``, again with a layer declined each time the coupling check blames
    a layer whose input's batch was ambiguous (NOTE [layer batch axis]) in the last capture
    ``run`` appended to ``caps``. Any other coupling error, or a second one at a layer, is
    raised."""
    declined: frozenset = frozenset()
    caps: list[Capture] = []
    while True:
        try:
            return run(declined, caps)
        except LayerCoupled as err:
            ambiguous = caps[-1].ambiguous if caps else frozenset()
            if err.module in declined or err.module not in ambiguous:
                raise
            declined = declined | {err.module}


def _raise_coupled(fn_name: str, batch_dim: int, where: str, use: Use | None = None) -> None:
    message = (
        f"{fn_name}: `batch_dim={batch_dim}` declares that output sample i depends only on "
        f"sample i, but the outputs depend on other samples through {where}. Samples are "
        "coupled, e.g. by BatchNorm in train mode (call model.eval()), batch statistics such as "
        f"`x - x.mean(0)`, or attention across the batch. {coupling_fix(fn_name)}"
    )
    if use is not None:
        raise LayerCoupled(message, use.module)
    raise BatchCouplingError(message)
