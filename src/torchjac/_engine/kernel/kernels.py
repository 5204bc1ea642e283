"""Dense kernels: the fastest exact float32 CPU product the installed torch offers.

NOTE [dense kernels]: on an x86 CPU, torch's float32 ``F.linear`` calls MKL's GEMM. On AMD
processors MKL runs a slower code path: on this project's benchmark machine (AMD EPYC, AVX-512)
it reaches about 80 GFLOP/s per core, while oneDNN, which ships inside the same torch wheel, runs
AVX-512 at 200-230 GFLOP/s: 2-2.7x on the Taylor-mode stacks of ``jacobian``, ``hessian`` and
``laplacian`` (``[K, B, n] @ W.T``), which are most of their time. The engine's own products go
through ``linear`` below; the model's autograd graph is never touched.

Backward passes of the engine's own probes (``jac`` rows and columns on a graph) meet the same
GEMM inside autograd: ``backward_products`` returns a dispatch mode that sends their big ``mm``
and ``addmm`` through the same op. A Python mode costs ~8 µs per operator, so it is installed only
when the graph's products are big enough to pay that many times over (``_MACS_PER_NODE``, counted
from the sizes the graph's ``mm`` nodes saved), and never over a mode of the user's (a flop
counter, fake tensors) or a graph that is being recorded through a subclass. Measured on the
benchmark workloads with the mode forced off and on, interleaved (one thread): it is taken on
W5's ``jac`` only (64 rows per pass, N=256, 128→512→512), where it saved 4-9% (on/off 0.91,
0.93, 0.96 in three processes; 0.87 on two threads); W4, W5b, W5c and W5d never take it (their
on/off ratios 0.97-1.06 are noise), so it costs them nothing.

The oneDNN op (``torch.ops.mkldnn._linear_pointwise``, the one ``torch.compile`` emits for CPU
linears) is private, so it is used only when all of these hold, else ``F.linear`` runs:
- no autograd graph is being recorded through the product, no functorch transform or forward-AD
  level is active,
  and every tensor is a plain strided float32 CPU tensor;
- oneDNN is built in and enabled (``torch.backends.mkldnn``) and float32 matmuls are asked for
  in full precision (``torch.backends.mkldnn.matmul.fp32_precision``, or the legacy
  ``torch.get_float32_matmul_precision()`` on older torch): a user who allowed bf16 or tf32
  products gets torch's own choice, never a lower precision than ``F.linear``;
- the bias, if any, is a contiguous ``[out]`` (oneDNN misreads strided and expanded ones);
- the product is big enough to pay oneDNN's ~10 µs per call (``_MIN_MACS``, ``MIN_SIDE``);
- the op exists and agreed with ``F.linear`` on a small problem the first time it was needed;
  a failure then or later turns it off for the rest of the process.

NOTE [fused tanh]: torch's own float32 ``tanh`` took 2.5 ns an element on the Zen 4 VM (83 µs for
``[256, 128]``), oneDNN's, fused into the product as a post-op, a fraction of that: a ``[256,
128] @ [128, 128]`` product and its ``tanh`` took 110 against 178 µs, ``[1024, 2] @ [2, 64]`` 52
against 177 µs. Below about 8k outputs oneDNN's call overhead (18 µs against 7 for ``[16, 16] @
[16, 64]``) wins, and each new shape costs about 0.7 ms once (oneDNN builds a primitive for it),
so ``linear(..., activation="tanh")`` fuses from ``_MIN_FUSED_OUTPUTS`` outputs (16k: 44 against
68 µs at ``[256, 64] @ [64, 64]``), whatever the product's own size, under the other conditions,
and where the fused op agreed with ``tanh(F.linear)`` (to 1e-6) in the same first check; a
failure of the fused op turns off only the fusion. oneDNN's ``tanh`` may differ from torch's in
the last bit. A fused sigmoid measured slower than torch's (150 against 134 µs): not offered.
Never inside a forward-AD level (for every product): the op has no forward derivative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from torchjac._engine.core import fast
from torchjac._engine.core.dispatch import EagerDispatchMode
from torchjac._engine.core.lean_vmap import remember_graph, vmap_cannot_run

__all__ = ["MAX_WALK", "MIN_SIDE", "GraphProducts", "backward_products", "graph_products", "linear"]

_MIN_MACS = 2**21  # multiply-adds below which MKL's lower call overhead wins (measured)
MIN_SIDE = 16  # a narrow weight (e.g. a scalar output layer): oneDNN is no faster there
_MIN_FUSED_OUTPUTS = 2**14  # NOTE [fused tanh]

# Forward-pass multiply-adds of the graph's big products per graph node, above which the mode's
# per-operator cost is repaid about four times (saving ~15 ps per MAC, twice per backward).
_MACS_PER_NODE = 2**22
# Probes times the elements they read and write, below which the products cannot be big enough
# to pay for walking the graph (W4, 64 columns of 21k gradients: 1.4M, a 0.1 ms walk skipped).
_MIN_PROBE_WORK = 2**22
MAX_WALK = 4096  # graph nodes looked at when counting
# NOTE [products per pass]: a vectorised pass of c rows multiplies products c times bigger than
# the forward's, while the mode's cost is per operator, once per pass. So the mode is also taken
# when one pass's big products (``per_pass`` multiply-adds) save, at the measured difference of
# the two GEMMs (78-80 against 100-108 GFLOP/s at [2048-4096, 128-256] x [128-256, 256] on one
# thread of the benchmark CPU: ~3 ps a multiply-add), ``_PASS_MARGIN`` times what the mode costs
# (~3 operators a node at ~8 µs): 64 rows of W5's trunk 64→256→256 (N=128), but not 16.
_SAVED_S_PER_MAC = 3e-12
_MODE_S_PER_NODE = 24e-6
_PASS_MARGIN = 3.0
_PLAIN = (Tensor, torch.nn.Parameter)  # a subclass may override what the product means
_CUSTOM = torch.autograd.function.BackwardCFunction  # a custom Function's node
_op: Callable[..., Tensor] | None = None
_state = {"checked": False, "usable": True, "tanh": True}


def linear(x: Tensor, w: Tensor, b: Tensor | None = None, activation: str = "none") -> Tensor:
    """``F.linear(x, w, b)``, through oneDNN where NOTE [dense kernels] allows it; with
    ``activation="tanh"``, its ``tanh``, fused into the product there (NOTE [fused tanh])."""
    if activation not in ("none", "tanh"):
        raise ValueError(f"linear: activation must be 'none' or 'tanh', got {activation!r}")
    fused = activation == "tanh"
    if _state["usable"] and fast.enabled() and _eligible(x, w, b, fused):
        op = _onednn()
        if op is not None and (_state["tanh"] or not fused):
            try:
                return op(x, w, b, activation, [], "")
            except RuntimeError:
                _state["tanh" if fused else "usable"] = False
    y = F.linear(x, w, b)
    return torch.tanh(y) if fused else y


def _plain(t: Any) -> bool:
    """A plain (or Parameter) strided float32 CPU tensor: what the op is known to read right."""
    return (
        type(t) in _PLAIN
        and t.dtype is torch.float32
        and t.device.type == "cpu"
        and t.layout is torch.strided
    )


def _eligible(x: Tensor, w: Tensor, b: Tensor | None, fused: bool = False) -> bool:
    if not (_plain(x) and _plain(w)) or w.dim() != 2 or x.dim() < 1:
        return False
    if not _fits_bias(b, w.shape[0]):
        return False
    tensors = (x, w) if b is None else (x, w, b)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    out_features, in_features = w.shape
    if x.shape[-1] != in_features or x.numel() == 0 or w.numel() == 0:
        return False  # oneDNN has no empty product (it raised, and turned itself off)
    outputs = x.numel() // in_features * out_features
    if fused and outputs < _MIN_FUSED_OUTPUTS:
        return False
    if not fused and (
        min(out_features, in_features) < MIN_SIDE or x.numel() * out_features < _MIN_MACS
    ):
        return False
    return (
        not _dual()
        and _full_precision()
        and not _transformed()
        and _no_dispatch_modes()  # a user's mode (a flop counter) sees torch's own ops
    )


def _dual() -> bool:
    """Whether a forward-AD level is open: the op has no forward derivative (a dual tensor's
    tangent would be dropped)."""
    return getattr(forward_ad, "_current_level", -1) >= 0


def _fits_bias(b: Any, n: int) -> bool:
    """``None``, or a contiguous float32 ``[n]``: oneDNN misreads strided and expanded biases."""
    return b is None or (_plain(b) and b.dim() == 1 and b.shape[0] == n and b.is_contiguous())


def _full_precision() -> bool:
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    # torch >= 2.9 resolves the per-backend setting (and its parents) here; the legacy getter
    # raises once a per-backend setting differs from it
    precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    if precision is not None:
        return precision in ("none", "ieee")
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:
        return False


def _transformed() -> bool:
    """Whether a functorch transform (vmap, grad, jvp) is active: the op has no rules for them."""
    functorch: Any = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    return peek is None or peek() is not None


def _lookup() -> Callable[..., Tensor] | None:
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _onednn() -> Callable[..., Tensor] | None:
    """The oneDNN op, checked once against ``F.linear``; ``None`` when absent or disagreeing."""
    global _op
    if _state["checked"]:
        return _op
    _state["checked"] = True
    op = _lookup()
    if op is None:
        return None
    kw: dict[str, Any] = {"dtype": torch.float32, "device": "cpu"}  # whatever the defaults
    x = torch.linspace(-1.0, 1.0, 3 * 2 * 24, **kw).reshape(3, 2, 24)
    w = torch.linspace(-0.5, 0.7, 20 * 24, **kw).reshape(20, 24)
    b = torch.linspace(0.1, 0.3, 20, **kw)
    try:
        agree = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
    except (RuntimeError, TypeError):
        agree = False
    try:
        fused = op(x, w, b, "tanh", [], "")
        _state["tanh"] = torch.allclose(fused, torch.tanh(F.linear(x, w, b)), atol=1e-6)
    except (RuntimeError, TypeError):
        _state["tanh"] = False
    _op = op if agree else None
    return _op


class GraphProducts(NamedTuple):
    """What one walk of a graph counts: its nodes, its ``mm``/``addmm`` nodes and their
    multiply-adds (forward), and those of the products big enough for oneDNN; and what it saw on
    the way, for the callers that ride it (``_graph_args``): the nodes' class names, the ids of
    the leaves it reached and every edge ``(node, output_nr)`` it crossed."""

    nodes: int
    products: int
    macs: int
    big_macs: int
    builtin: bool  # every node is torch's own (no custom Function), vmap runs its backward,
    # and the walk saw them all
    names: AbstractSet[str] = frozenset()
    leaves: AbstractSet[int] = frozenset()
    edges: AbstractSet[tuple[Any, int]] = frozenset()


# a product node's saved operand sizes, ``[rows, inner]`` and ``[inner, cols]``
_MM = {
    "AddmmBackward0": ("_saved_mat1_sym_sizes", "_saved_mat2_sym_sizes"),
    "MmBackward0": ("_saved_self_sym_sizes", "_saved_mat2_sym_sizes"),
}


def graph_products(
    roots: Sequence[Tensor], visit: Callable[[Any], None] | None = None
) -> GraphProducts:
    """Count the graph behind ``roots`` (at most ``MAX_WALK`` nodes); ``visit(node)`` is called
    on each node, once, so that a caller's own walk can ride this one. A walk that saw the whole
    graph gives its node names to NOTE [wrong batching rules] (``remember_graph``)."""
    edges: set[tuple[Any, int]] = set()
    for t in roots:  # each ``grad_fn`` read once: torch makes a Python object at each read
        node = t.grad_fn
        if node is not None:
            edges.add((node, t.output_nr))
    stack: list[Any] = [node for node, _ in edges]
    firsts = list(stack)  # the output nodes, for NOTE [wrong batching rules]
    seen: set[Any] = set()  # the nodes themselves: NOTE [node identity] in structure.py
    names: set[str] = set()
    leaves: set[int] = set()
    products = macs = big = 0
    builtin = True
    while stack:  # one tight loop: it runs on every ``jac`` and ``gramian`` (~0.7 µs a node)
        if len(seen) >= MAX_WALK:
            builtin = False
            break
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if visit is not None:
            visit(node)
        name = type(node).__name__
        names.add(name)
        for edge in node.next_functions:
            if edge[0] is not None:
                edges.add(edge)
                stack.append(edge[0])
        if name == "AccumulateGrad":
            leaves.add(id(node.variable))
        elif name in _MM:
            sizes = _mm_sizes(node, *_MM[name])
            if sizes is not None:
                products += 1
                macs += sizes[0] * sizes[1] * sizes[2]
                if min(sizes) >= MIN_SIDE:
                    big += sizes[0] * sizes[1] * sizes[2]
        elif isinstance(node, _CUSTOM) or vmap_cannot_run(node):
            builtin = False
    else:  # the whole graph was seen
        remember_graph(firsts, names)
    return GraphProducts(len(seen), products, macs, big, builtin, names, leaves, edges)


def backward_products(
    roots: Sequence[Tensor],
    dtype: torch.dtype,
    device: torch.device,
    work: int,
    counted: GraphProducts | None = None,
    per_pass: int = 0,
) -> EagerDispatchMode | None:
    """The oneDNN mode of NOTE [dense kernels] for backward passes over ``roots``' graph, when
    it pays; else ``None``. ``work``: probes times the elements of outputs and inputs, below
    ``_MIN_PROBE_WORK`` the graph is not even walked; ``counted``: a walk already made;
    ``per_pass``: the big products' multiply-adds in one vectorised pass (NOTE [products per
    pass])."""
    if not (
        (work >= _MIN_PROBE_WORK or per_pass > 0)
        and device.type == "cpu"
        and dtype is torch.float32
        and _state["usable"]
    ):
        return None
    c = graph_products(roots) if counted is None else counted
    pays = c.big_macs >= _MACS_PER_NODE * max(c.nodes, 1)
    pays = pays or per_pass * _SAVED_S_PER_MAC >= _PASS_MARGIN * _MODE_S_PER_NODE * c.nodes
    usable = pays and fast.enabled() and _full_precision() and _no_dispatch_modes()
    return _OneDnnProducts() if usable and _onednn() is not None else None


def _no_dispatch_modes() -> bool:
    length = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return length is not None and length() == 0


def _mm_sizes(node: Any, left_name: str, right_name: str) -> tuple[int, int, int] | None:
    left, right = getattr(node, left_name), getattr(node, right_name)
    try:
        return int(left[0]), int(left[1]), int(right[1])
    except (TypeError, ValueError, IndexError):  # symbolic sizes
        return None


def _big_product(a: Any, b: Any) -> bool:
    return (
        _plain(a)
        and _plain(b)
        and a.dim() == 2
        and b.dim() == 2
        and min(a.shape[0], a.shape[1], b.shape[1]) >= MIN_SIDE
        and a.shape[0] * a.shape[1] * b.shape[1] >= _MIN_MACS
    )


class _OneDnnProducts(EagerDispatchMode):
    """``mm(a, b)`` and ``addmm(c, a, b)`` (default scales, 1-d ``c``) as oneDNN linears."""

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if not kwargs and _state["usable"] and _op is not None:
            bias = None
            if func is torch.ops.aten.mm.default:
                a, b = args
            elif func is torch.ops.aten.addmm.default and len(args) == 3:
                bias, a, b = args
            else:
                return func(*args, **(kwargs or {}))
            if _big_product(a, b) and _fits_bias(bias, b.shape[1]):
                try:
                    return _op(a, b.t(), bias, "none", [], "")
                except RuntimeError:
                    _state["usable"] = False
        return func(*args, **(kwargs or {}))
