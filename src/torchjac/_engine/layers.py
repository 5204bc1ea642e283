"""Per-layer capture: one forward of a model, layer inputs ``a`` and output sensitivities ``δ``.

NOTE [layer capture]: the per-sample Jacobian of a Linear weight is ``δ ⊗ a`` (the output
sensitivity of the layer times its input), and the same holds, up to a reshaping, for
convolutions (unfolded input), embeddings (one-hot input) and the affine part of LayerNorm
(normalised input, elementwise). ``capture`` runs the model once through
``torch.func.functional_call`` on detached aliases of its parameters (the user's module,
parameters, ``.grad`` and buffers are never touched; buffers are cloned so BatchNorm statistics
stay bitwise equal) with temporary forward hooks on every supported layer (exact types, see
``closed_forms.KINDS``), removed in a ``finally``. Each hooked call gets a zero leaf ``e`` added
to its output:

    z = layer(x; W, b) + e          grad of the output w.r.t. e = δ

and the graph walk that finds the parameters no hook covered (a bare ``nn.Parameter`` used in a
custom ``forward``, ``h @ emb.weight.T``, an unsupported layer) does not follow the edges from a
hooked call's own nodes to its parameters (the layer is not computed twice). A parameter still
reachable from the output goes to the general path (``general``); the others are covered
exactly by the closed forms of their uses (a module called twice, or tied weights, give several
uses of one name: their contributions add up). Only ``δ`` is ever asked of this graph.

Reuse (issue 5, Gramians): ``cap = capture(model, state, args, kwargs, batch_dim)``, then
``deltas(cap, cotangents, batched)`` gives one canonical ``D`` per use for a batch of output
cotangents ``[k, *out.shape]``. Per use, with ``N`` samples, ``k`` probes and ``T`` positions
(all non-batch, non-feature dims flattened; batch first in every factor):

    kind "outer" (Linear, Conv):  A [N, T, G, i]   D [N, k, T, G, o]   (G groups; Linear G = 1)
        J_weight[n, k] = Σ_t D[n, k, t] ⊗ A[n, t]   viewed as weight [G*o, i]
        J_bias[n, k]   = Σ_t D[n, k, t]            viewed as bias [G*o]
    kind "index" (Embedding):     A [N, T] (long)  D [N, k, T, d]
        J_weight[n, k] = Σ_t onehot(A[n, t]) ⊗ D[n, k, t]     (rows at padding_idx are zero)
    kind "scale" (LayerNorm, RMSNorm affine):  A [N, T, d] (normalised input)  D [N, k, T, d]
        J_weight[n, k] = Σ_t D[n, k, t] * A[n, t]   J_bias[n, k] = Σ_t D[n, k, t]

Without ``batch_dim`` the whole batch is one sample (N = 1). ``Use.weight`` / ``Use.bias`` are
parameter names in ``state.names`` (``None`` when that parameter is not asked for, e.g. frozen).
``capture`` never checks batch independence; ``CouplingCheck`` does (two probes, carried by
the first ``deltas`` pass).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from torchjac._engine.closed_forms import KINDS, Use, build_use
from torchjac._engine.structure import reachable, sample_mask
from torchjac._errors import BatchCouplingError

__all__ = [
    "Capture",
    "CouplingCheck",
    "ModelState",
    "Use",
    "call",
    "capture",
    "deltas",
    "model_state",
    "no_side_effects",
]


@dataclass(frozen=True)
class ModelState:
    """Detached aliases of a model's tensors for ``functional_call``.

    ``leaves``: name -> leaf requiring grad (same storage as the parameter, no copy), for the
    requested parameters in ``named_parameters()`` order. ``fixed``: every other parameter
    detached, and a clone of every buffer (so running statistics are never updated in place).
    """

    names: tuple[str, ...]
    leaves: dict[str, Tensor]
    fixed: dict[str, Tensor]

    def with_leaves(self, leaves: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**self.fixed, **leaves}


def model_state(model: nn.Module, names: Sequence[str]) -> ModelState:
    """Leaves for ``names`` (canonical names of ``named_parameters()``), the rest fixed."""
    wanted = set(names)
    leaves: dict[str, Tensor] = {}
    fixed: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if name in wanted:
            leaves[name] = (p.clone() if p.is_inference() else p).detach().requires_grad_(True)
        else:
            fixed[name] = p.detach()
    for name, buf in model.named_buffers():
        fixed[name] = buf.detach().clone()
    return ModelState(tuple(names), {n: leaves[n] for n in names}, fixed)


@contextlib.contextmanager
def no_side_effects(device: torch.device) -> Iterator[None]:
    """Grad mode on, the global RNG state restored afterwards (dropout in train mode draws)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        yield


def call(model: nn.Module, tensors: dict[str, Tensor], args: tuple, kwargs: dict) -> Any:
    """``model(*args, **kwargs)`` with its parameters and buffers replaced by ``tensors``."""
    return functional_call(model, tensors, args, kwargs, tie_weights=True, strict=False)


@dataclass
class Capture:
    """The result of ``capture``: the output on the graph and one ``Use`` per hooked call.

    ``general``: requested parameter names with a use no closed form covers (see NOTE
    [layer capture]); ``uses``: the covered uses, in call order.
    """

    output: Tensor
    state: ModelState
    uses: list[Use] = field(default_factory=list)
    general: tuple[str, ...] = ()


def capture(
    model: nn.Module,
    state: ModelState,
    args: tuple,
    kwargs: dict,
    batch_dim: int | None,
    *,
    fn_name: str = "capture",
) -> Capture:
    """Run ``model`` once with hooks on supported layers; see NOTE [layer capture].

    Raises ``TypeError`` when the model does not return a Tensor. Hooks never outlive the call.
    """
    by_id = {id(t): n for n, t in state.leaves.items()}
    uses: list[Use] = []
    covered: list[tuple[Any, set[int]]] = []  # (node, ids of the leaves it covers) per use

    def hook(module: nn.Module, h_args: tuple, h_kwargs: dict, output: Any) -> Any:
        built = build_use(module, h_args, h_kwargs, output, by_id, batch_dim)
        if built is None:
            return None
        use, new_output = built
        uses.append(use)
        x = h_args[0] if h_args else h_kwargs.get("input")
        leaves = {id(state.leaves[n]) for n in (use.weight, use.bias) if n is not None}
        covered.extend((node, leaves) for node in _layer_nodes(output, x))
        return new_output

    handles = []
    try:
        for module in _hookable(model):
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        output = call(model, state.with_leaves(state.leaves), args, kwargs)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{fn_name}: the model must return a Tensor, got {type(output).__name__}. Wrap it "
            "to return the Tensor to differentiate."
        )
    cap = Capture(output=output, state=state, uses=uses)
    blocked: dict[int, set[int]] = {}
    for node, leaves in covered:
        blocked.setdefault(id(node), set()).update(leaves)
    hit = reachable([output], [state.leaves[n] for n in state.names], blocked)
    cap.general = tuple(n for n, h in zip(state.names, hit) if h)
    return cap


def _layer_nodes(output: Tensor, x: Any) -> list[Any]:
    """The autograd nodes of one layer call: from its output down to (not into) its input."""
    stop = x.grad_fn if isinstance(x, Tensor) else None
    stack = [output.grad_fn] if output.grad_fn is not None else []
    found: dict[int, Any] = {}
    while stack:
        node = stack.pop()
        if node is stop or id(node) in found or hasattr(node, "variable"):
            continue
        found[id(node)] = node
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return list(found.values())


def _hookable(model: nn.Module) -> list[nn.Module]:
    """Modules of an exactly supported type without user hooks (which could change them)."""
    out = []
    for module in model.modules():
        if type(module) not in KINDS:
            continue
        if module._forward_hooks or module._forward_pre_hooks:
            continue
        out.append(module)
    return out


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
    (4.3 against 5.0 ms for ten probes through a small CNN).
    """
    es = [u.e for u in cap.uses]
    targets = es + list(extra)
    if not targets:
        return [], []
    cot = cotangents.to(cap.output.dtype)
    if batched:
        grads: Sequence[Tensor | None] = torch.autograd.grad(
            [cap.output],
            targets,
            [cot],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
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

    Two probes: a random cotangent on a random half of the samples, and one on the other half
    (NOTE [coupling check] in ``structure``); the ``δ`` of every use, and the gradient of every
    given batched input (leaves requiring grad), must vanish outside the half. The probes ride
    along with the first ``deltas`` pass (``pending`` until then), or run alone (``run``).
    """

    def __init__(
        self,
        fn_name: str,
        cap: Capture,
        batch_dim: int,
        inputs: Sequence[tuple[str, Tensor]],
        describe_use: Callable[[Use], str],
    ) -> None:
        out = cap.output
        self.fn_name, self.cap, self.batch_dim = fn_name, cap, batch_dim
        self.inputs, self.describe_use = list(inputs), describe_use
        self.extra = [t for _, t in inputs]
        bd = batch_dim % out.dim()
        self.pending = out.shape[bd] > 1
        halves = [
            _check_cotangent(tuple(out.shape), bd, out.dtype, out.device, other)
            for other in ((False, True) if self.pending else ())
        ]
        self.outside = [o for _, o in halves]
        self.cotangents = torch.cat([c for c, _ in halves]) if halves else out.new_empty(0)

    def run(self) -> None:
        """The check on its own (one backward pass per half), unless already done."""
        if self.pending:
            ds, gs = _backward(self.cap, self.cotangents, self.extra, batched=False)
            self.verify(ds, gs, 0)

    def verify(self, ds: list[Tensor | None], gs: list[Tensor | None], first: int) -> None:
        """Check a pass whose probes ``first`` and ``first + 1`` were this check's."""
        for h, outside in enumerate(self.outside):
            for use, d in zip(self.cap.uses, ds):
                if d is not None and bool((d[:, first + h][outside].nan_to_num(0.0) != 0).any()):
                    _raise_coupled(self.fn_name, self.batch_dim, self.describe_use(use))
            for (name, x), g in zip(self.inputs, gs):
                if g is None:
                    continue
                per_sample = g[first + h].movedim(self.batch_dim % x.dim(), 0)[outside]
                if bool((per_sample.nan_to_num(0.0) != 0).any()):
                    _raise_coupled(self.fn_name, self.batch_dim, name)
        self.pending = False


@functools.lru_cache(maxsize=16)
def _check_cotangent(
    shape: tuple[int, ...], bd: int, dtype: torch.dtype, device: torch.device, other_half: bool
) -> tuple[Tensor, Tensor]:
    """The check's cotangent ``[1, *shape]`` and the samples outside its half (never mutated)."""
    mask = sample_mask(shape[bd], device)
    mask = ~mask if other_half else mask
    gen = torch.Generator().manual_seed(7)
    cot = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    view = [1] * len(shape)
    view[bd] = shape[bd]
    return (cot * mask.reshape(view).to(dtype)).unsqueeze(0), ~mask


def _raise_coupled(fn_name: str, batch_dim: int, where: str) -> None:
    raise BatchCouplingError(
        f"{fn_name}: `batch_dim={batch_dim}` declares that output sample i depends only on "
        f"sample i, but the outputs depend on other samples through {where}. Samples are "
        "coupled, e.g. by BatchNorm in train mode (call model.eval()), batch statistics such as "
        "`x - x.mean(0)`, or attention across the batch. Drop `batch_dim` to get the full "
        "Jacobian instead."
    )
