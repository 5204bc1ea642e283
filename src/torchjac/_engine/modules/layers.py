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
``layer_deltas.deltas(cap, cotangents, batched)`` gives one canonical ``D`` per use for a batch
of output cotangents ``[k, *out.shape]``. Per use, with ``N`` samples, ``k`` probes and ``T``
positions (all non-batch, non-feature dims flattened; batch first in every factor):

    kind "outer" (Linear, Conv):  A [N, T, G, i]   D [N, k, T, G, o]   (G groups; Linear G = 1)
        J_weight[n, k] = Σ_t D[n, k, t] ⊗ A[n, t]   viewed as weight [G*o, i]
        J_bias[n, k]   = Σ_t D[n, k, t]            viewed as bias [G*o]
        (a per-sample convolution with few input columns forms J_weight as one grouped
        convolution's weight gradient and never unfolds A: NOTE [per-sample convolutions])
    kind "index" (Embedding):     A [N, T] (long)  D [N, k, T, d]
        J_weight[n, k] = Σ_t onehot(A[n, t]) ⊗ D[n, k, t]     (rows at padding_idx are zero)
    kind "scale" (LayerNorm, RMSNorm affine):  A [N, T, d] (normalised input)  D [N, k, T, d]
        J_weight[n, k] = Σ_t D[n, k, t] * A[n, t]   J_bias[n, k] = Σ_t D[n, k, t]

Without ``batch_dim`` the whole batch is one sample (N = 1). ``Use.weight`` / ``Use.bias`` are
parameter names in ``state.names`` (``None`` when that parameter is not asked for, e.g. frozen).
``capture`` never checks batch independence; ``layer_deltas.CouplingCheck`` does (its probes
are carried by the first ``deltas`` pass).

NOTE [layer batch axis]: a closed form takes the batch of a layer's input at ``batch_dim`` when
the size there is the model's batch size; a sequence-first layer (``[T, B, E]``, torch's default
for attention) with ``T == B`` passed that test with the batch at dim 1, and a model the trace
proved (no coupling check) got rows mixing the samples (``param_jacobian`` off by 1.0 on a
Linear bias, ``ntk`` by 7.7). Where the forward is traced (NOTE [op batch proof]) and the trace
still follows the batch, a layer input whose batch is elsewhere is left to the general path;
the capture that gives the general path its input leaves is traced too. An input the trace found
without the batch but with its size at ``batch_dim`` (a buffer of one row per sample, or a table
whose rows a later op sums) keeps its closed form, but the model is then not proven: the
coupling check sees whether each sample's rows stay at their own row (a sum over the rows made
``param_jacobian`` off by 0.70 and ``ntk`` by 2.7 in a proven model). Where
the trace has ended (an op it does not follow) and the input has the batch's size at another
dim too, the closed form is kept but the layer is ``ambiguous``: when the coupling check blames
it, the call is redone with that layer on the general path (``layer_deltas.retry_declining``),
whose own checks still raise for a real coupling; before, such a model was refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from torchjac._engine.core.structure import reachable
from torchjac._engine.modules.batch_trace import BatchTrace
from torchjac._engine.modules.closed_forms import KINDS, Use, build_use

__all__ = [
    "Capture",
    "ModelState",
    "Use",
    "call",
    "capture",
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
    """Leaves for ``names`` (canonical names of ``named_parameters()``), the rest fixed.

    NOTE [inference tensors]: tensors made under ``torch.inference_mode()`` (the user's inputs,
    or a model built there) can never join an autograd graph; callers run with inference mode
    off, and such parameters are cloned here into ordinary tensors (buffers always are). Nothing
    of the user's is modified.
    """
    wanted = set(names)
    # an embedding with max_norm renormalises its weight in place when called: a copy takes it
    renormed = {
        f"{prefix}.weight" if prefix else "weight"
        for prefix, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    }
    leaves: dict[str, Tensor] = {}
    fixed: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        own = p.clone() if p.is_inference() or name in renormed else p
        if name in wanted:
            leaves[name] = own.detach().requires_grad_(True)
        else:
            fixed[name] = own.detach()
    for name, buf in model.named_buffers():
        fixed[name] = buf.detach().clone()
    return ModelState(tuple(names), {n: leaves[n] for n in names}, fixed)


@contextlib.contextmanager
def no_side_effects(device: torch.device) -> Iterator[Callable[[], None]]:
    """Grad mode on, the global RNG state restored afterwards (dropout in train mode draws).

    Yields ``reset``, which puts the RNG state back to the one found: each evaluation of the model
    that must see the call's draw (``ntk``'s second batch) starts there (NOTE [one draw per
    call])."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        cpu = torch.get_rng_state()
        cuda = [torch.cuda.get_rng_state(d) for d in devices]

        def reset() -> None:
            torch.set_rng_state(cpu)
            for d, st in zip(devices, cuda):
                torch.cuda.set_rng_state(st, d)

        yield reset


def call(model: nn.Module, tensors: dict[str, Tensor], args: tuple, kwargs: dict) -> Any:
    """``model(*args, **kwargs)`` with its parameters and buffers replaced by ``tensors``.

    ``tensors`` is keyed by canonical names (``named_parameters()``, ``named_buffers()``). Each
    slot (a module and an attribute) is replaced once, under every name a tied tensor has, and a
    module reached by two paths only under its first: ``functional_call(tie_weights=True)``
    swaps a shared module's slot twice and leaves plain tensors in the user's model after.
    """
    slots = _slots(model, tensors)
    # a copy of every tensor argument: the model may write into its input (an in-place first
    # layer), and it is run more than once here; the user's tensors are never written
    copies: dict[int, Tensor] = {}  # one copy per tensor: model(x, x) keeps its two x's one

    def copy(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if id(t) not in copies:
            copies[id(t)] = t.clone()
        return copies[id(t)]

    args, kwargs = tree_map(copy, (args, kwargs))
    handles = [
        m.register_forward_pre_hook(_group_norm_layout)
        for m in model.modules()
        if isinstance(m, nn.GroupNorm) and m.affine
    ]
    try:
        return functional_call(model, slots, args, kwargs, tie_weights=False, strict=False)
    finally:
        for h in handles:
            h.remove()


def _group_norm_layout(module: nn.Module, args: tuple) -> tuple | None:
    """NOTE [group norm layout]: torch 2.13's CPU backward of ``group_norm`` on a channels-last
    input that does not require grad, asked for the weight's gradient, crashes the process
    (segmentation fault). The general path makes exactly that call (a ``GroupNorm`` after a
    convolution whose parameters a closed form covers, or a ``params`` subset), where the user's
    own backward, with every parameter requiring grad, does not: such an input is passed on
    contiguous (the same values). Its forward AD fails on such an input too: forward-mode
    products do the same (NOTE [embedding forward rules])."""
    x = args[0] if args else None
    if isinstance(x, Tensor) and not x.requires_grad and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def _slots(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    canonical: dict[int, str] = {}  # id of the model's tensor -> its first name
    seen: set[tuple[int, str]] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        members = [*module._parameters.items(), *module._buffers.items()]
        for attr, t in members:
            if t is None or (id(module), attr) in seen:
                continue
            seen.add((id(module), attr))
            name = f"{prefix}.{attr}" if prefix else attr
            first = canonical.setdefault(id(t), name)
            if first in tensors:
                out[name] = tensors[first]
    return out


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
    proven: bool = False  # per sample by its ops (NOTE [op batch proof]), when asked to prove
    # modules with a use whose input has the batch's size at another dim than ``batch_dim``
    # too, the trace not knowing which (NOTE [layer batch axis])
    ambiguous: frozenset[nn.Module] = frozenset()


def capture(
    model: nn.Module,
    state: ModelState,
    args: tuple,
    kwargs: dict,
    batch_dim: int | None,
    *,
    fn_name: str = "capture",
    prove: bool = False,
    decline: frozenset[nn.Module] = frozenset(),
) -> Capture:
    """Run ``model`` once with hooks on supported layers; see NOTE [layer capture].

    ``prove``: follow the batch through the forward's ops (NOTE [op batch proof]);
    ``Capture.proven`` then says whether the model keeps samples apart.

    Raises ``TypeError`` when the model does not return a Tensor. Hooks never outlive the call.
    """
    by_id = {id(t): n for n, t in state.leaves.items()}
    batch_size = _batch_size(args, kwargs, batch_dim)
    uses: list[Use] = []
    ambiguous: set[nn.Module] = set()
    unsure: list[nn.Module] = []  # closed forms on inputs the trace found without the batch
    covered: list[tuple[Any, set[int]]] = []  # (node, ids of the leaves it covers) per use

    trace: BatchTrace | None = None

    def hook(module: nn.Module, h_args: tuple, h_kwargs: dict, output: Any) -> Any:
        x = h_args[0] if h_args else h_kwargs.get("input")
        if module in decline:
            return None
        at = None
        if trace is not None and batch_dim is not None and isinstance(x, Tensor) and x.dim():
            # NOTE [layer batch axis]: the batch where the trace found it, not where sizes say
            at = trace.batch_at(x)
            if at is not None and at >= 0 and at != batch_dim % x.dim():
                return None
        with trace.paused() if trace is not None else contextlib.nullcontext():
            built = build_use(module, h_args, h_kwargs, output, by_id, batch_dim, batch_size)
        if built is None:
            return None
        use, new_output = built
        if trace is not None:
            trace.same_batch(output, new_output)
        uses.append(use)
        if at == -1:  # no batch, its size by chance (or aligned data): the check decides
            unsure.append(module)
            ambiguous.add(module)
        elif at is None and isinstance(x, Tensor) and batch_dim is not None:
            bd = batch_dim % x.dim()
            if any(size == batch_size for i, size in enumerate(x.shape) if i != bd):
                ambiguous.add(module)
        leaves = {id(state.leaves[n]) for n in (use.weight, use.bias) if n is not None}
        leaves.discard(id(x))  # a parameter fed in as the layer's input is not covered there
        covered.extend((node, leaves) for node in _layer_nodes(output, x))
        return new_output

    handles = []
    proven = False
    try:
        for module in _hookable(model):
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        tracing = BatchTrace.of(args, kwargs, batch_dim if prove else None)
        with tracing as trace:
            output = call(model, state.with_leaves(state.leaves), args, kwargs)
            proven = trace is not None and batch_dim is not None and trace.proves(output, batch_dim)
            proven = proven and not unsure
    finally:
        for h in handles:
            h.remove()
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{fn_name}: the model must return a Tensor, got {type(output).__name__}. Wrap it "
            "to return the Tensor to differentiate."
        )
    cap = Capture(output, state, uses, proven=proven, ambiguous=frozenset(ambiguous))
    blocked: dict[Any, set[int]] = {}
    for node, leaves in covered:
        blocked.setdefault(node, set()).update(leaves)
    hit = reachable([output], [state.leaves[n] for n in state.names], blocked)
    cap.general = tuple(n for n, h in zip(state.names, hit) if h)
    return cap


def _batch_size(args: tuple, kwargs: dict, batch_dim: int | None) -> int | None:
    """The batch size of the first tensor argument (the model's batch), if any."""
    if batch_dim is None:
        return None
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, Tensor) and t.dim() > 0:
            return int(t.shape[batch_dim % t.dim()])
    return None


def _layer_nodes(output: Tensor, x: Any) -> list[Any]:
    """The autograd nodes of one layer call: from its output down to (not into) its input."""
    stop = x.grad_fn if isinstance(x, Tensor) else None
    stack = [output.grad_fn] if output.grad_fn is not None else []
    found: dict[Any, None] = {}  # the nodes themselves, in order: NOTE [node identity]
    while stack:
        node = stack.pop()
        if node is stop or node in found or hasattr(node, "variable"):
            continue
        found[node] = None
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return list(found)


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
