"""Parameter Jacobians of a module: the full path on the graph, and the per-sample fast path.

NOTE [per-sample parameter Jacobian]: with a batch dimension and independent samples, row
``(n, c)`` of ``d out / d p`` only involves sample ``n``, so a one-hot probe ``c`` broadcast over
the batch gives every sample's row at once (``out`` probes, not ``N * out``). For a parameter of
a supported layer the row is a closed form of the layer input and the backpropagated ``δ`` (NOTE
[layer capture]); one vectorised backward pass per chunk of probes gives every layer's ``δ``, and
the products are written straight into the preallocated result. The remaining parameters take
the general path (NOTE [general per-sample path]); both are mixed in one call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchjac._engine.core.basis import Group
from torchjac._engine.core.module_proof import proven_per_sample
from torchjac._engine.core.plan import choose_chunk_size
from torchjac._engine.core.run import run_chunks
from torchjac._engine.core.structure import reachable
from torchjac._engine.graph.graph_probes import GraphProblem, solve
from torchjac._engine.modules.closed_forms import Use, write_use
from torchjac._engine.modules.layer_deltas import CouplingCheck, deltas, retry_declining
from torchjac._engine.modules.layers import Capture, ModelState, call, capture
from torchjac._engine.modules.param_chain import Chain, param_chain
from torchjac._engine.modules.sample_vmap import SampleProblem
from torchjac._errors import coupling_fix

__all__ = ["full_jacobian", "per_sample_jacobian"]


def full_jacobian(
    fn_name: str,
    model: nn.Module,
    state: ModelState,
    args: tuple,
    kwargs: dict,
    chunk_size: int | None,
    budget: int,
) -> dict[str, Tensor]:
    """Every output element against every parameter: ``out.shape + p.shape`` (jac on the graph)."""
    out = _checked_output(fn_name, call(model, state.with_leaves(state.leaves), args, kwargs))
    leaves = tuple(state.leaves[n] for n in state.names)
    dtypes = {n: torch.promote_types(out.dtype, t.dtype) for n, t in state.leaves.items()}
    if not out.requires_grad:
        return {
            n: out.new_zeros(out.shape + t.shape, dtype=dtypes[n])
            for n, t in zip(state.names, leaves)
        }
    problem = GraphProblem(
        fn_name=fn_name,
        outputs=(out,),
        inputs=leaves,
        input_names=tuple(f"parameter {n!r}" for n in state.names),
        used=tuple(reachable([out], leaves)),
        jac_outputs=None,
        out_group=Group.of([out], None),
        in_group=Group.of(leaves, None),
        batch_dim=None,
        create_graph=False,
        retain_graph=True,  # our own graph: it goes with `out` (no release pass)
    )
    flat = solve(problem, "auto", chunk_size, budget)
    return {
        n: r.reshape(out.shape + t.shape).to(dtypes[n])
        for n, t, r in zip(state.names, leaves, flat)
    }


def per_sample_jacobian(
    fn_name: str,
    model: nn.Module,
    state: ModelState,
    args: tuple,
    kwargs: dict,
    batch_dim: int,
    chunk_size: int | None,
    budget: int,
) -> dict[str, Tensor]:
    """Per-sample rows via closed forms plus the general path; ``out.shape + p.shape``."""
    proven = proven_per_sample(model, args, kwargs, batch_dim)  # before any hook of ours
    # NOTE [parameter chain]: a proven Sequential's modules, else the layers read from its ops
    chain = param_chain(model, state, args, kwargs, batch_dim, not proven)
    proven = proven or chain is not None  # a chain keeps samples apart

    def attempt(declined: frozenset, caps: list[Capture]) -> dict[str, Tensor]:
        return _per_sample(
            fn_name, model, state, args, kwargs, batch_dim, chunk_size, budget, proven, chain,
            declined, caps,
        )  # fmt: skip

    return retry_declining(attempt)


def _per_sample(
    fn_name: str,
    model: nn.Module,
    state: ModelState,
    args: tuple,
    kwargs: dict,
    batch_dim: int,
    chunk_size: int | None,
    budget: int,
    proven: bool,
    chain: Chain | None,
    declined: frozenset,
    caps: list[Capture],
) -> dict[str, Tensor]:
    """``per_sample_jacobian`` with the layers ``declined`` on the general path."""
    checked: list[tuple[str, Tensor]] = []
    traced = False
    if chain is not None:  # NOTE [parameter chain]
        cap = Capture(output=chain.output, state=state, uses=chain.uses)
    else:
        traced = not proven
        cap = capture(
            model, state, args, kwargs, batch_dim, fn_name=fn_name, prove=traced, decline=declined
        )
        proven = proven or cap.proven  # NOTE [op batch proof]
    if cap.general:  # the general path needs independent inputs too: capture with input leaves
        leaf_args, leaf_kwargs, checked = _input_leaves(args, kwargs)
        # traced again, as the first: a layer whose input has the batch elsewhere stays on the
        # general path (NOTE [layer batch axis])
        cap = capture(
            model, state, leaf_args, leaf_kwargs, batch_dim, fn_name=fn_name, prove=traced,
            decline=declined,
        )  # fmt: skip
    caps.append(cap)
    out = _checked_output(fn_name, cap.output)
    if out.dim() == 0:
        raise ValueError(
            f"{fn_name}: `batch_dim={batch_dim}` needs an output with a batch dimension, got a "
            "0-d output."
        )
    bd = batch_dim % out.dim()
    n = out.shape[bd]
    _check_batch_size(fn_name, n, batch_dim, args, kwargs)
    n_out = out.numel() // n if n else 0
    rest = out.shape[:bd] + out.shape[bd + 1 :]
    targets = {
        name: torch.empty(
            n, n_out, *t.shape, dtype=torch.promote_types(out.dtype, t.dtype), device=out.device
        )
        for name, t in state.leaves.items()
    }
    if (out.requires_grad or chain is not None) and n_out and n:
        check = CouplingCheck(fn_name, cap, batch_dim, checked, _describe, proven)
        _fill(model, state, cap, args, kwargs, batch_dim, targets, chunk_size, budget, check, chain)
    else:
        for t in targets.values():
            t.zero_()
    return {
        name: r.reshape(n, *rest, *state.leaves[name].shape).movedim(0, bd)
        for name, r in targets.items()
    }


def _fill(
    model: nn.Module,
    state: ModelState,
    cap: Capture,
    args: tuple,
    kwargs: dict,
    batch_dim: int,
    targets: dict[str, Tensor],
    chunk_size: int | None,
    budget: int,
    check: CouplingCheck,
    chain: Chain | None,
) -> None:
    out = cap.output
    general = [name for name in state.names if name in cap.general]
    closed = [name for name in state.names if name not in cap.general]
    uses = [u for u in cap.uses if (u.weight in closed) or (u.bias in closed)]
    live = {id(u) for u in uses}
    sample = (
        SampleProblem(model, state, general, args, kwargs, batch_dim, out, check.fn_name)
        if general
        else None
    )
    group = Group.of([out], batch_dim)
    n, n_out = targets[state.names[0]].shape[:2]
    item = out.dtype.itemsize
    if chain is not None:
        per_probe = item * chain.work
    else:
        per_probe = 2 * item * sum(u.e.numel() for u in uses)
    per_probe += 3 * item * n * sum(state.leaves[g].numel() for g in general)
    per_probe += item * n * max((state.leaves[c].numel() for c in closed), default=0)
    size = choose_chunk_size(n_out, per_probe, budget, chunk_size)
    closed_targets = {c: targets[c] for c in closed}

    def probe(start: int, stop: int, vectorised: bool) -> tuple[list, dict[str, Tensor]]:
        ds: list = []
        if chain is not None:
            ds = chain.deltas(start, stop)
        elif uses:
            cot = group.one_hot(start, stop, out.dtype, out.device)[0]
            assert cot is not None
            ds = deltas(cap, cot, vectorised, check)
        rows = sample.rows(start, stop, vectorised) if sample is not None else {}
        return ds, rows

    def write(start: int, stop: int, result: tuple[list, dict[str, Tensor]]) -> None:
        ds, rows = result
        views = {c: t[:, start:stop] for c, t in closed_targets.items()}
        written: set[str] = set()
        for use, d in zip(cap.uses, ds):
            if d is not None and id(use) in live:
                write_use(use, d, views, written)
        for c, v in views.items():
            if c not in written:
                v.zero_()
        for g, r in rows.items():
            targets[g][:, start:stop] = r

    if not uses:  # nothing to carry the check's probes: it runs alone, first
        check.run()
    run_chunks(check.fn_name, n_out, size, probe, write)
    if sample is not None and not check.proven:
        # couplings the check's probes may not reach (after theirs)
        sample.check_alone(out, check.fn_name, batch_dim)


def _describe(use: Use) -> str:
    return f"a {type(use.module).__name__} layer"


def _check_batch_size(fn_name: str, n: int, batch_dim: int, args: tuple, kwargs: dict) -> None:
    """An output whose batch size no input has (a sum or a pairing over the batch) cannot give
    one row block per sample: ``ValueError``, as the other functions raise."""
    sizes = {
        t.shape[batch_dim % t.dim()]
        for t in tree_flatten((args, kwargs))[0]
        if isinstance(t, Tensor) and t.dim() > 0
    }
    if sizes and n not in sizes:
        raise ValueError(
            f"{fn_name}: mismatched batch sizes at `batch_dim={batch_dim}`: the model's output "
            f"has {n} but its inputs have {', '.join(map(str, sorted(sizes)))}. Each output "
            f"sample must come from its own input sample (a sum or mean over the batch mixes "
            f"them). {coupling_fix(fn_name)}"
        )


def _input_leaves(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[tuple[str, Tensor]]]:
    """Floating tensors of the arguments as fresh leaves requiring grad (for the coupling check).

    The model sees a clone, so an in-place operation on its input stays legal and local.
    """
    flat, spec = tree_flatten((args, kwargs))
    leaves: list[tuple[str, Tensor]] = []
    new = []
    for i, t in enumerate(flat):
        if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0:
            leaf = t.detach().requires_grad_(True)
            leaves.append((f"input {i}", leaf))
            t = leaf.clone()
        new.append(t)
    new_args, new_kwargs = tree_unflatten(new, spec)
    return tuple(new_args), dict(new_kwargs), leaves


def _checked_output(fn_name: str, out: object) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"{fn_name}: the model must return a Tensor, got {type(out).__name__}. Wrap it to "
            "return the Tensor to differentiate."
        )
    if not out.is_floating_point():
        raise TypeError(
            f"{fn_name}: the model's output must be a real floating Tensor, got dtype {out.dtype}."
        )
    return out
