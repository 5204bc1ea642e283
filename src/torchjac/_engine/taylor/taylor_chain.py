"""Jacobians, Hessians, their diagonals and Laplacians of a chain of affine maps and
activations.

NOTE [taylor chain]: for a chain ``x -> A_1 -> φ_1 -> ... -> A_L`` and a selection of its output
(NOTE [chain from operations]: an ``nn.Sequential`` of Linear layers and listed activations, or
any function the recording proves to be one), the Taylor mode needs no Jets. With
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

It applies only where it is exactly the Taylor mode's arithmetic: a chain of NOTE [chain from
operations] (an ``nn.Sequential`` as NOTE [sequential proof] accepts it, or a recorded one whose
value equals the recorded output), activations whose rule covers their arguments, one
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

from torchjac._engine.core import fast
from torchjac._engine.core.basis import Group
from torchjac._engine.core.func_call import FuncProblem
from torchjac._engine.core.module_proof import plain_float
from torchjac._engine.kernel import kernels
from torchjac._engine.taylor.chain_steps import (
    Act,
    Chain,
    Linear,
    Scale,
    Shift,
    Step,
    Values,
    recorded_chain,
    sequential_chain,
)
from torchjac._engine.taylor.taylor_activations import ACTIVATIONS, tanh_parts

__all__ = ["chain_of", "chain_rows", "chain_taylor"]

_MAX_TRACE_ROWS = 2
# Directions up to which a full Hessian's pairs are formed at once ([R, D, D, B, n]; measured:
# at D = 2 under half the time of one batched product per direction; its memory grows as D²).
_PAIRS_MAX_D = 4
# R·D² from which the pairs are per-sample products rather than one broadcast sum (one thread:
# 199 against 390 µs at R=3, D=2, B=1024, n=64 (W2); 138 against 162 at R=1, D=3; but 164
# against 88 at R=1, D=2, and 527 against 406 at R=2, D=2, B=4096, n=32).
_PAIRS_BMM = 9


def chain_taylor(p: FuncProblem, kind: str) -> tuple[Tensor, Tensor, Group, Group] | None:
    """``(result, output value, out group, in group)`` by NOTE [taylor chain], or ``None`` where
    it does not apply. ``kind``: ``"first"`` (``[B, R, D]`` Jacobians), ``"trace"`` (``[B, R]``),
    ``"diag"`` (``[B, R, D]``) or ``"full"`` (``[B, R, D, D]`` Hessians)."""
    chain = chain_of(p)
    if chain is None or (kind == "trace" and chain.n_rows > _MAX_TRACE_ROWS):
        return None
    steps = chain.steps
    x = p.inputs[0]
    batched = p.batch_dim is not None
    found = None if chain.values is None else _recorded(steps, chain.values, batched)
    recorded = found is not None
    if found is None:
        found = _forward(steps, x if batched else x.unsqueeze(0))
    if found is None:
        return None
    h, slopes = found
    d = x.shape[-1]
    rows = chain.rows
    if kind == "first":
        res = _first_order(steps, slopes, d, h)
        res = res if rows is None else res[:, rows]
    else:
        curv = _curvatures(steps, slopes, _row_basis(chain, h), h)
        res = _contract(steps, slopes, curv, kind, d, h, chain.n_rows)
        # the Taylor tape keeps g·φ'' from overflowing; one non-finite element makes the sum so
        # (a sum that overflows sends finite results there too: slower, as exact)
        if not bool(torch.isfinite(res.sum())):
            return None
    out = h if rows is None else h[:, rows]
    value = (out if p.batch_dim is not None else out[0]).reshape(chain.out_shape)
    if not recorded and not chain.agrees(value):
        return None
    g_in, g_out = Group.of(p.inputs, p.batch_dim), Group.of((value,), p.batch_dim)
    return res.to(p.dtype), value, g_out, g_in


Slopes = list[tuple[Tensor, Tensor | None]]


def _forward(steps: tuple[Step, ...], h: Tensor) -> tuple[Tensor, Slopes] | None:
    """The values, and each activation's ``φ'`` and ``φ''``; ``None`` where a rule does not
    cover an activation's arguments."""
    slopes: Slopes = []
    fused = False
    for i, step in enumerate(steps):
        if isinstance(step, Linear):  # a tanh after it in the product (NOTE [fused tanh])
            nxt = steps[i + 1] if i + 1 < len(steps) else None
            fused = isinstance(nxt, Act) and nxt.name == "tanh"
            h = kernels.linear(h, step.w, step.b, "tanh" if fused else "none")
            continue
        if isinstance(step, Scale):
            h = h * step.s
            continue
        if isinstance(step, Shift):
            h = h + step.c
            continue
        parts = tanh_parts(h) if fused else ACTIVATIONS[step.name](h, **dict(step.kwargs))
        fused = False
        if parts is None:  # arguments the rule does not cover
            return None
        h, dy, ddy = parts
        slopes.append((dy, ddy))
    return h, slopes


def _recorded(
    steps: tuple[Step, ...], values: Values, batched: bool
) -> tuple[Tensor, Slopes] | None:
    """``_forward``'s result from the values the recording kept (NOTE [recorded values])."""
    acts = [s for s in steps if isinstance(s, Act)]
    slopes: Slopes = []
    for step, (pre, post) in zip(acts, values.acts, strict=True):
        if not batched:
            pre, post = pre.unsqueeze(0), post.unsqueeze(0)
        if step.name == "tanh":
            parts: tuple[Tensor, Tensor, Tensor | None] | None = tanh_parts(post)
        else:
            parts = ACTIVATIONS[step.name](pre, **dict(step.kwargs))
        if parts is None:
            return None
        slopes.append((parts[1], parts[2]))
    return (values.last if batched else values.last.unsqueeze(0)), slopes


def chain_rows(p: FuncProblem) -> int | None:
    """Output elements per sample of a problem NOTE [taylor chain] takes, read from its steps
    (the recording of NOTE [chain from operations] replaces a counting pass), or ``None``."""
    chain = chain_of(p)
    return None if chain is None else chain.n_rows


def chain_of(p: FuncProblem) -> Chain | None:
    """The problem's chain (NOTE [chain from operations]), found once per call."""
    if p.chain is None:
        p.chain = _find_chain(p) or False
    return p.chain or None


def _find_chain(p: FuncProblem) -> Chain | None:
    if not fast.enabled() or p.create_graph or p.has_aux:
        return None
    if p.container[0] != "tensor" or len(p.inputs) != 1:
        return None
    x = p.inputs[0]
    batched = p.batch_dim is not None
    if x.dim() != (2 if batched else 1) or not plain_float(x):
        return None
    if p.batch_dim is not None and p.batch_dim % 2 != 0:
        return None
    chain = sequential_chain(p.func, x, batched)
    modelled = p.state is not None and p.state.runs_a_model
    if chain is None and modelled and not isinstance(p.func, nn.Sequential):
        chain = recorded_chain(p.call_raw, x, batched)
        if chain is not None:
            p.single = True
    return chain


def _row_basis(chain: Chain, out: Tensor) -> Tensor:
    """``[R, 1, n]``: one-hot rows of the last map's output, the selected ones."""
    eye = torch.eye(chain.width, dtype=out.dtype, device=out.device)
    return (eye if chain.rows is None else eye[chain.rows]).unsqueeze(1)


def _first_order(
    steps: tuple[Step, ...], slopes: list[tuple[Tensor, Tensor | None]], d: int, out: Tensor
) -> Tensor:
    """``[B, n, D]``: the first order carried through every step."""
    t = _tangents(steps, slopes, d, out)
    if t.shape[1] == 1:  # no activation: the same Jacobian for every sample, written out
        return t.expand(d, *out.shape).permute(1, 2, 0).contiguous()
    return t.permute(1, 2, 0)


def _tangents(
    steps: tuple[Step, ...],
    slopes: list[tuple[Tensor, Tensor | None]],
    d: int,
    out: Tensor,
    upto: int | None = None,
    visit: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """The first order along the one-hot input directions, ``[D, B, n]`` (``[D, 1, n]`` while it
    is the same for every sample), carried through the steps; ``visit(l, t)`` sees it at the
    input of each activation ``l``, and the pass ends there at ``l = upto``."""
    t: Tensor | None = None  # the identity [D, 1, D], until something acts on it
    act = 0
    for step in steps:
        if isinstance(step, Linear):  # of the identity: the weight's columns, no product
            if t is None:  # a copy: t is written in place below (a transpose of a weight with
                # a dimension of 1 is already contiguous, so .contiguous() would be the weight)
                w = step.w.detach()
                t = w.t().clone(memory_format=torch.contiguous_format).unsqueeze(1)
            else:
                t = kernels.linear(t, step.w)
            continue
        if isinstance(step, Shift):
            continue
        if t is None:
            t = torch.eye(d, dtype=out.dtype, device=out.device).unsqueeze(1)
        if isinstance(step, Scale):
            t = t * step.s
            continue
        if visit is not None:
            visit(act, t)
        if act == upto:
            break
        dy = slopes[act][0]
        t = t.mul_(dy) if t.shape[1] == dy.shape[0] else t * dy  # in place: t is our own
        act += 1
    return torch.eye(d, dtype=out.dtype, device=out.device).unsqueeze(1) if t is None else t


def _curvatures(
    steps: tuple[Step, ...],
    slopes: list[tuple[Tensor, Tensor | None]],
    rows: Tensor,
    out: Tensor,
) -> list[Tensor | None]:
    """``g_l φ_l''`` per activation (``None`` where ``φ'' = 0``), from one backward pass of the
    ``R`` output rows (``rows [R, 1, n]``), down to the first activation with a curvature."""
    curv: list[Tensor | None] = [None] * len(slopes)
    first = min((i for i, (_, ddy) in enumerate(slopes) if ddy is not None), default=None)
    if first is None:
        return curv
    g = rows
    act = len(slopes)
    for step in reversed(steps):
        if isinstance(step, Linear):
            g = g @ step.w  # [R, 1 or B, n_in]
            continue
        if isinstance(step, Scale):
            g = g * step.s
            continue
        if isinstance(step, Shift):
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
    steps: tuple[Step, ...],
    slopes: list[tuple[Tensor, Tensor | None]],
    curv: list[Tensor | None],
    kind: str,
    d: int,
    out: Tensor,
    n_rows: int,
) -> Tensor:
    """``Σ_l <g_l φ_l'', T_l T_l>`` per sample and row: the diagonal (``"diag"``), its sum (a
    trace) or every pair of directions (``"full"``)."""
    bsz = out.shape[0]
    shape = {"trace": (bsz, n_rows), "diag": (bsz, n_rows, d), "full": (bsz, n_rows, d, d)}[kind]
    res = torch.zeros(shape, dtype=out.dtype, device=out.device)
    last = max((i for i, c in enumerate(curv) if c is not None), default=None)
    if last is None:
        return res

    def visit(act: int, t: Tensor) -> None:
        c = curv[act]
        if c is not None:
            _accumulate(res, t, c)

    _tangents(steps, slopes, d, out, last, visit)
    if kind == "full":  # (c·t_a)·t_e and (c·t_e)·t_a differ in rounding: one of them, mirrored
        i, j = torch.triu_indices(d, d, 1, device=out.device).unbind()
        res[..., j, i] = res[..., i, j]
    return res


def _accumulate(res: Tensor, t: Tensor, c: Tensor) -> None:
    """``res[b, r, a] += Σ_k c[r, b, k] t[a, b, k]²`` (a diagonal), its sum over ``a`` (a trace,
    ``res [B, R]``) or ``res[b, r, a, e] += Σ_k c[r, b, k] t[a, b, k] t[e, b, k]`` (``"full"``);
    ``t [D, B or 1, n]``, ``c [R, B, n]``."""
    d = t.shape[0]
    r, b, n = c.shape
    if res.dim() == 4 and d <= _PAIRS_MAX_D:
        # c·t_a first, as below: t_a·t_e alone may underflow where the result does not
        ct = c.unsqueeze(1) * t  # [R, D, B, n]
        if r * d * d >= _PAIRS_BMM:  # per sample, [R·D, n] @ [n, D]
            ct = ct.permute(2, 0, 1, 3).reshape(b, r * d, n)
            res += torch.matmul(ct, t.permute(1, 2, 0)).view(b, r, d, d)
        else:  # every pair at once: [R, D, D, B, n]
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
