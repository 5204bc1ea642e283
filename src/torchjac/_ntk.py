"""``ntk``: the empirical neural tangent kernel of a module, without its parameter Jacobian."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchjac._checks import check_chunk_size, describe
from torchjac._engine.basis import Group
from torchjac._engine.blocked import Make, blocked_kernel
from torchjac._engine.func_call import one_fallback_warning
from torchjac._engine.ghost import UseD, layer_kernel, param_kernel
from torchjac._engine.layers import (
    Capture,
    ModelState,
    capture,
    check_coupling,
    deltas,
    model_state,
    no_side_effects,
)
from torchjac._engine.plan import choose_chunk_size, memory_budget
from torchjac._engine.run import run_chunks
from torchjac._engine.sample_vmap import SampleProblem

__all__ = ["ntk"]


def ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    params: Iterable[str | nn.Parameter] | None = None,
    batch_dim: int = 0,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
) -> Tensor:
    r"""Empirical neural tangent kernel :math:`K = J_1 J_2^\top` of ``model``'s parameters.

    Math: :math:`K[i, a, j, b] = \sum_\theta \partial f(x_1)_{i,a} / \partial\theta \;
    \partial f(x_2)_{j,b} / \partial\theta` over the parameters ``θ`` (sample ``i`` of ``x1``,
    output element ``a``; sample ``j`` of ``x2``, element ``b``). ``J`` (``N·C·P`` numbers) is
    never formed: Linear layers contribute ``(δ₁δ₂ᵀ) ⊙ (a₁a₂ᵀ)`` from their inputs ``a`` and
    output sensitivities ``δ`` (one backward pass per output element, for the whole batch);
    convolutions, embeddings and LayerNorm contribute through their per-sample Jacobians one
    parameter at a time; any other parameter through ``vmap(jacrev)`` over samples.

    Shapes: ``x1`` ``[N1, ...]`` and ``x2`` ``[N2, ...]`` (batch at ``batch_dim``); the model
    maps them to ``[N, *o]``; the result is ``[N1, *o, N2, *o]``. With ``x2=None`` it is
    ``K(x1, x1)``, symmetric and positive semi-definite.

    The model is never changed: parameters, ``.grad``, buffers, hooks, train/eval mode and the
    global RNG state are as before the call.

    Args:
        model: an ``nn.Module`` called as ``model(x)``, returning a Tensor.
        x1: the first batch of inputs.
        x2: the second batch (default: ``x1``).
        params: parameter names (as in ``named_parameters()``) or ``nn.Parameter`` objects;
            default: every parameter that requires grad (tied parameters once).
        batch_dim: the batch dimension of the inputs and of the output. Samples must be
            independent (``BatchCouplingError`` otherwise, e.g. BatchNorm in train mode).
        chunk_size: probes per vectorised pass (output elements in the backward passes, samples
            on the general path); ``1`` is a plain loop. Default: chosen from ``max_memory``.
        max_memory: bytes (int) or a string like ``"512MiB"``; default: a quarter of the free
            memory of the device.

    Example:
        >>> import torch, torchjac as tj
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> x = torch.randn(5, 3)
        >>> k = tj.ntk(model, x)
        >>> k.shape
        torch.Size([5, 2, 5, 2])
        >>> bool(torch.allclose(k, k.permute(2, 3, 0, 1)))
        True
        >>> tj.ntk(model, x, torch.randn(4, 3)).shape
        torch.Size([5, 2, 4, 2])
    """
    fn = "ntk"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: `model` must be a torch.nn.Module, got {describe(model)}.")
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise TypeError(f"{fn}: `batch_dim` must be an int, got {describe(batch_dim)}.")
    _check_x(fn, "x1", x1, batch_dim)
    if x2 is not None:
        _check_x(fn, "x2", x2, batch_dim)
        if x2.device != x1.device:
            raise ValueError(f"{fn}: x1 is on {x1.device} but x2 is on {x2.device}.")
    chunk_size = check_chunk_size(fn, chunk_size)
    names = _resolve_params(fn, model, params)
    budget = memory_budget(fn, max_memory, x1.device)
    state = model_state(model, names)
    with no_side_effects(x1.device), one_fallback_warning(fn):
        side1 = _side(fn, "x1", model, state, x1, batch_dim, chunk_size, budget)
        side2 = (
            side1
            if x2 is None
            else _side(fn, "x2", model, state, x2, batch_dim, chunk_size, budget)
        )
        if side2.out_rest != side1.out_rest:
            raise ValueError(
                f"{fn}: the model maps x1 to per-sample outputs of shape {list(side1.out_rest)} "
                f"but x2 to {list(side2.out_rest)}; the kernel needs one output shape."
            )
        kernel = _kernel(fn, model, state, side1, side2, x1, x2, batch_dim, chunk_size, budget)
    if x2 is None:
        kernel = (kernel + kernel.T) / 2  # exactly symmetric
    o = tuple(side1.out_rest)
    return kernel.reshape((side1.n, *o, side2.n, *o))


@dataclass(frozen=True)
class _Side:
    """One batch through the model: its capture, the ``D`` of every use for all output elements."""

    cap: Capture
    uses: list[UseD]
    n: int
    out_rest: torch.Size

    @property
    def k(self) -> int:
        return self.out_rest.numel()


def _side(
    fn: str,
    arg: str,
    model: nn.Module,
    state: ModelState,
    x: Tensor,
    batch_dim: int,
    chunk_size: int | None,
    budget: int,
) -> _Side:
    leaf = x.detach().requires_grad_(True) if x.is_floating_point() else x
    cap = capture(model, state, (leaf,), {}, batch_dim, fn_name=fn)
    out = cap.output
    if not out.is_floating_point() or out.dim() == 0 or not -out.dim() <= batch_dim < out.dim():
        raise ValueError(
            f"{fn}: the model must return a floating Tensor with the batch at dim {batch_dim}; "
            f"for {arg} it returned {describe(out)}."
        )
    group = Group.of([out], batch_dim)
    if group.batch_size != x.shape[batch_dim]:
        raise ValueError(
            f"{fn}: the model's output has {group.batch_size} samples at dim {batch_dim} but "
            f"{arg} has {x.shape[batch_dim]}; the batch must be kept at `batch_dim`."
        )
    names = {m: n for n, m in model.named_modules()}
    inputs = [(arg, leaf)] if leaf.requires_grad else []
    check_coupling(fn, cap, batch_dim, inputs, lambda u: f"the layer {names.get(u.module, '?')!r}")
    k = group.numel
    ds: list[list[Tensor]] = [[] for _ in cap.uses]
    per_probe = 2 * sum(u.e.numel() for u in cap.uses) * out.element_size()
    chunk = choose_chunk_size(k, max(per_probe, 1), budget, chunk_size)

    def probe(start: int, stop: int, batched: bool) -> list[Tensor | None]:
        basis = group.one_hot(start, stop, out.dtype, out.device)[0]
        assert basis is not None
        return deltas(cap, basis, batched)

    def write(start: int, stop: int, got: list[Tensor | None]) -> None:
        for store, d in zip(ds, got):
            if d is not None:
                store.append(d)

    run_chunks(fn, k, chunk, probe, write)
    uses = [(u, torch.cat(d, dim=1)) for u, d in zip(cap.uses, ds) if len(d) > 0]
    uses = [(u, d) for u, d in uses if d.shape[1] == k]
    return _Side(cap, uses, group.batch_size, group.rest_shape(0))


def _kernel(
    fn: str,
    model: nn.Module,
    state: ModelState,
    side1: _Side,
    side2: _Side,
    x1: Tensor,
    x2: Tensor | None,
    batch_dim: int,
    chunk_size: int | None,
    budget: int,
) -> Tensor:
    """``[N1·k, N2·k]``: closed forms per parameter, the general path for the rest."""
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
        make1 = _general(fn, model, state, general, x1, side1, batch_dim, chunk_size, budget)
        make2 = None
        if x2 is not None:
            make2 = _general(fn, model, state, general, x2, side2, batch_dim, chunk_size, budget)
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
    x: Tensor,
    side: _Side,
    batch_dim: int,
    chunk_size: int | None,
    budget: int,
) -> Make:
    """Per-sample Jacobians ``[N, c, P]`` of ``names`` (concatenated) for a chunk of probes, on
    the general path (NOTE [general per-sample path])."""
    problem = SampleProblem(model, state, names, (x,), {}, batch_dim, side.cap.output)
    out = side.cap.output
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


def _uses_of(side: _Side, name: str) -> list[UseD]:
    return [(u, d) for u, d in side.uses if name in (u.weight, u.bias)]


def _check_x(fn: str, arg: str, x: object, batch_dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: `{arg}` must be a torch.Tensor, got {describe(x)}.")
    if not -x.dim() <= batch_dim < x.dim():
        raise ValueError(
            f"{fn}: `batch_dim={batch_dim}` is out of range for {arg} with shape {list(x.shape)}."
        )


def _resolve_params(
    fn: str, model: nn.Module, params: Iterable[str | nn.Parameter] | None
) -> list[str]:
    """Canonical names (``named_parameters()`` order, tied once) of the parameters asked for."""
    named = list(model.named_parameters())
    if params is None:
        names = [n for n, p in named if p.requires_grad]
    else:
        if isinstance(params, (str, nn.Parameter)):
            params = [params]
        by_id = {id(p): n for n, p in named}
        all_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        canonical = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            canonical[n] = by_id[id(p)]
        wanted = set()
        for item in params:
            if isinstance(item, str):
                if item not in all_names:
                    raise ValueError(
                        f"{fn}: `params` names {item!r}, which is not a parameter of the model "
                        f"(see model.named_parameters())."
                    )
                wanted.add(canonical[item])
            elif isinstance(item, Tensor) and id(item) in by_id:
                wanted.add(by_id[id(item)])
            else:
                raise ValueError(
                    f"{fn}: `params` must hold parameter names or the model's own nn.Parameter "
                    f"objects, got {describe(item)}."
                )
        names = [n for n, _ in named if n in wanted]
    if not names:
        raise ValueError(
            f"{fn}: no parameter to differentiate: the model has none that requires grad. Name "
            "frozen ones in `params`."
        )
    bad = [n for n in names if not dict(named)[n].is_floating_point()]
    if bad:
        raise TypeError(f"{fn}: parameter {bad[0]!r} must have a floating dtype.")
    return names
