"""Rules of NOTE [sparsity tracing] for matrix products and convolutions.

NOTE [structural products]: in ``C = A B`` the element ``C[i, j]`` reads ``A[i, k]`` for the
``k`` where ``B[k, j]`` can be nonzero, and ``B[k, j]`` for the ``k`` where ``A[i, k]`` can be. An
operand that does not depend on ``x`` is a constant: its zeros are exact zeros for every ``x``
(a sparse matrix, a banded weight), so only its nonzeros join inputs; an operand that depends on
``x`` can be nonzero anywhere. A convolution is the same with the kernel: output position ``o``
reads input position ``o * stride - padding + f * dilation`` for each kernel offset ``f`` whose
weight can be nonzero (in the channels its group connects), and the bias of its channel: one
gather of the input's index sets through an ``[outputs, pairs]`` index, a pure function of the
shapes, the geometry and the weight's nonzeros (cached for stencil-sized weights). A
transposed convolution has no rule here (dense, reported).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.sparse.index_sets import Sets

__all__ = ["convolution_rule", "matmul_rule", "spatial_maps"]


def _nonzero_flat(t: Tensor, read: Any) -> Tensor | None:
    """Flat (row-major) positions where ``t`` can be nonzero; ``None``: anywhere."""
    if read(t).live:
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
    if a.layout == torch.strided and read(a).live:
        nz = _nonzero_flat(b, read)
        nz = torch.arange(nb * k * j) if nz is None else nz  # b's (batch, k, j)
        bb, kk, jj = nz // (k * j), (nz // j) % k, nz % j
        ii = torch.arange(i).view(-1, 1)
        o = bb * i * j + ii * j + jj
        src = bb * i * k + ii * k + kk
        parts.append(read(a).pairs(o.reshape(-1), src.reshape(-1), out.numel()))
    if b.layout == torch.strided and read(b).live:
        nz = _nonzero_flat(a, read)
        nz = torch.arange(nb * i * k) if nz is None else nz  # a's (batch, i, k)
        bb, ii, kk = nz // (i * k), (nz // k) % i, nz % k
        jj = torch.arange(j).view(-1, 1)
        o = bb * i * j + ii * j + jj
        src = bb * k * j + kk * j + jj
        parts.append(read(b).pairs(o.reshape(-1), src.reshape(-1), out.numel()))
    if bias is not None and read(bias).live:
        shape = out.shape
        parts.append(read(bias).take(torch.arange(bias.numel()).view(bias.shape).expand(shape)))
    return [Sets.union(parts, out.numel(), n)]


def spatial_maps(
    size: list[int],
    out: list[int],
    kernel: list[int],
    stride: Any,
    pad: Any,
    dil: Any,
    offsets: Tensor | None = None,
) -> Tensor:
    """``[out positions, offsets]``: the input position each output position reads at each
    kernel offset (positions and offsets flat, row-major; all offsets unless given), ``-1``
    where it falls in the padding."""
    d = len(size)
    stride, pad, dil = (list(v) * d if len(v) == 1 else list(v) for v in (stride, pad, dil))
    f = torch.arange(math.prod(kernel)) if offsets is None else offsets
    flat = torch.zeros((), dtype=torch.long)
    ok = torch.ones((), dtype=torch.bool)
    inner = math.prod(kernel)
    for a, (s, o, k, st, p, di) in enumerate(zip(size, out, kernel, stride, pad, dil)):
        inner //= k
        pos = torch.arange(o).view(-1, 1) * st - p + ((f // inner) % k).view(1, -1) * di
        shape = [1] * (d + 1)
        shape[a], shape[d] = o, f.numel()
        flat = flat * s + pos.view(shape)  # [o_0, ..., o_a, 1, ..., offsets]
        ok = ok & ((pos >= 0) & (pos < s)).view(shape)
    return torch.where(ok, flat, -1).reshape(math.prod(out), f.numel())


CACHED_PAIRS = 4096  # (channel, offset) pairs of a weight up to which its index is cached


def _conv_index(
    nz: Tensor, x: Tensor, w: Tensor, osize: list[int], geometry: Any, groups: int
) -> Tensor:
    """``[output elements, s]``: the input elements each output element reads, ``-1`` for
    none (``s``: the most (input channel, offset) pairs an output channel reads). A pure
    function of the shapes, the geometry and the weight's nonzeros: cached (read only) for a
    weight with few of them, as a stencil's."""
    key = (
        tuple(x.shape[:2]),
        tuple(w.shape),
        tuple(osize),
        tuple(tuple(int(v) for v in g) for g in geometry),
        groups,
    )
    if nz.numel() <= CACHED_PAIRS:
        return _conv_index_of(tuple(nz.tolist()), tuple(x.shape), *key[1:])
    return _conv_index_now(nz, tuple(x.shape), *key[1:])


@functools.lru_cache(maxsize=16)
def _conv_index_of(nz: tuple[int, ...], *args: Any) -> Tensor:
    return _conv_index_now(torch.tensor(nz, dtype=torch.long), *args)


def _conv_index_now(
    nz: Tensor,
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    osize: tuple[int, ...],
    geometry: tuple[tuple[int, ...], ...],
    groups: int,
) -> Tensor:
    nb, cin, size = x_shape[0], x_shape[1], list(x_shape[2:])
    cout, cin_g, kernel = w_shape[0], w_shape[1], list(w_shape[2:])
    isz, osz, ksz = math.prod(size), math.prod(osize), math.prod(kernel)
    nz = torch.sort(nz).values  # grouped by output channel
    co, cil, f = nz // (cin_g * ksz), (nz // ksz) % cin_g, nz % ksz
    ci = (co // (cout // groups)) * cin_g + cil
    counts = torch.bincount(co, minlength=cout)
    used, at = torch.unique(f, return_inverse=True)
    stride, pad, dil = geometry
    src = spatial_maps(size, list(osize), kernel, stride, pad, dil, used)[:, at].T
    batch = torch.arange(nb).view(-1, 1, 1)
    val = torch.where(src >= 0, (batch * cin + ci.view(1, -1, 1)) * isz + src, -1)
    most = int(counts.max())
    if int(counts.min()) == most:  # as many pairs per output channel: already in place
        idx = val.view(nb, cout, most, osz)
    else:
        slot = torch.arange(nz.numel()) - (torch.cumsum(counts, 0) - counts)[co]
        idx = torch.full((nb, cout, most, osz), -1, dtype=torch.long)
        idx[:, co, slot, :] = val
    return idx.transpose(2, 3).reshape(nb * cout * osz, most)


def convolution_rule(
    func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Any
) -> list[Sets] | None:
    """``aten.convolution`` (not transposed): NOTE [structural products]."""
    x, w, bias, stride, pad, dil, transposed, _, groups = args[:9]
    if transposed or len(targets) != 1 or x.dim() != w.dim():
        return None
    (out,) = targets
    nb, cout, cin_g = x.shape[0], w.shape[0], w.shape[1]
    osize, ksz = list(out.shape[2:]), math.prod(w.shape[2:])
    osz, n = math.prod(osize), read.n
    parts = []
    if read(x).live:
        nz = _nonzero_flat(w, read)
        nz = torch.arange(w.numel()) if nz is None else nz  # (co, ci_local, f), sorted
        if nz.numel():
            parts.append(read(x).gather(_conv_index(nz, x, w, osize, (stride, pad, dil), groups)))
    w_live, b_live = read(w).live, bias is not None and read(bias).live
    if w_live or b_live:
        channel = torch.arange(cout).view(1, -1, 1).expand(nb, cout, osz).reshape(-1)
    if w_live:  # every output of a channel reads all of that channel's weights
        per_channel = read(w).relabel(torch.arange(cout).repeat_interleave(cin_g * ksz), cout)
        parts.append(per_channel.take(channel))
    if b_live:
        parts.append(read(bias).take(channel))
    return [Sets.lazy_union(parts, out.numel(), n)]
