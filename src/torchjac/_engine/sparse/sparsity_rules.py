"""Rules of NOTE [sparsity tracing]: an aten op's outputs' index sets from its inputs'.

A rule returns one :class:`Sets` per written tensor (rows in its row-major order), or ``None``
when the call is outside what it understands (the tracer then takes the dense rule and reports
the op). Each rule holds for every value of the tracked inputs:

- elementwise ops (torch's ``pointwise`` tag): output element ``i`` reads the broadcast element
  ``i`` of each input; a floating output does not depend on a boolean or integer input (a
  ``where`` condition, a mask): no derivative flows through it and it selects nothing;
- data movement (NOTE [movement codes]): the op is run on codes ``1..numel`` of one input (the
  others zero), and each output code names the element it copied;
- reductions, ops along one dimension (softmax, cumsum, sort), layer norm and pooling:
  ``sparsity_groups``;
- scatters, ``index_put`` and ``copy_``: the written positions read the source elements sent
  there, the others keep their sets; products and convolutions: ``sparsity_products``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.sparse.index_sets import Sets
from torchjac._engine.sparse.sparsity_base import (
    Reader,
    Result,
    Rule,
    bind,
    broadcast,
)
from torchjac._engine.sparse.sparsity_groups import (
    along_dim_rule,
    layer_norm_rule,
    norm_rule,
    pool_rule,
    reduction_rule,
)
from torchjac._engine.sparse.sparsity_movement import movement_rule
from torchjac._engine.sparse.sparsity_products import convolution_rule, matmul_rule

__all__ = ["choose_rule", "pointwise_rule"]

aten = torch.ops.aten


def pointwise_rule(
    func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader
) -> Result:
    """Elementwise ops (NOTE [sparsity tracing]); ``_Tracer`` has a fast path for the common
    case, which must agree with this rule."""
    leaves = read.tracked
    result = []
    for out in targets:
        floating = out.is_floating_point() or out.is_complex()
        parts = []
        for a in leaves:
            if floating and not (a.is_floating_point() or a.is_complex()):
                continue  # NOTE [sparsity tracing]: a mask selects, it carries no derivative
            try:
                parts.append(broadcast(read(a), a, out.shape))
            except RuntimeError:
                return None
        result.append(Sets.union(parts, out.numel(), read(leaves[0]).n))
    return result


def _constant(func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader) -> Result:
    n = read.n
    return [Sets.empty(t.numel(), n) for t in targets]


def _copy(func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader) -> Result:
    self, src = args[0], args[1]
    return [broadcast(read(src), src, self.shape) for _ in targets]


def _scatter(func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader) -> Result:
    b = bind(func, args, kwargs)
    self = args[0]
    src = next((b[k] for k in ("src", "source", "values") if isinstance(b.get(k), Tensor)), None)
    if len(targets) != 1 or targets[0].shape != self.shape:
        return None
    (out,) = targets
    n = read.n
    parts = [read(self)]
    if src is not None and read(src).live:
        idx: Any = b.get("index", b.get("indices"))
        if read.depends(idx):
            parts.append(read(src).dense_to(out.numel()))
        else:
            code = torch.arange(self.numel(), device=self.device).view(self.shape)
            pos = torch.arange(src.numel(), device=self.device).view(src.shape)
            name = func.overloadpacket.__name__.strip("_")
            if name.startswith("scatter"):
                tgt = code.gather(b["dim"], idx)
                pos = pos[tuple(slice(0, s) for s in idx.shape)]
            elif name.startswith("index_put"):
                tgt = aten.index.Tensor(code, idx)
                pos = pos.expand(tgt.shape)
            else:  # index_add, index_copy, index_reduce
                tgt = code.index_select(b["dim"], idx) if self.dim() else code
            if pos.shape != tgt.shape:
                return None
            tgt, pos = tgt.reshape(-1).cpu(), pos.reshape(-1).cpu()
            parts.append(read(src).pairs(tgt, pos, out.numel()))
    return [Sets.union(parts, out.numel(), n)]


def _names(text: str, inplace: bool = True) -> frozenset[str]:
    """Op names from a whitespace-separated list, with their in-place forms (``name_``)."""
    names = frozenset(text.split())
    return names | frozenset(f"{n}_" for n in names) if inplace else names


POINTWISE = _names("_to_copy clone lift_fresh_copy native_dropout masked_fill")
CONSTANT = _names(
    """
    zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros
    new_ones new_empty new_full new_empty_strided zero_ fill_ fill uniform_ normal_
    bernoulli_ exponential_ random_ cauchy_ geometric_ log_normal_
    """,
    inplace=False,
)
MOVEMENT = _names(
    """
    roll flip rot90 constant_pad_nd reflection_pad1d reflection_pad2d reflection_pad3d
    replication_pad1d replication_pad2d replication_pad3d cat stack index_select gather
    index _unsafe_index take repeat tril triu diag_embed diag embedding im2col narrow_copy
    view_copy permute_copy expand_copy slice_copy select_copy diagonal_copy unsqueeze_copy
    squeeze_copy transpose_copy t_copy alias_copy unfold_copy as_strided_copy _reshape_copy
    pixel_shuffle pixel_unshuffle channel_shuffle upsample_nearest1d upsample_nearest2d
    upsample_nearest3d _upsample_nearest_exact1d _upsample_nearest_exact2d
    _upsample_nearest_exact3d slice_scatter select_scatter diagonal_scatter
    as_strided_scatter masked_scatter index_fill repeat_interleave slice_backward
    select_backward diagonal_backward
    """
)
ALONG_DIM = _names(
    """
    _softmax _log_softmax softmax log_softmax cumsum cumprod logcumsumexp cummax cummin
    sort topk kthvalue argsort median nanmedian mode
    """
)
SCATTER = _names(
    """
    scatter scatter_add scatter_reduce index_add index_copy index_reduce index_put
    _index_put_impl
    """
)
COPY = frozenset({"copy_", "copy"})
NORMS = _names(
    """
    native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training
    _native_batch_norm_legit_functional native_group_norm
    """,
    inplace=False,
)
# torch's ``reduction`` tag marks these and more; the names keep a torch without it covered
_REDUCTION = getattr(torch.Tag, "reduction", None)
REDUCTIONS = _names(
    """
    sum mean amax amin max min aminmax prod logsumexp norm linalg_vector_norm var std var_mean
    std_mean argmax argmin any all nansum count_nonzero
    """,
    inplace=False,
)
POOLS = _names(
    """
    avg_pool2d avg_pool3d max_pool2d_with_indices max_pool3d_with_indices
    max_pool1d_with_indices max_pool1d max_pool2d max_pool3d
    """
)


@functools.cache
def choose_rule(func: Any) -> Rule | None:
    """The rule for an aten op overload, or ``None`` (dense, reported)."""
    name = func.overloadpacket.__name__
    if name in ("fill", "fill_") and func._overloadname == "Tensor":
        return pointwise_rule  # filled with a (maybe tracked) 0-d tensor
    if name in CONSTANT:
        return _constant
    if name in COPY:
        return _copy
    if name in MOVEMENT:
        return movement_rule
    if name in SCATTER:
        return _scatter
    if name in ALONG_DIM and (name not in ("median", "nanmedian") or "dim" in func._overloadname):
        return along_dim_rule
    if name in ("convolution", "_convolution"):
        return convolution_rule
    if name in POOLS:
        return pool_rule
    if name == "native_layer_norm":
        return layer_norm_rule
    if name in NORMS:
        return norm_rule
    if name in (
        "mm",
        "bmm",
        "addmm",
        "baddbmm",
        "mv",
        "addmv",
        "dot",
        "vdot",
        "_sparse_mm",
        "_sparse_addmm",
    ):
        return matmul_rule
    if _reduces(func, name):
        return reduction_rule
    if name in POINTWISE or _pointwise_tagged(func):
        return pointwise_rule
    return None


def _reduces(func: Any, name: str) -> bool:
    if name in ("median", "nanmedian"):  # the whole tensor (the dim overloads are along_dim)
        return True
    if _REDUCTION is not None:
        return _REDUCTION in func.tags
    return name in REDUCTIONS and func._overloadname not in ("other", "binary_out")


def _pointwise_tagged(func: Any) -> bool:
    if torch.Tag.pointwise in func.tags:
        return True
    name = func.overloadpacket.__name__
    if not name.endswith("_"):
        return False  # an in-place op is pointwise when its functional form is
    packet = getattr(aten, name[:-1], None)
    overload = getattr(packet, func._overloadname, None) if packet is not None else None
    return overload is not None and torch.Tag.pointwise in overload.tags
