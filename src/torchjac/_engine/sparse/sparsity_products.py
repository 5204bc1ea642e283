"""Rules of NOTE [sparsity tracing] for matrix products and convolutions.

NOTE [structural products]: in ``C = A B`` the element ``C[i, j]`` reads ``A[i, k]`` for the
``k`` where ``B[k, j]`` can be nonzero, and ``B[k, j]`` for the ``k`` where ``A[i, k]`` can be. An
operand that does not depend on ``x`` is a constant: its zeros are exact zeros for every ``x``
(a sparse matrix, a banded weight), so only its nonzeros join inputs; an operand that depends on
``x`` can be nonzero anywhere. A convolution is the same with the kernel: output position ``o``
reads input position ``o * stride - padding + f * dilation`` for each kernel offset ``f`` whose
weight can be nonzero (in the channels its group connects), and the bias of its channel. A
transposed convolution has no rule here (dense, reported).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.sparse.index_sets import Sets

__all__ = ["convolution_rule", "matmul_rule", "spatial_pairs"]


def _nonzero_flat(t: Tensor, read: Any) -> Tensor | None:
    """Flat (row-major) positions where ``t`` can be nonzero; ``None``: anywhere."""
    if read(t).nnz:
        return None
    if t.layout != torch.strided:
        coo = t.to_sparse_coo().coalesce()
        idx, vals = coo.indices(), coo.values()
        if vals.dim() > 1:
            return None
        strides = [math.prod(t.shape[d + 1 :]) for d in range(t.dim())]
        flat = sum(idx[d] * strides[d] for d in range(t.dim()))
        return torch.as_tensor(flat)[vals != 0].cpu()
    return (t.reshape(-1) != 0).nonzero().reshape(-1).cpu()


def _as_batched(t: Tensor, role: str, name: str) -> tuple[int, int, int]:
    """``(batch, rows, cols)`` of an operand seen as ``[b, r, c]``."""
    if name in ("dot", "vdot"):
        return (1, 1, t.shape[0]) if role == "a" else (1, t.shape[0], 1)
    if name in ("mv", "addmv") and role == "b":
        return 1, t.shape[0], 1
    if t.dim() == 3:
        return t.shape[0], t.shape[1], t.shape[2]
    return 1, t.shape[0], t.shape[1]


def matmul_rule(
    func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Any
) -> list[Sets] | None:
    """``mm``, ``bmm``, ``mv``, ``dot`` and their ``add`` forms: NOTE [structural products]."""
    name = func.overloadpacket.__name__
    bias = args[0] if name in ("addmm", "baddbmm", "addmv", "_sparse_addmm") else None
    a, b = args[1:3] if bias is not None else args[0:2]
    if len(targets) != 1:
        return None
    (out,) = targets
    (nb, i, k), (_, k2, j) = _as_batched(a, "a", name), _as_batched(b, "b", name)
    if out.numel() != nb * i * j or k != k2:
        return None
    n = read.n
    parts = []
    if a.layout == torch.strided and read(a).nnz:
        nz = _nonzero_flat(b, read)
        nz = torch.arange(nb * k * j) if nz is None else nz  # b's (batch, k, j)
        bb, kk, jj = nz // (k * j), (nz // j) % k, nz % j
        ii = torch.arange(i).view(-1, 1)
        o = bb * i * j + ii * j + jj
        src = bb * i * k + ii * k + kk
        parts.append(read(a).pairs(o.reshape(-1), src.reshape(-1), out.numel()))
    if b.layout == torch.strided and read(b).nnz:
        nz = _nonzero_flat(a, read)
        nz = torch.arange(nb * i * k) if nz is None else nz  # a's (batch, i, k)
        bb, ii, kk = nz // (i * k), (nz // k) % i, nz % k
        jj = torch.arange(j).view(-1, 1)
        o = bb * i * j + ii * j + jj
        src = bb * k * j + kk * j + jj
        parts.append(read(b).pairs(o.reshape(-1), src.reshape(-1), out.numel()))
    if bias is not None and read(bias).nnz:
        shape = out.shape
        parts.append(read(bias).take(torch.arange(bias.numel()).view(bias.shape).expand(shape)))
    return [Sets.union(parts, out.numel(), n)]


def spatial_pairs(
    size: list[int], out: list[int], kernel: list[int], stride: Any, pad: Any, dil: Any
) -> list[tuple[Tensor, Tensor]]:
    """Per flat kernel offset: the (output position, input position) pairs it links."""
    d = len(size)
    stride, pad, dil = (list(v) * d if len(v) == 1 else list(v) for v in (stride, pad, dil))
    per_dim = []
    for s, o, k, st, p, di in zip(size, out, kernel, stride, pad, dil):
        pos = torch.arange(o).view(-1, 1) * st - p + torch.arange(k).view(1, -1) * di  # [o, k]
        per_dim.append((pos, (pos >= 0) & (pos < s)))
    result = []
    for f in range(math.prod(kernel)):
        offs = []
        rem = f
        for k in reversed(kernel):
            offs.append(rem % k)
            rem //= k
        offs.reverse()
        o_flat = torch.zeros(1, dtype=torch.long)
        i_flat = torch.zeros(1, dtype=torch.long)
        ok = torch.ones(1, dtype=torch.bool)
        for (pos, valid), f_d, s, o in zip(per_dim, offs, size, out):
            o_flat = (o_flat.view(-1, 1) * o + torch.arange(o).view(1, -1)).reshape(-1)
            i_flat = (i_flat.view(-1, 1) * s + pos[:, f_d].view(1, -1)).reshape(-1)
            ok = (ok.view(-1, 1) & valid[:, f_d].view(1, -1)).reshape(-1)
        result.append((o_flat[ok], i_flat[ok]))
    return result


def convolution_rule(
    func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Any
) -> list[Sets] | None:
    """``aten.convolution`` (not transposed): NOTE [structural products]."""
    x, w, bias, stride, pad, dil, transposed, _, groups = args[:9]
    if transposed or len(targets) != 1 or x.dim() != w.dim():
        return None
    (out,) = targets
    nb, cin, size = x.shape[0], x.shape[1], list(x.shape[2:])
    cout, cin_g, kernel = w.shape[0], w.shape[1], list(w.shape[2:])
    osize = list(out.shape[2:])
    n = read.n
    isz, osz, ksz = math.prod(size), math.prod(osize), math.prod(kernel)
    parts = []
    if read(x).nnz:
        nz = _nonzero_flat(w, read)
        nz = torch.arange(w.numel()) if nz is None else nz  # (co, ci_local, f)
        co, cil, f = nz // (cin_g * ksz), (nz // ksz) % cin_g, nz % ksz
        ci = (co // (cout // groups)) * cin_g + cil
        batch = torch.arange(nb).view(-1, 1, 1)
        for fk, (o_sp, i_sp) in enumerate(spatial_pairs(size, osize, kernel, stride, pad, dil)):
            sel = f == fk
            if not bool(sel.any()) or o_sp.numel() == 0:
                continue
            c_o, c_i = co[sel].view(1, -1, 1), ci[sel].view(1, -1, 1)
            o = (batch * cout + c_o) * osz + o_sp.view(1, 1, -1)
            src = (batch * cin + c_i) * isz + i_sp.view(1, 1, -1)
            parts.append(read(x).pairs(o.reshape(-1), src.reshape(-1), out.numel()))
    channel = torch.arange(cout).view(1, -1, 1).expand(nb, cout, osz).reshape(-1)
    if read(w).nnz:  # every output of a channel reads all of that channel's weights
        per_channel = read(w).relabel(torch.arange(cout).repeat_interleave(cin_g * ksz), cout)
        parts.append(per_channel.take(channel))
    if bias is not None and read(bias).nnz:
        parts.append(read(bias).take(channel))
    return [Sets.union(parts, out.numel(), n)]
