"""Running the Taylor mode on a function, checking it, and reading second derivatives out.

NOTE [taylor check]: the Taylor mode follows the torch calls the function makes; it cannot see
inside a custom ``autograd.Function`` (whose forward it would differentiate instead of using the
user's backward), through ``torch.no_grad()`` blocks or through tensors the function builds from
Python numbers. Its first-order part is therefore checked against one reverse-mode pullback
(``u^T J`` for a random ``u``, the pullback of the batch coupling check when there is one): any
disagreement beyond rounding means the propagation missed something, and the call takes nested
AD instead (``TaylorFailed``). A failure inside the propagation does the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from torchjac._engine.func_call import FuncProblem
from torchjac._engine.taylor import Jet, JetSpec, constant

if TYPE_CHECKING:
    from torchjac._engine.func_probes import Traced

__all__ = ["TaylorFailed", "taylor"]


class TaylorFailed(Exception):
    """The Taylor mode could not follow the function (see NOTE [taylor check])."""


def taylor(p: FuncProblem, t: Traced, kind: str) -> Tensor:
    """``[B, R, D]`` Jacobians (``kind="first"``), ``[B, R]`` traces, ``[B, R, D]`` diagonals
    or ``[B, R, D, D]`` Hessians, see NOTE [taylor mode]."""
    g_in, g_out = t.in_group, t.out_group
    d = g_in.numel
    left = right = None
    if kind == "full":
        left, right = torch.triu_indices(d, d, device=p.device)
    spec = JetSpec(d, kind, left, right)
    seeds = g_in.one_hot(0, d, p.dtype, p.device)
    jets = []
    for x, seed in zip(p.inputs, seeds):
        assert seed is not None
        zeros = x.new_zeros(spec.n_second, *x.shape)
        jets.append(Jet.of(torch.cat([x.unsqueeze(0), seed.to(x.dtype), zeros]), spec))
    try:
        outs, _ = p.call(*jets)
    except Exception as err:
        raise TaylorFailed(err) from err
    stacks = [y.stack if isinstance(y, Jet) else constant(y, spec) for y in outs]
    for y, s in zip(t.outputs, stacks):
        if s.shape[1:] != y.shape:
            raise TaylorFailed(f"an output has shape {list(s.shape[1:])}, expected {list(y.shape)}")
    _check_first_order(p, t, [s[1 : 1 + d] for s in stacks])
    if kind == "first":
        flat = [g_out.flatten(i, s[1 : 1 + d]) for i, s in enumerate(stacks)]  # [B, D, m_i]
        return torch.cat(flat, dim=2).transpose(1, 2).to(p.dtype)
    second = torch.cat([g_out.flatten(i, s[1 + d :]) for i, s in enumerate(stacks)], dim=2).to(
        p.dtype
    )  # [B, S, R]
    if kind == "trace":
        return second[:, 0]
    if kind == "diag":
        return second.transpose(1, 2)
    assert left is not None and right is not None
    res = second.new_zeros(g_in.batch_size, g_out.numel, d, d)
    res[:, :, left, right] = second.transpose(1, 2)
    res[:, :, right, left] = second.transpose(1, 2)
    return res


def _check_first_order(p: FuncProblem, t: Traced, firsts: list[Tensor]) -> None:
    """See NOTE [taylor check]."""
    if t.probe is None:
        gen = torch.Generator().manual_seed(11)
        cots = tuple(
            torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device) for y in t.outputs
        )
        grads = t.pullback(cots)
    else:
        cots, grads = t.probe
    g_in, g_out = t.in_group, t.out_group
    from_jets = sum(
        (g_out.flatten(i, f) * g_out.flatten(i, u.unsqueeze(0))).sum(-1).to(p.dtype)
        for i, (f, u) in enumerate(zip(firsts, cots))
    )  # [B, D]
    pulled = torch.cat(
        [g_in.flatten(j, g.unsqueeze(0))[:, 0].to(p.dtype) for j, g in enumerate(grads)], dim=1
    )
    magnitude = sum(
        (g_out.flatten(i, f).abs() * g_out.flatten(i, u.unsqueeze(0)).abs()).sum(-1).to(p.dtype)
        for i, (f, u) in enumerate(zip(firsts, cots))
    )
    assert isinstance(from_jets, Tensor) and isinstance(magnitude, Tensor)
    if not pulled.numel():
        return
    err = float((from_jets - pulled).detach().abs().max())
    scale = max(float(magnitude.detach().max()), float(pulled.detach().abs().max()), 1e-30)
    tol = 10 * torch.finfo(p.dtype).eps ** 0.5
    if not err <= tol * scale + 100 * torch.finfo(p.dtype).eps:
        raise TaylorFailed(
            f"its first derivatives disagree with reverse mode (max difference {err:.3g}); a "
            "custom autograd.Function or a torch.no_grad() block inside func?"
        )
