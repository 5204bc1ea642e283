"""The general path: per-sample Jacobians of chosen parameters, by ``vmap(jacrev)`` over samples.

NOTE [general path]: a parameter whose uses no closed form covers (an unsupported layer, a bare
``nn.Parameter`` in a custom ``forward``; see NOTE [layer capture]) gets its per-sample Jacobian
from the model itself: ``θ -> model(x[i:i+1])`` differentiated by ``jacrev`` with respect to
those parameters only, vectorised over the samples of a chunk with ``vmap``. The model is called
on a batch of one, exactly as a user would, through ``functional_call`` on the detached aliases
of ``ModelState`` (cloned buffers: running statistics never change). A chunk ``vmap`` cannot
run (data-dependent control flow, ``.item()``, random ops) is redone sample by sample with
``jacrev(chunk_size=1)``, a plain loop, with one ``FallbackWarning`` (NOTE [fallback]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from torchjac._engine.layers import ModelState, call
from torchjac._engine.plan import choose_chunk_size
from torchjac._engine.run import run_chunks

__all__ = ["sample_jacobians"]


def sample_jacobians(
    fn_name: str,
    model: nn.Module,
    state: ModelState,
    names: Sequence[str],
    x: Tensor,
    batch_dim: int,
    n_out: int,
    chunk_size: int | None,
    budget: int,
) -> dict[str, Tensor]:
    """``{name: [N, n_out, P]}``: per-sample Jacobians of the flattened output per sample."""
    bd = batch_dim % x.dim()
    n = x.shape[bd]
    params = {name: state.leaves[name].detach() for name in names}
    others = {k: v.detach() for k, v in state.leaves.items() if k not in params}
    fixed = {**state.fixed, **others}
    dtype = next(iter(params.values())).dtype
    results = {
        k: torch.empty(n, n_out, v.numel(), dtype=dtype, device=v.device) for k, v in params.items()
    }

    def one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        out = call(model, {**fixed, **p}, (xi.unsqueeze(bd),), {})
        return out.reshape(-1)

    def probe(start: int, stop: int, batched: bool) -> dict[str, Tensor]:
        if batched:
            xs = x.narrow(bd, start, stop - start)
            return vmap(jacrev(one), in_dims=(None, bd))(params, xs)
        xi = x.select(bd, start)
        jac = jacrev(one, chunk_size=1)(params, xi)
        return {k: v.unsqueeze(0) for k, v in jac.items()}

    def write(start: int, stop: int, jac: dict[str, Tensor]) -> None:
        for k, v in jac.items():
            results[k][start:stop] = v.reshape(stop - start, n_out, -1)

    per_sample = 4 * n_out * sum(v.numel() for v in params.values()) * dtype.itemsize
    per_sample += 4 * (x.numel() // max(n, 1)) * x.element_size() * max(n_out, 1)
    chunk = choose_chunk_size(n, per_sample, budget, chunk_size)
    run_chunks(fn_name, n, chunk, probe, write)
    return results
