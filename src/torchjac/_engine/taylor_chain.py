"""Jacobians, Hessians, their diagonals and Laplacians of a plain chain of Linear layers and
activations.

NOTE [taylor chain]: for ``nn.Sequential(Linear, φ, Linear, φ, ..., Linear)`` (nested ones included,
``Identity`` skipped, ``φ`` in ``taylor_activations.MODULES``), the Taylor mode needs no Jets. With
``T_l [D, B, n_l]`` the first derivatives of the input of activation ``l`` along the ``D`` input
directions and ``g_l [R, B, n_l]`` the gradient of output row ``r`` at its output (NOTE [taylor
tape]), the Hessian of a sample is ``Σ_l T_lᵀ diag(g_l φ_l'') T_l``: its diagonal ``Σ_l Σ_k g_l
φ_l'' T_l²``, summed over the directions for the trace. One forward pass of the values, one backward
pass of the ``R`` rows, one forward pass of the first order (stopped at the last activation with a
curvature; carried to the outputs for a Jacobian, which needs no backward pass), each on plain
tensors: the matrix products are those of the Taylor tape, without its per-op bookkeeping (a few
hundred Python calls and their cold caches, about a fifth of its time on a 128-wide MLP). The first
layer's first order is its weight's columns, the same for every sample: ``[D, 1, n]``, never
expanded over the batch. A full Hessian costs ``1 + R + D`` passes here, not the ``1 + D +
D(D+1)/2`` of full second-order jets (NOTE [second-order plan] tries the chain first and plans as
before when it declines).

It applies only where it is exactly the Taylor mode's arithmetic: the model is a chain that
NOTE [sequential proof] accepts (no hooks, no patched ``forward``, no modes), every module is a
``Linear`` or an activation listed in ``MODULES`` whose rule covers its arguments, one
batched ``[B, D]`` input (or an unbatched ``[D]``), no ``create_graph``, plain float32 or
float64 tensors of one dtype, and at most ``_MAX_TRACE_ROWS`` output rows for a trace (the
forward Laplacian carries one row for all outputs; this backward pass one per output).
Anything else — or a second-order result that is not finite, where ``g·φ''`` may have
overflowed (the Taylor tape orders its products to avoid that) — returns ``None`` and takes the
Taylor mode.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from torchjac._engine import fast, kernels
from torchjac._engine.basis import Group
from torchjac._engine.func_call import FuncProblem
from torchjac._engine.module_proof import layer_params_like, plain_chain, plain_float
from torchjac._engine.taylor_activations import MODULES, module_parts, tanh_parts

__all__ = ["chain_rows", "chain_taylor"]

_MAX_TRACE_ROWS = 2
# Directions up to which a full Hessian's pairs are formed at once ([R, D, D, B, n]; measured:
# at D = 2 under half the time of one batched product per direction; its memory grows as D²).
_PAIRS_MAX_D = 4


def chain_taylor(p: FuncProblem, kind: str) -> tuple[Tensor, Tensor, Group, Group] | None:
    """``(result, output value, out group, in group)`` by NOTE [taylor chain], or ``None`` where
    it does not apply. ``kind``: ``"first"`` (``[B, R, D]`` Jacobians), ``"trace"`` (``[B, R]``),
    ``"diag"`` (``[B, R, D]``) or ``"full"`` (``[B, R, D, D]`` Hessians)."""
    chain = _layers(p)
    if chain is None or (kind == "trace" and chain[1] > _MAX_TRACE_ROWS):
        return None
    layers = chain[0]
    x = p.inputs[0]
    h = x if p.batch_dim is not None else x.unsqueeze(0)
    # forward: values, and each activation's φ' and φ''
    slopes: list[tuple[Tensor, Tensor | None]] = []
    fused = False
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):  # a tanh after it in the product (NOTE [fused tanh])
            fused = i + 1 < len(layers) and type(layers[i + 1]) is nn.Tanh
            h = kernels.linear(h, layer.weight, layer.bias, "tanh" if fused else "none")
            continue
        parts = tanh_parts(h) if fused else module_parts(layer, h)
        fused = False
        if parts is None:  # arguments the rule does not cover
            return None
        h, dy, ddy = parts
        slopes.append((dy, ddy))
    n_rows = h.shape[1]
    d = x.shape[-1]
    if kind == "first":
        res = _first_order(layers, slopes, d, h)
    else:
        curv = _curvatures(layers, slopes, n_rows, h)
        res = _contract(layers, slopes, curv, kind, d, h)
        # the Taylor tape keeps g·φ'' from overflowing; one non-finite element makes the sum so
        # (a sum that overflows sends finite results there too: slower, as exact)
        if not bool(torch.isfinite(res.sum())):
            return None
    value = h if p.batch_dim is not None else h[0]
    g_in, g_out = Group.of(p.inputs, p.batch_dim), Group.of((value,), p.batch_dim)
    return res.to(p.dtype), value, g_out, g_in


def chain_rows(p: FuncProblem) -> int | None:
    """Output elements per sample of a problem NOTE [taylor chain] takes, read from its layers
    (no forward pass to count them), or ``None``."""
    chain = _layers(p)
    return None if chain is None else chain[1]


def _first_order(
    layers: list[nn.Module], slopes: list[tuple[Tensor, Tensor | None]], d: int, out: Tensor
) -> Tensor:
    """``[B, R, D]``: the first order carried through every layer."""
    t = _tangents(layers, slopes, d, out)
    if t.shape[1] == 1:  # no activation: the same Jacobian for every sample, written out
        return t.expand(d, *out.shape).permute(1, 2, 0).contiguous()
    return t.permute(1, 2, 0)


def _tangents(
    layers: list[nn.Module],
    slopes: list[tuple[Tensor, Tensor | None]],
    d: int,
    out: Tensor,
    upto: int | None = None,
    visit: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """The first order along the one-hot input directions, ``[D, B, n]`` (``[D, 1, n]`` while it
    is the same for every sample), carried through the layers; ``visit(l, t)`` sees it at the
    input of each activation ``l``, and the pass ends there at ``l = upto``."""
    t: Tensor | None = None  # the identity [D, 1, D], until something acts on it
    act = 0
    for layer in layers:
        if isinstance(layer, nn.Linear):  # of the identity: the weight's columns, no product
            w = layer.weight
            if t is None:  # a copy: t is written in place below (a transpose of a weight with
                # a dimension of 1 is already contiguous, so .contiguous() would be the weight)
                t = w.detach().t().clone(memory_format=torch.contiguous_format).unsqueeze(1)
            else:
                t = kernels.linear(t, w)
            continue
        if t is None:
            t = torch.eye(d, dtype=out.dtype, device=out.device).unsqueeze(1)
        if visit is not None:
            visit(act, t)
        if act == upto:
            break
        dy = slopes[act][0]
        t = t.mul_(dy) if t.shape[1] == dy.shape[0] else t * dy  # in place: t is our own
        act += 1
    return torch.eye(d, dtype=out.dtype, device=out.device).unsqueeze(1) if t is None else t


def _layers(p: FuncProblem) -> tuple[list[nn.Module], int] | None:
    """The chain's modules and its output elements per sample, if NOTE [taylor chain] applies
    to the problem."""
    model = p.func
    if not fast.enabled() or not isinstance(model, nn.Sequential) or p.create_graph or p.has_aux:
        return None
    if p.container[0] != "tensor" or len(p.inputs) != 1:
        return None
    x = p.inputs[0]
    if x.dim() != (1 if p.batch_dim is None else 2) or not plain_float(x):
        return None
    if p.batch_dim is not None and p.batch_dim % 2 != 0:
        return None
    layers = plain_chain(model)
    if layers is None:
        return None
    layers = [m for m in layers if type(m) is not nn.Identity]
    width = x.shape[-1]
    for layer in layers:
        if type(layer) is nn.Linear:
            w, b = layer.weight, layer.bias
            if not layer_params_like(x, w, b) or w.dim() != 2 or w.shape[1] != width:
                return None
            width = w.shape[0]
        elif type(layer) not in MODULES or getattr(layer, "approximate", "none") != "none":
            return None  # GELU's tanh approximation has no closed-form rule
    if not any(type(m) is nn.Linear for m in layers):
        return None
    return layers, width


def _curvatures(
    layers: list[nn.Module], slopes: list[tuple[Tensor, Tensor | None]], n_rows: int, out: Tensor
) -> list[Tensor | None]:
    """``g_l φ_l''`` per activation (``None`` where ``φ'' = 0``), from one backward pass of the
    ``R`` output rows, down to the first activation with a curvature."""
    curv: list[Tensor | None] = [None] * len(slopes)
    first = min((i for i, (_, ddy) in enumerate(slopes) if ddy is not None), default=None)
    if first is None:
        return curv
    g = torch.eye(n_rows, dtype=out.dtype, device=out.device).unsqueeze(1)  # [R, 1, R]
    act = len(slopes)
    for layer in reversed(layers):
        if isinstance(layer, nn.Linear):
            g = g @ layer.weight  # [R, 1 or B, n_in]
            continue
        act -= 1
        dy, ddy = slopes[act]
        if ddy is not None:
            curv[act] = g * ddy
        if act == first:
            break
        g = g * dy
    return curv


def _contract(
    layers: list[nn.Module],
    slopes: list[tuple[Tensor, Tensor | None]],
    curv: list[Tensor | None],
    kind: str,
    d: int,
    out: Tensor,
) -> Tensor:
    """``Σ_l <g_l φ_l'', T_l T_l>`` per sample and row: the diagonal (``"diag"``), its sum (a
    trace) or every pair of directions (``"full"``)."""
    bsz, n_rows = out.shape
    shape = {"trace": (bsz, n_rows), "diag": (bsz, n_rows, d), "full": (bsz, n_rows, d, d)}[kind]
    res = torch.zeros(shape, dtype=out.dtype, device=out.device)
    last = max((i for i, c in enumerate(curv) if c is not None), default=None)
    if last is None:
        return res

    def visit(act: int, t: Tensor) -> None:
        c = curv[act]
        if c is not None:
            _accumulate(res, t, c)

    _tangents(layers, slopes, d, out, last, visit)
    if kind == "full":  # (c·t_a)·t_e and (c·t_e)·t_a differ in rounding: one of them, mirrored
        i, j = torch.triu_indices(d, d, 1, device=out.device).unbind()
        res[..., j, i] = res[..., i, j]
    return res


def _accumulate(res: Tensor, t: Tensor, c: Tensor) -> None:
    """``res[b, r, a] += Σ_k c[r, b, k] t[a, b, k]²`` (a diagonal), its sum over ``a`` (a trace,
    ``res [B, R]``) or ``res[b, r, a, e] += Σ_k c[r, b, k] t[a, b, k] t[e, b, k]`` (``"full"``);
    ``t [D, B or 1, n]``, ``c [R, B, n]``."""
    d = t.shape[0]
    if res.dim() == 4 and d <= _PAIRS_MAX_D:  # every pair at once: [R, D, D, B, n]
        # c·t_a first, as below: t_a·t_e alone may underflow where the result does not
        ct = c.unsqueeze(1) * t  # [R, D, B, n]
        res += (ct.unsqueeze(2) * t.unsqueeze(0)).sum(-1).permute(3, 0, 1, 2)
        return
    if res.dim() == 4:  # one direction a at a time: [B, R, n] @ [B, n, D]
        right = t.expand(-1, c.shape[1], -1).permute(1, 2, 0)
        for a in range(d):
            res[:, :, a] += torch.bmm((c * t[a]).transpose(0, 1), right)
        return
    sq = t * t
    if res.dim() == 2:  # the trace: squares summed over the directions first
        res += (c * sq.sum(0)).sum(-1).T
    elif sq.shape[1] == 1:  # the same first order for every sample: one product
        res += torch.matmul(c, sq[:, 0].T).transpose(0, 1)
    elif c.shape[0] == 1:  # one row: a weighted sum over the units
        res[:, 0] += sq.mul_(c[0]).sum(-1).T
    else:
        res += torch.bmm(c.transpose(0, 1), sq.permute(1, 2, 0))
