"""Rules of NOTE [sparsity tracing] for ops that read whole slices or windows: reductions,
ops along one dimension (softmax, cumulative ops, sorting), layer norm and pooling.

An output element of a reduction reads every element of its slice; one of softmax, ``cumsum``
or ``sort`` every element of the slice along the dimension (``cumsum`` reads only a prefix: a
superset); one of layer norm every element of its normalized group, and the weight and bias
elements at its position; one of batch norm in training every element of its channel (in
eval mode its own element), one of group norm every element of its sample's group, with the
per-channel weight, bias and statistics; one of a pooling window every input element the
window covers (the windows of NOTE [structural products], every channel on its own).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.sparse.index_sets import Sets
from torchjac._engine.sparse.sparsity_base import Reader, Result, bind, broadcast, tensors
from torchjac._engine.sparse.sparsity_products import spatial_maps

__all__ = ["along_dim_rule", "layer_norm_rule", "norm_rule", "pool_rule", "reduction_rule"]


def _dims(value: Any, ndim: int) -> list[int]:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return list(range(ndim))
    dims = [value] if isinstance(value, int) else list(value)
    return sorted({d % max(ndim, 1) for d in dims}) if ndim else []


def _group_code(shape: torch.Size, dims: list[int]) -> tuple[Tensor, int, list[int]]:
    """For each element of ``shape``: the index of its slice when ``dims`` are reduced."""
    kept = [1 if d in dims else s for d, s in enumerate(shape)]
    groups = math.prod(kept)
    return torch.arange(groups).view(kept).expand(shape).reshape(-1), groups, kept


def reduction_rule(
    func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader
) -> Result:
    b = bind(func, args, kwargs)
    self = args[0]
    if any(read(t).live for t in tensors((args[1:], kwargs))):
        return None
    code, groups, _ = _group_code(self.shape, _dims(b.get("dim"), self.dim()))
    grouped = read(self).relabel(code, groups)
    if any(t.numel() != groups for t in targets):
        return None
    return [grouped for _ in targets]


def along_dim_rule(
    func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader
) -> Result:
    b = bind(func, args, kwargs)
    self = args[0]
    if any(read(t).live for t in tensors((args[1:], kwargs))):
        return None
    dim = b.get("dim")
    dims = _dims(-1 if dim is None else dim, self.dim())
    code, groups, kept = _group_code(self.shape, dims)
    grouped = read(self).relabel(code, groups)
    result = []
    for t in targets:
        if t.numel() == groups:  # one element per slice (kthvalue, median, keepdim or not)
            result.append(grouped)
        elif t.dim() == self.dim():  # k per slice (topk) or the whole slice (softmax, sort)
            result.append(grouped.take(torch.arange(groups).view(kept).expand(t.shape)))
        else:
            return None
    return result


def layer_norm_rule(
    func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader
) -> Result:
    """``native_layer_norm(x, shape, weight, bias, eps) -> (y, mean, rstd)``."""
    x, shape, weight, bias = args[0], list(args[1]), args[2], args[3]
    k = len(shape)
    code, groups, _ = _group_code(x.shape, list(range(x.dim() - k, x.dim())))
    grouped = read(x).relabel(code, groups)
    result = []
    for t in targets:
        if t.numel() == groups:  # mean, rstd
            result.append(grouped)
            continue
        if t.shape != x.shape:
            return None
        parts = [grouped.take(code)]
        parts += [broadcast(read(p), p, t.shape) for p in (weight, bias) if p is not None]
        result.append(Sets.union(parts, t.numel(), grouped.n))
    return result


def pool_rule(func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader) -> Result:
    """Average and max pooling (values and indices): each window's elements, per channel."""
    b = bind(func, args, kwargs)
    x = args[0]
    if any(read(t).live for t in tensors((args[1:], kwargs))) or not targets:
        return None
    kernel = list(b["kernel_size"])
    d = len(kernel) if len(kernel) > 1 else targets[0].dim() - (2 if x.dim() > 2 else 1)
    kernel = kernel * d if len(kernel) == 1 else kernel
    stride = list(b.get("stride") or kernel)
    pad, dil = list(b.get("padding") or [0]), list(b.get("dilation") or [1])
    size, out = list(x.shape[-d:]), list(targets[0].shape[-d:])
    if any(list(t.shape[:-d]) != list(x.shape[:-d]) for t in targets):
        return None
    lead, isz = math.prod(x.shape[:-d]), math.prod(size)
    maps = spatial_maps(size, out, kernel, stride, pad, dil)  # [osz, ksz]
    channel = torch.arange(lead).view(-1, 1, 1) * isz
    idx = torch.where(maps >= 0, channel + maps, -1).reshape(-1, maps.shape[1])
    sets = read(x).gather(idx)
    return [sets for _ in targets]


def norm_rule(func: Any, args: Any, kwargs: Any, targets: list[Tensor], read: Reader) -> Result:
    """Batch norm (training: each channel over the whole batch; else elementwise) and group
    norm (each group of channels of a sample); the per-channel tensors (weight, bias, running
    statistics) join each element of their channel."""
    b = bind(func, args, kwargs)
    x = b["input"]
    if x.dim() < 2:
        return None
    nb, c = x.shape[0], x.shape[1]
    idx = torch.arange(x.numel())
    inner = x.numel() // max(nb * c, 1)
    channel = (idx // max(inner, 1)) % max(c, 1)
    if func.overloadpacket.__name__ == "native_group_norm":
        g = int(b["group"])
        gid, groups = (idx // max(inner * c, 1)) * g + channel // max(c // g, 1), nb * g
    elif b.get("training", False):
        gid, groups = channel, c
    else:
        gid, groups = idx, x.numel()
    grouped = read(x).relabel(gid, groups)
    extra = [v for k, v in b.items() if k != "input" and isinstance(v, Tensor)]
    if any(read(t).live and t.numel() != c for t in extra):
        return None
    per_channel = [read(t).take(channel) for t in extra if read(t).live]
    result = []
    for t in targets:
        if t.shape == x.shape:
            result.append(Sets.union([grouped.take(gid), *per_channel], t.numel(), read.n))
        elif t.numel() == groups:  # the statistics of each group (and running ones updated)
            result.append(grouped)
        else:
            return None
    return result
