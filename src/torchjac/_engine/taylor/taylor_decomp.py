"""Normalisation layers written out in elementary ops for the Taylor mode.

PyTorch's nested forward mode is wrong for ``layer_norm`` and ``batch_norm`` (pytorch#196700,
pytorch#196699), and so for ``instance_norm`` (a batch norm inside), so the general rule of
NOTE [taylor mode] cannot be trusted with them; written
out in means, products and ``rsqrt``, every step has a correct rule. These run with torch
functions enabled, so each step dispatches on Jets again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DECOMPOSITIONS", "GRAPH_DECOMPOSITIONS"]


def _normalise(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    centred = x - x.mean(dim=dims, keepdim=True)
    var = (centred * centred).mean(dim=dims, keepdim=True)
    return centred * torch.rsqrt(var + eps)


def _layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    y = _normalise(input, tuple(range(-len(shape), 0)), eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    # in training, running statistics were updated by the call that traced the function; not again
    dims = (0, *range(2, input.dim()))
    return _channel_norm(input, dims, training, running_mean, running_var, weight, bias, eps)


def _instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    dims = tuple(range(2, input.dim()))
    return _channel_norm(input, dims, use_input_stats, running_mean, running_var, weight, bias, eps)


def _channel_norm(
    input: Tensor,
    dims: tuple[int, ...],
    input_stats: bool,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """Batch and instance norm: statistics over ``dims`` (or the running ones), then affine."""
    shape = [1, -1] + [1] * (input.dim() - 2)
    if input_stats or running_mean is None or running_var is None:
        y = _normalise(input, dims, eps)
    else:
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _torch_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    cudnn_enable: bool = True,
) -> Tensor:
    return _layer_norm(input, normalized_shape, weight, bias, eps)


def _torch_batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> Tensor:
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _torch_instance_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    use_input_stats: bool,
    momentum: float,
    eps: float,
    cudnn_enabled: bool = True,
) -> Tensor:
    return _instance_norm(
        input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps
    )


DECOMPOSITIONS: dict[Any, Any] = {
    F.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    torch.layer_norm: _torch_layer_norm,
    torch.batch_norm: _torch_batch_norm,
    torch.instance_norm: _torch_instance_norm,
}


# NOTE [vector norms with create_graph]: torch's backward of the vector 2-norm and of ``std``
# scales the cotangent in place (``masked_fill_`` where the norm is 0); differentiated again in
# forward mode (forward over reverse, the Taylor mode's general rule) with ``create_graph``, that
# write invalidates a tensor the result's graph saved, so ``backward`` through a Hessian, its
# diagonal or a Laplacian raised "modified by an inplace operation" (torch 2.13, also
# ``torch.func.jacfwd(jacrev(f))``). Under ``create_graph`` they are written out: a sum of
# squares and a square root that is 0 with derivative 0 where the sum is 0, as torch's own (and
# NaN where the sum is NaN, as torch's own).
def _safe_sqrt(s: Tensor) -> Tensor:
    zero = s == 0
    return torch.where(zero, 0.0, torch.sqrt(torch.where(zero, torch.ones_like(s), s)))


def _two_norm(x: Tensor, dim: Any, keepdim: bool) -> Tensor:
    dims = tuple(range(x.dim())) if dim is None else dim
    return _safe_sqrt((x * x).sum(dim=dims, keepdim=keepdim))


def _real_float(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _vector_norm(
    x: Tensor,
    ord: Any = 2,
    dim: Any = None,
    keepdim: bool = False,
    *,
    dtype: Any = None,
    out: Any = None,
) -> Any:
    if ord in (2, 2.0) and dtype is None and out is None and _real_float(x):
        return _two_norm(x, dim, keepdim)
    return NotImplemented


def _torch_norm(
    input: Tensor,
    p: Any = "fro",
    dim: Any = None,
    keepdim: bool = False,
    out: Any = None,
    dtype: Any = None,
) -> Any:
    frobenius = p == "fro" and (dim is None or isinstance(dim, int) or len(dim) <= 2)
    if (frobenius or p in (2, 2.0)) and out is None and dtype is None and _real_float(input):
        return _two_norm(input, dim, keepdim)
    return NotImplemented


def _linalg_norm(
    x: Tensor,
    ord: Any = None,
    dim: Any = None,
    keepdim: bool = False,
    *,
    out: Any = None,
    dtype: Any = None,
) -> Any:
    if out is not None or dtype is not None or not _real_float(x):
        return NotImplemented
    # ord None: the 2-norm over ``dim`` (all of it by default; Frobenius over two dims)
    if ord is None or (ord in (2, 2.0) and (isinstance(dim, int) or x.dim() == 1)):
        return _two_norm(x, dim, keepdim)
    return NotImplemented


def _normalize(
    input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: Any = None
) -> Any:
    if p == 2 and out is None and _real_float(input):
        return input / _two_norm(input, dim, True).clamp_min(eps).expand_as(input)
    return NotImplemented


def _std(*args: Any, **kwargs: Any) -> Any:
    if not args or not _real_float(args[0]) or "out" in kwargs:
        return NotImplemented
    return _safe_sqrt(torch.var(*args, **kwargs))


def _std_mean(*args: Any, **kwargs: Any) -> Any:
    if not args or not _real_float(args[0]) or "out" in kwargs:
        return NotImplemented
    var, mean = torch.var_mean(*args, **kwargs)
    return _safe_sqrt(var), mean


def _cosine_similarity(x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Any:
    if not (_real_float(x1) and _real_float(x2)):
        return NotImplemented
    x1, x2 = torch.broadcast_tensors(x1, x2)
    n1, n2 = _two_norm(x1, dim, True), _two_norm(x2, dim, True)
    # torch clamps the norms in place without a graph: the values only
    n1 = n1 + (n1.clamp_min(eps) - n1).detach()
    n2 = n2 + (n2.clamp_min(eps) - n2).detach()
    return ((x1 / n1) * (x2 / n2)).sum(dim)


def _pairwise_distance(
    x1: Tensor, x2: Tensor, p: float = 2.0, eps: float = 1e-6, keepdim: bool = False
) -> Any:
    if p != 2 or not (_real_float(x1) and _real_float(x2)):
        return NotImplemented
    return _two_norm(x1 - x2 + eps, max(x1.dim(), x2.dim()) - 1, keepdim)


GRAPH_DECOMPOSITIONS: dict[Any, Any] = {
    torch.cosine_similarity: _cosine_similarity,
    torch.pairwise_distance: _pairwise_distance,
    torch.linalg.vector_norm: _vector_norm,
    torch.norm: _torch_norm,
    Tensor.norm: _torch_norm,
    torch.linalg.norm: _linalg_norm,
    F.normalize: _normalize,
    torch.std: _std,
    Tensor.std: _std,
    torch.std_mean: _std_mean,
}
