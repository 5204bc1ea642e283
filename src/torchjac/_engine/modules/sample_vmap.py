"""The general per-sample path: ``functional_call`` vmapped over samples, for any module.

NOTE [general per-sample path]: a parameter no closed form covers (a bare ``nn.Parameter`` used
in a custom ``forward``, attention, BatchNorm in eval mode, ...) is differentiated by running the
model on one sample at a time (a batch of one, under ``vmap`` over the samples), with one
vector-Jacobian product per output probe (``vmap`` over the probes). Only those parameters are
inputs of the transform; every other tensor is a constant. Tensors of ``args``/``kwargs`` whose
size at the batch dimension equals the output's batch size are split per sample, every other
value is shared. A chunk that cannot be vectorised is redone with a loop over samples and probes
(NOTE [fallback] in ``run``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchjac._engine.core.lean_vmap import batch_way, batched_grad
from torchjac._engine.modules.layers import ModelState, call
from torchjac._engine.modules.sample_counts import NeedCounts, WholeCallCounts
from torchjac._errors import BatchCouplingError, coupling_fix

__all__ = ["SampleProblem"]


class SampleProblem:
    """Per-sample rows ``[N, k, *p]`` of ``names`` for output probes ``start..stop-1``."""

    def __init__(
        self,
        model: nn.Module,
        state: ModelState,
        names: Sequence[str],
        args: tuple,
        kwargs: dict,
        batch_dim: int,
        out: Tensor,
        fn_name: str,
    ) -> None:
        self.model, self.fn_name = model, fn_name
        self.names = tuple(names)
        self.params = {n: state.leaves[n].detach() for n in self.names}
        self.base = {
            **state.fixed,
            **{n: t.detach() for n, t in state.leaves.items() if n not in self.params},
        }
        self.out_dim = batch_dim % out.dim()
        self.n = out.shape[self.out_dim]
        self.n_out = out.numel() // self.n
        self.dtype = out.dtype
        self.device = out.device
        flat, self.spec = tree_flatten((args, kwargs))
        self.flat = flat
        self.counts = WholeCallCounts(fn_name)  # NOTE [per-sample index counts]
        # NOTE [wrong batching rules]: the batch's graph has the ops of a sample's
        self.vmap_safe = out.grad_fn is None or batch_way([out]) == "functorch"
        self.dims: list[int | None] = []
        for t in flat:
            dim = batch_dim % t.dim() if isinstance(t, Tensor) and t.dim() > 0 else None
            self.dims.append(dim if dim is not None and t.shape[dim] == self.n else None)
        if all(d is None for d in self.dims):
            raise ValueError(
                f"{fn_name}: no tensor argument has the output's batch size {self.n} at "
                f"`batch_dim={batch_dim}`, so samples cannot be split. Pass the inputs batched "
                f"at `batch_dim` (the output keeping the batch there)."
            )

    def _row(self, params: dict[str, Tensor], flat: Sequence[Any], counted: bool = True) -> Tensor:
        """The model on one sample (batch of one), flattened to ``[n_out]``; ``counted``: its
        lookups' derivatives use the whole batch's index counts (raises ``NeedCounts`` until
        recorded)."""
        args, kwargs = tree_unflatten(list(flat), self.spec)
        with _PreluAsWhere(), self.counts.per_sample() if counted else contextlib.nullcontext():
            out = call(self.model, {**self.base, **params}, args, kwargs)
        if out.dim() <= self.out_dim or out.shape[self.out_dim] != 1:
            raise ValueError(
                f"{self.fn_name}: on one sample (a batch of 1) the model returned shape "
                f"{list(out.shape)}, without a batch of 1 at dim {self.out_dim}: its output does "
                f"not follow the batch of its inputs (e.g. a squeeze). {coupling_fix(self.fn_name)}"
            )
        return out.movedim(self.out_dim, 0).reshape(-1)

    def check_alone(self, out: Tensor, fn_name: str, batch_dim: int) -> None:
        """Raise ``BatchCouplingError`` unless each sample alone gives its row of ``out``.

        NOTE [general per-sample path]: these rows are computed one sample at a time, so a
        coupling only through the parameters of this path (e.g. ``table[idx] - mean``, with
        integer inputs and no covered layer for the probes of ``CouplingCheck``) would silently
        give the rows of the samples alone. Their values, against the batch's, tell: equal up to
        rounding when the samples are independent (a random model, e.g. dropout in train mode,
        fails this too).
        """

        def one(*flat: Any) -> Tensor:
            flat1 = [t if d is None else t.unsqueeze(d) for t, d in zip(flat, self.dims)]
            return self._row(self.params, flat1, counted=False)

        rng = torch.get_rng_state()
        with torch.no_grad():
            try:
                alone = vmap(one, in_dims=tuple(self.dims))(*self.flat)
            except Exception:  # not vectorisable: one sample at a time, errors as they are
                alone = torch.stack(
                    [self._row(self.params, self._sample(s), False) for s in range(self.n)]
                )
        if not torch.equal(torch.get_rng_state(), rng):  # a draw per sample is not the batch's
            raise BatchCouplingError(
                f"{fn_name}: `batch_dim={batch_dim}` needs each sample's rows from the model run "
                f"on that sample, but the model draws random numbers (e.g. dropout in train mode, "
                f"F.dropout in forward), and a sample alone cannot repeat the batch's draw: call "
                f"model.eval(). {coupling_fix(fn_name)}"
            )
        together = out.detach().movedim(self.out_dim, 0).reshape(self.n, -1)
        scale = float(together.nan_to_num(0.0, 0.0, 0.0).abs().max()) if together.numel() else 0.0
        tol = 1000 * torch.finfo(together.dtype).eps * max(1.0, scale)
        same = torch.isclose(alone.to(together.dtype), together, rtol=0.0, atol=tol, equal_nan=True)
        if not bool(same.all()):
            raise BatchCouplingError(
                f"{fn_name}: `batch_dim={batch_dim}` declares that output sample i depends only "
                f"on sample i, but the model's output for a sample alone differs from its row "
                f"in the batch: samples are coupled through the parameters "
                f"{', '.join(self.names)} (e.g. a batch statistic), or the model is random (e.g. "
                f"dropout in train mode: call model.eval()). {coupling_fix(fn_name)}"
            )

    def _sample(self, s: int) -> list[Any]:
        """The flat arguments of sample ``s`` alone (a batch of one)."""
        return [t if d is None else t.narrow(d, s, 1) for t, d in zip(self.flat, self.dims)]

    def _basis(self, start: int, stop: int) -> Tensor:
        c = stop - start
        basis = torch.zeros(c, self.n_out, dtype=self.dtype, device=self.device)
        basis[torch.arange(c), torch.arange(start, stop)] = 1
        return basis

    def rows(self, start: int, stop: int, vectorised: bool) -> dict[str, Tensor]:
        """Rows ``[N, stop - start, *p]`` of each parameter, for output probes ``start..stop-1``."""

        def run() -> dict[str, Tensor]:
            if vectorised and self.vmap_safe:
                return self._vectorised(start, stop)
            return self._loop(start, stop, batched=vectorised)

        try:
            return run()
        except NeedCounts:  # NOTE [per-sample index counts]
            self.counts.record(self._whole)
            return run()

    def _whole(self) -> Any:
        args, kwargs = tree_unflatten(list(self.flat), self.spec)
        return call(self.model, {**self.base, **self.params}, args, kwargs)

    def _vectorised(self, start: int, stop: int) -> dict[str, Tensor]:
        basis = self._basis(start, stop)

        def one_sample(*flat: Any) -> dict[str, Tensor]:
            flat1 = [t if d is None else t.unsqueeze(d) for t, d in zip(flat, self.dims)]
            pullback = vjp(lambda p: self._row(p, flat1), self.params)[1]
            return vmap(pullback)(basis)[0]

        return vmap(one_sample, in_dims=tuple(self.dims))(*self.flat)

    def _loop(self, start: int, stop: int, batched: bool = False) -> dict[str, Tensor]:
        """One sample at a time; its probes one at a time, or ``batched`` in one pass."""
        c = stop - start
        res = {
            n: torch.zeros(self.n, c, *p.shape, dtype=self.dtype, device=self.device)
            for n, p in self.params.items()
        }
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        basis = self._basis(start, stop) if batched else None
        for s in range(self.n):
            row = self._row(leaves, self._sample(s))
            if not row.requires_grad:
                continue
            if basis is not None:
                found = batched_grad([row], list(leaves.values()), [basis], False, False)
                for n, g in zip(leaves, found):
                    if g is not None:
                        res[n][s] = g
                continue
            for i in range(c):
                grads = torch.autograd.grad(
                    row[start + i], list(leaves.values()), retain_graph=True, allow_unused=True
                )
                for n, g in zip(leaves, grads):
                    if g is not None:
                        res[n][s, i] = g
        return res


class _PreluAsWhere(TorchFunctionMode):
    """``prelu`` written as ``where(x > 0, x, w · x)`` (the same values and derivatives): torch
    2.13's nested ``vmap`` of a ``vjp`` through ``prelu`` followed by pooling gives wrong values,
    and this path is exactly that (a subclass of ``nn.PReLU``, a hooked one, ``F.prelu``)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.prelu and len(args) + len(kwargs) == 2:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            shape = [1] * x.dim()
            if x.dim() >= 2 and w.numel() > 1:
                shape[1] = w.numel()
            return torch.where(x > 0, x, w.reshape(shape if w.numel() > 1 else []) * x)
        return func(*args, **kwargs)
