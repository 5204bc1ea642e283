"""Running the Taylor mode on a function: seeds, the checks it needs, reading results out.

NOTE [taylor check]: the Taylor mode follows the torch calls the function makes. It cannot see
inside a custom ``autograd.Function`` (it would differentiate the forward instead of using the
user's backward) nor honour a ``torch.no_grad()`` block; both run with gradients disabled, so the
pass runs with gradients enabled and any call on a Jet with gradients disabled stops it
(``TaylorFailed``): the call then takes nested AD, with one ``FallbackWarning``. Nor can it see the
torch calls inside TorchScript or under ``torch._C.DisableTorchFunction()``; one that writes into a
Jet in place changes its value and not its derivatives, so each Jet keeps its version after the last
call that saw it, and a call that finds it moved on stops the pass the same way. Any other failure
inside the propagation does the same. With ``batch_dim``, a function whose every op keeps the batch
provably apart (NOTE [batch proof]) needs no check. Otherwise one more first-order pass carries a
random tangent on each set S of ``sample_masks`` and on its complement: any response of an output
sample outside S means the samples are coupled (``BatchCouplingError``), as in NOTE [coupling check]
but in forward mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from torchjac._engine.core.basis import Group
from torchjac._engine.core.func_call import FuncProblem
from torchjac._engine.core.structure import masked_random, sample_masks
from torchjac._engine.taylor.taylor import Jet, JetSpec, TaylorFailed, constant
from torchjac._engine.taylor.taylor_chain import chain_taylor
from torchjac._engine.taylor.taylor_tape import NeedForward, Tape, contract
from torchjac._errors import BatchCouplingError

__all__ = ["NeedForward", "TaylorFailed", "TaylorResult", "chained_taylor", "taylor"]


@dataclass(frozen=True)
class TaylorResult:
    """``result``: ``[B, R, D]`` Jacobians (``"first"``), ``[B, R]`` traces (``"trace"``),
    ``[B, R, D]`` diagonals (``"diag"``) or ``[B, R, D, D]`` Hessians (``"full"``)."""

    result: Tensor
    outputs: tuple[Tensor, ...]
    aux: Any
    out_group: Group
    in_group: Group


def taylor(p: FuncProblem, kind: str, check_batch: Any) -> TaylorResult:
    """One Taylor-mode pass of the function (NOTE [taylor mode], NOTE [taylor check])."""
    if kind != "diag":  # NOTE [taylor chain]: a plain MLP needs no Jets
        chained = chained_taylor(p, "diag" if kind == "rdiag" else kind, check_batch)
        if chained is not None:
            return chained
    g_in = Group.of(p.inputs, p.batch_dim)
    d, bsz = g_in.numel, g_in.batch_size
    left = right = None
    if kind == "full":
        left, right = torch.triu_indices(d, d, device=p.device)
    tape = Tape() if kind == "rdiag" else None
    spec = JetSpec(d, "first" if tape else kind, left, right, p.create_graph, tape)
    seeds = g_in.one_hot(0, d, p.dtype, p.device)
    jets = []
    for x, seed in zip(p.inputs, seeds):
        if seed is None:  # an input without elements per sample: no direction of its own
            seed = torch.zeros((), dtype=x.dtype, device=x.device).expand(d, *x.shape)
        # the one-hot first order is written only if a rule reads it (NOTE [lazy first order])
        stack = x.new_empty(spec.k, *x.shape)
        stack[0] = x
        stack[1 + d :] = 0
        jets.append(Jet.lazy(stack, seed.to(x.dtype), spec, _bdim(p, x)))
    rank = p.inputs[0].dim()
    jets[0].seed = len(jets) == 1 and (
        rank == 1 if p.batch_dim is None else rank == 2 and p.batch_dim % 2 == 0
    )
    outs, aux = _call(p, jets)
    values = tuple(y._stack[0] if isinstance(y, Jet) else y for y in outs)
    check_batch(values)
    g_out = Group.of(values, p.batch_dim)
    if p.batch_dim is not None and bsz > 1 and not _proven(p, outs, values, bsz):
        _check_pass(p, g_in, g_out)
    aux = tree_map(lambda a: a._stack[0] if isinstance(a, Jet) else a, aux)
    if tape is not None:
        onehot = g_out.one_hot(0, g_out.numel, p.dtype, p.device)
        pairs = [(y, c) for y, c in zip(outs, onehot) if isinstance(y, Jet) and c is not None]
        jet_outs = [y for y, _ in pairs]
        cots = [c.to(y._stack.dtype) for y, c in pairs]
        with torch.set_grad_enabled(p.create_graph):
            shape = (bsz, g_out.numel, d)
            batched = p.batch_dim is not None
            result = contract(jet_outs, cots, tape, shape, batched, p.dtype, p.device)
        return TaylorResult(result, values, aux, g_out, g_in)
    rows = [_rows(y, kind, spec) for y in outs]
    return TaylorResult(_read(p, kind, rows, g_in, g_out, spec), values, aux, g_out, g_in)


def chained_taylor(p: FuncProblem, kind: str, check_batch: Any) -> TaylorResult | None:
    """The pass of NOTE [taylor chain], or ``None`` where it does not apply."""
    chained = chain_taylor(p, kind)
    if chained is None:
        return None
    result, value, g_out, g_in = chained
    check_batch((value,))
    return TaylorResult(result, (value,), None, g_out, g_in)


def _rows(y: Any, kind: str, spec: JetSpec) -> Tensor:
    """What ``_read`` reads of an output: its first order for ``"first"``, else its second order
    alone, leaving a first order nothing needs unwritten (NOTE [lazy first order])."""
    if not isinstance(y, Jet):
        s = constant(y, spec)
        return s[1 : 1 + spec.d] if kind == "first" else s[1 + spec.d :]
    return y.stack[1 : 1 + spec.d] if kind == "first" else y.second_rows()


def _bdim(p: FuncProblem, x: Tensor) -> int | None:
    return None if p.batch_dim is None else p.batch_dim % x.dim()


def _call(p: FuncProblem, jets: list[Jet]) -> tuple[tuple[Any, ...], Any]:
    with torch.enable_grad():  # see NOTE [taylor check]
        try:
            raw = p.call_raw(*jets)
        except (TaylorFailed, NeedForward):
            raise
        except Exception as err:  # the nested path calls func again and shows user errors
            raise TaylorFailed(f"{type(err).__name__}: {err}") from err
        outs, aux = p.split(raw)
    if not any(isinstance(y, Jet) for y in outs):
        # No output carries coefficients: func hid them (a torch.func transform inside it) or is
        # constant. Nested AD is exact in both cases, and which one it was cannot be told here.
        raise TaylorFailed("no output of func carries the Taylor coefficients", quiet=True)
    return outs, aux


def _proven(p: FuncProblem, outs: tuple[Any, ...], values: tuple[Tensor, ...], bsz: int) -> bool:
    """Every output provably per sample along ``batch_dim`` (NOTE [batch proof])."""
    assert p.batch_dim is not None
    for y, v in zip(outs, values):
        if isinstance(y, Jet):
            b = p.batch_dim % v.dim()
            if y.bdim != b or v.shape[b] != bsz:
                return False
    return True


def _check_pass(p: FuncProblem, g_in: Group, g_out: Group) -> None:
    """The coupling check of NOTE [taylor check]: one more pass, first order along one random
    tangent per set of samples and per complement."""
    bsz = g_in.batch_size
    masks = [m for s in sample_masks(bsz, p.device) for m in (s, ~s)]
    spec = JetSpec(len(masks), "first", None, None)
    gen = torch.Generator().manual_seed(7)
    jets = []
    for j, x in enumerate(p.inputs):
        parts = [x.unsqueeze(0)]
        parts += [masked_random(g_in, j, m, gen, x.dtype, x.device) for m in masks]
        jets.append(Jet.of(torch.cat(parts), spec, _bdim(p, x)))
    outs, _ = _call(p, jets)
    stacks = [y.stack for y in outs if isinstance(y, Jet)]
    index = [i for i, y in enumerate(outs) if isinstance(y, Jet)]
    for k, mask in enumerate(masks):
        _coupling(p, g_out, index, [s[1 + k] for s in stacks], mask)


def _read(
    p: FuncProblem, kind: str, rows: list[Tensor], g_in: Group, g_out: Group, spec: JetSpec
) -> Tensor:
    """``rows``: per output, its first or its second order (``_rows``)."""
    d = spec.d
    if kind == "first":
        flat = [g_out.flatten(i, r) for i, r in enumerate(rows)]  # [B, D, m_i]
        return torch.cat(flat, dim=2).transpose(1, 2).to(p.dtype)
    parts = [g_out.flatten(i, r) for i, r in enumerate(rows)]
    second = torch.cat(parts, dim=2).to(p.dtype)  # [B, S, R]
    if kind == "trace":
        return second[:, 0]
    if kind == "diag":
        return second.transpose(1, 2)
    assert spec.left is not None and spec.right is not None
    res = second.new_zeros(g_in.batch_size, g_out.numel, d, d)
    res[:, :, spec.left, spec.right] = second.transpose(1, 2)
    res[:, :, spec.right, spec.left] = second.transpose(1, 2)
    return res


def _coupling(
    p: FuncProblem, g_out: Group, index: list[int], responses: list[Tensor], mask: Tensor
) -> None:
    """The forward-mode coupling check of NOTE [taylor check]."""
    for i, r in zip(index, responses):
        per_sample = g_out.flatten(i, r.detach().unsqueeze(0))[:, 0]  # [B, m_i]
        leak = per_sample.nan_to_num(0.0).abs().amax(dim=-1) > 0
        leak &= ~mask
        if bool(leak.any()):
            where = torch.nonzero(leak).flatten()[:5].tolist()
            inside = torch.nonzero(mask).flatten()[:5].tolist()
            name = "the output of func" + ("" if p.single else f"[{i}]")
            raise BatchCouplingError(
                f"{p.fn_name}: `batch_dim={p.batch_dim}` declares that output sample i depends "
                f"only on input sample i, but {name} at samples {where} depends on the inputs of "
                f"samples {inside}{'...' if int(mask.sum()) > 5 else ''}. Samples are coupled, "
                "e.g. by BatchNorm in train mode (call model.eval()), batch statistics such as "
                "`x - x.mean(0)`, or attention across the batch. Drop `batch_dim` to get the "
                "full Jacobian instead."
            )
