"""The empirical NTK from one capture per batch: closed forms, ghost products, general path.

NOTE [ntk plan]: each batch (``x1``, and ``x2`` when given) runs through the model once with
layer capture (NOTE [layer capture]); one backward pass per output element, broadcast over the
batch (samples are independent, which is checked), gives every layer's ``δ`` for every sample.
A model that is a chain of layers (NOTE [parameter chain], from its ops where it is not an
``nn.Sequential``) gives the same ``δ`` from the chain's own backward pass instead.
The kernel is then summed parameter by parameter: Linear weight and bias together as
``(δ₁δ₂ᵀ) ⊙ (a₁a₂ᵀ + 1)``, other closed forms by ghost products or their per-sample Jacobian
(NOTE [ghost products]), and parameters no closed form covers (on either batch) on the general
path, ``vmap`` over samples (NOTE [general per-sample path]), in probe chunks under the budget
(NOTE [blocked kernel]). The result is ``[N₁·k, N₂·k]`` with ``k`` output elements per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchjac._checks import describe
from torchjac._engine.core.basis import Group
from torchjac._engine.core.blocked import Make, blocked_kernel
from torchjac._engine.core.module_proof import proven_per_sample
from torchjac._engine.core.plan import choose_chunk_size
from torchjac._engine.core.run import run_chunks
from torchjac._engine.modules.ghost import UseD, layer_kernel, param_kernel
from torchjac._engine.modules.layer_deltas import CouplingCheck, deltas, retry_declining
from torchjac._engine.modules.layers import Capture, ModelState, capture
from torchjac._engine.modules.param_chain import Chain, param_chain
from torchjac._engine.modules.sample_vmap import SampleProblem

__all__ = ["NtkSide", "kernel_of", "run_side"]


@dataclass(frozen=True)
class NtkSide:
    """One batch through the model: its capture, the ``D`` of every use for all output elements."""

    cap: Capture
    uses: list[UseD]
    n: int
    out_rest: torch.Size
    args: tuple[Tensor, ...]
    proven: bool = False  # per sample by structure: no coupling check (NOTE [sequential proof])

    @property
    def k(self) -> int:
        return self.out_rest.numel()


def run_side(
    fn: str,
    arg: str,
    model: nn.Module,
    state: ModelState,
    xs: tuple[Tensor, ...],
    batch_dim: int,
    chunk_size: int | None,
    budget: int,
) -> NtkSide:
    """``model(*xs)`` captured, checked for coupling, and its ``δ`` for every output element."""
    proven = proven_per_sample(model, tuple(xs), {}, batch_dim)  # before any hook of ours
    # NOTE [parameter chain]: a proven Sequential's modules, else the layers read from its ops
    chain = param_chain(model, state, tuple(xs), {}, batch_dim, not proven)

    def attempt(declined: frozenset, caps: list[Capture]) -> NtkSide:
        return _run_side(
            fn, arg, model, state, xs, batch_dim, chunk_size, budget, proven, chain, declined,
            caps,
        )  # fmt: skip

    return retry_declining(attempt)


def _run_side(
    fn: str,
    arg: str,
    model: nn.Module,
    state: ModelState,
    xs: tuple[Tensor, ...],
    batch_dim: int,
    chunk_size: int | None,
    budget: int,
    proven: bool,
    chain: Chain | None,
    declined: frozenset,
    caps: list[Capture],
) -> NtkSide:
    """``run_side`` with the layers ``declined`` on the general path (NOTE [layer batch axis])."""
    leaves = tuple(x.detach().requires_grad_(True) if x.is_floating_point() else x for x in xs)
    if chain is not None:
        cap, proven = Capture(output=chain.output, state=state, uses=chain.uses), True
    else:
        cap = capture(
            model, state, leaves, {}, batch_dim, fn_name=fn, prove=not proven, decline=declined
        )
        proven = proven or cap.proven  # NOTE [op batch proof]
    caps.append(cap)
    out = cap.output
    unbatched = (
        f" If {arg} (shape {list(xs[0].shape)}) is one sample without a batch dimension, pass "
        f"{arg}.unsqueeze({batch_dim}): ntk needs the input batched at `batch_dim={batch_dim}`."
    )
    if not out.is_floating_point() or out.dim() == 0 or not -out.dim() <= batch_dim < out.dim():
        raise ValueError(
            f"{fn}: the model must return a floating Tensor with the batch at dim {batch_dim}; "
            f"for {arg} it returned {describe(out)}.{unbatched if out.is_floating_point() else ''}"
        )
    group = Group.of([out], batch_dim)
    if group.batch_size != xs[0].shape[batch_dim]:
        raise ValueError(
            f"{fn}: the model's output has {group.batch_size} samples at dim {batch_dim} but "
            f"{arg} has {xs[0].shape[batch_dim]}; the batch must be kept at `batch_dim`."
            f"{unbatched}"
        )
    names = {m: n for n, m in model.named_modules()}
    tags = [arg] if len(xs) == 1 else [f"{arg}[{i}]" for i in range(len(xs))]
    inputs = [(tag, t) for tag, t in zip(tags, leaves) if t.requires_grad]
    check = CouplingCheck(
        fn, cap, batch_dim, inputs, lambda u: f"the layer {names.get(u.module, '?')!r}", proven
    )
    k = group.numel
    ds: list[list[Tensor]] = [[] for _ in cap.uses]
    work = chain.work if chain is not None else 2 * sum(u.e.numel() for u in cap.uses)
    per_probe = work * out.element_size()
    chunk = choose_chunk_size(k, max(per_probe, 1), budget, chunk_size)

    def probe(start: int, stop: int, batched: bool) -> list[Tensor | None]:
        if chain is not None:
            return chain.deltas(start, stop)
        basis = group.one_hot(start, stop, out.dtype, out.device)[0]
        assert basis is not None
        return deltas(cap, basis, batched, check)

    hit = [False] * len(cap.uses)

    def write(start: int, stop: int, got: list[Tensor | None]) -> None:
        for i, (use, store, d) in enumerate(zip(cap.uses, ds, got)):
            if d is None:  # no gradient reached this use for these probes: zeros
                z = torch.zeros(stop - start, *use.e.shape, dtype=out.dtype, device=out.device)
                d = use.rows(z)
            else:
                hit[i] = True
            store.append(d)

    if not cap.uses or not k:  # nothing to carry the check's probes: it runs alone, first
        check.run()
    run_chunks(fn, k, chunk, probe, write)
    uses = [(u, _joined(d)) for u, d, h in zip(cap.uses, ds, hit) if h]
    return NtkSide(cap, uses, group.batch_size, group.rest_shape(0), tuple(xs), proven)


def _joined(chunks: list[Tensor]) -> Tensor:
    """The probes' ``δ`` of one use, chunks joined along the probes (one chunk as it is)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


def kernel_of(
    fn: str,
    model: nn.Module,
    state: ModelState,
    side1: NtkSide,
    side2: NtkSide,
    batch_dim: int,
    chunk_size: int | None,
    budget: int,
) -> Tensor:
    """``[N1·k, N2·k]``: closed forms per parameter, the general path for the rest.

    ``side2 is side1`` means ``K(x1, x1)``: shared products are formed once.
    """
    general = [n for n in state.names if n in side1.cap.general or n in side2.cap.general]
    dtype = side1.cap.output.dtype
    kernel = torch.zeros(
        side1.n * side1.k, side2.n * side2.k, dtype=dtype, device=side1.cap.output.device
    )
    by1 = {n: _uses_of(side1, n) for n in state.names}
    by2 = by1 if side2 is side1 else {n: _uses_of(side2, n) for n in state.names}
    done: set[str] = set(general)
    for u, _ in side1.uses:  # Linear layers with weight and bias: one shared δ product
        w, b = u.weight, u.bias
        if w is None or b is None or w in done or b in done:
            continue
        if _ids(by1[w]) != _ids(by1[b]) or _ids(by2[w]) != _ids(by2[b]):
            continue
        part = layer_kernel(by1[w], by2[w])
        if part is not None:
            kernel += part
            done.update((w, b))
    for name in state.names:
        if name not in done:
            part = param_kernel(name, by1[name], by2[name], state.leaves[name].shape, budget)
            if part is not None:
                kernel += part
    if general:
        make1 = _general(fn, model, state, general, side1, batch_dim, chunk_size, budget)
        make2 = None
        if side2 is not side1:
            make2 = _general(fn, model, state, general, side2, batch_dim, chunk_size, budget)
        size = sum(state.leaves[n].numel() for n in general) * dtype.itemsize * 3
        kernel += blocked_kernel(
            (side1.n, side1.k, side2.n, side2.k),
            make1,
            make2,
            (side1.n * size, side2.n * size),
            budget,
            kernel,
        )
    return kernel


def _general(
    fn: str,
    model: nn.Module,
    state: ModelState,
    names: list[str],
    side: NtkSide,
    batch_dim: int,
    chunk_size: int | None,
    budget: int,
) -> Make:
    """Per-sample Jacobians ``[N, c, P]`` of ``names`` (concatenated) for a chunk of probes, on
    the general path (NOTE [general per-sample path])."""
    problem = SampleProblem(model, state, names, side.args, {}, batch_dim, side.cap.output, fn)
    out = side.cap.output
    if not side.proven:
        problem.check_alone(out, fn, batch_dim)  # couplings only through these parameters
    sizes = [state.leaves[n].numel() for n in names]
    per_probe = 3 * out.dtype.itemsize * side.n * sum(sizes)

    def make(start: int, stop: int) -> Tensor:
        res = torch.empty(side.n, stop - start, sum(sizes), dtype=out.dtype, device=out.device)

        def rows(lo: int, hi: int, vectorised: bool) -> dict[str, Tensor]:
            return problem.rows(start + lo, start + hi, vectorised)

        def write(lo: int, hi: int, got: dict[str, Tensor]) -> None:
            off = 0
            for name, size in zip(names, sizes):
                res[:, lo:hi, off : off + size] = got[name].reshape(side.n, hi - lo, size)
                off += size

        chunk = choose_chunk_size(stop - start, per_probe, budget, chunk_size)
        run_chunks(fn, stop - start, chunk, rows, write)
        return res

    return make


def _ids(uses: list[UseD]) -> list[int]:
    return [id(u) for u, _ in uses]


def _uses_of(side: NtkSide, name: str) -> list[UseD]:
    return [(u, d) for u, d in side.uses if name in (u.weight, u.bias)]
