"""Proving a model per sample from its structure, so that the coupling check can be skipped.

NOTE [sequential proof]: ``param_jacobian`` and ``ntk`` with ``batch_dim`` check that samples are
independent with extra backward probes (NOTE [coupling check]), about a sixth more backward
work for ten classes. A model needs no check when its structure shows the independence: an
``nn.Sequential`` (exactly that type, nested ones included) called on one batched Tensor, with
the batch at dimension 0, whose every module is of a type listed here (exactly that type: a
subclass may override ``forward``), configured so that it maps sample ``i`` to sample ``i`` at the
rank its input has there, with no hooks (the module's own or global ones), no ``forward``
replaced on the instance, and no torch-function or dispatch mode active. Anything else gets the
check: a missed proof only costs the check's time, so everything not listed is conservative.
This proof needs no forward; a model it does not cover may still be proven from the ops of the
capture's forward (NOTE [op batch proof]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_globals
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = [
    "DROPOUTS",
    "as_torch_calls",
    "inactive_dropout",
    "layer_params_like",
    "plain_chain",
    "plain_float",
    "proven_per_sample",
]

# A rule maps (module, rank of its input) to the rank of its output, or None: not proven.
Rule = Callable[[Any, int], "int | None"]


def _same(m: Any, rank: int) -> int | None:
    return rank


def _matrix(m: Any, rank: int) -> int | None:
    """Over the last dims of a batched input (features, or channels and beyond)."""
    return rank if rank >= 2 else None


def _batched(k: int) -> Rule:
    """A layer over ``k`` spatial dims: per sample only on batched input (rank ``k + 2``)."""
    return lambda m, rank: rank if rank == k + 2 else None


DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def inactive_dropout(m: Any) -> bool:
    """A dropout module that passes its input through unchanged (eval mode, or ``p == 0``)."""
    return not m.training or m.p == 0


def _eval_dropout(m: Any, rank: int) -> int | None:
    return rank if inactive_dropout(m) else None


def _eval_batch_norm(m: Any, rank: int) -> int | None:
    # training, or no running statistics (track_running_stats=False): batch statistics
    uses_running = not m.training and m.running_mean is not None
    return rank if uses_running and rank >= 2 else None


def _layer_norm(m: Any, rank: int) -> int | None:
    return rank if len(m.normalized_shape) < rank else None


def _softmax(m: Any, rank: int) -> int | None:
    return rank if m.dim is not None and m.dim % rank != 0 else None


def _flatten(m: Any, rank: int) -> int | None:
    start, end = m.start_dim % rank, m.end_dim % rank
    return rank - (end - start) if 1 <= start <= end else None


def _unflatten(m: Any, rank: int) -> int | None:
    return rank + len(m.unflattened_size) - 1 if isinstance(m.dim, int) and m.dim % rank else None


_ELEMENTWISE = (
    *(nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU),
    *(nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish),
    *(nn.LogSigmoid, nn.Tanhshrink, nn.Softsign, nn.PReLU),
)
_RULES: dict[type, Rule] = {t: _same for t in _ELEMENTWISE}
_RULES.update({nn.Linear: _matrix, nn.GroupNorm: _matrix})
for _k, _types in enumerate(
    [
        (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d),
        (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
        (nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
    ],
    start=1,
):
    _RULES.update({t: _batched(_k) for t in _types})
_RULES.update({t: _eval_dropout for t in DROPOUTS})
_RULES.update({t: _eval_batch_norm for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)})
_RULES.update({nn.LayerNorm: _layer_norm, nn.Softmax: _softmax, nn.LogSoftmax: _softmax})
_RULES.update({nn.Flatten: _flatten, nn.Unflatten: _unflatten})

# the methods a call goes through, as torch defines them (a patch on the class or instance is not
# the listed behaviour)
_CALL = (nn.Module.__call__, nn.Module._call_impl, nn.Module._wrapped_call_impl)
_FORWARD: dict[Any, Any] = {t: getattr(t, "forward") for t in (*_RULES, nn.Sequential)}  # noqa: B009


def _as_defined(m: nn.Module) -> bool:
    t: Any = type(m)
    if any(name in m.__dict__ for name in ("forward", "__call__", "_call_impl")):
        return False
    if getattr(m, "_compiled_call_impl", None) is not None:
        return False
    if (t.__call__, t._call_impl, t._wrapped_call_impl) != _CALL:
        return False
    return t in _FORWARD and t.forward is _FORWARD[t]


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def proven_per_sample(model: nn.Module, args: tuple, kwargs: dict, batch_dim: int) -> bool:
    """Whether ``model(*args, **kwargs)`` provably keeps samples apart (NOTE [sequential proof]).

    Call it before hooking the model: hooks found on it are taken for the user's.
    """
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return False
    rank = args[0].dim()
    if rank < 2 or batch_dim % rank != 0:
        return False
    if not as_torch_calls():
        return False
    out = _walk(model, rank)  # the output keeps the batch at batch_dim too (a negative one too)
    return out is not None and batch_dim % out == 0


def as_torch_calls() -> bool:
    """No global module hooks and no torch-function or dispatch mode: a module call is its
    ``forward``."""
    if any(getattr(module_globals, g, None) for g in _GLOBAL_HOOKS):
        return False
    modes_on = getattr(torch._C, "_is_torch_function_mode_enabled", None)  # private torch API
    return not (modes_on is None or modes_on() or _get_current_dispatch_mode() is not None)


def plain_chain(model: nn.Module) -> list[nn.Module] | None:
    """The modules of an ``nn.Sequential`` in call order, nested ones flattened, when each is
    called as torch defines it (NOTE [sequential proof]: exact listed types, no hooks, no
    patched ``forward``, no torch-function or dispatch mode); else ``None``."""
    if not as_torch_calls():
        return None
    out: list[nn.Module] = []

    def visit(m: Any) -> bool:
        if not _unhooked_as_defined(m):
            return False
        if type(m) is nn.Sequential:
            return all(visit(child) for child in m)
        out.append(m)
        return True

    return out if visit(model) else None


def plain_float(t: Any) -> bool:
    """A plain (or Parameter) float32 or float64 tensor, for the chains that run a model's layers
    on plain tensors: a subclass may change what the ops mean (a chain would mix its values with
    plain derivatives), and in float16 a chain's ``g·φ''`` underflows where the Taylor tape's
    does not."""
    return type(t) in (Tensor, nn.Parameter) and t.dtype in (torch.float32, torch.float64)


def layer_params_like(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """A layer's weight and bias as a chain runs them on ``x``: plain floats of ``x``'s dtype and
    device, a bias of one element per output (else the model runs, and raises its own error)."""
    if b is not None and b.shape != w.shape[:1]:
        return False
    return all(
        t is None or (plain_float(t) and t.dtype == x.dtype and t.device == x.device)
        for t in (w, b)
    )


def _unhooked_as_defined(m: Any) -> bool:
    return _as_defined(m) and not any(getattr(m, h, None) for h in _HOOK_DICTS)


def _walk(m: Any, rank: int) -> int | None:
    if not _unhooked_as_defined(m):
        return None
    if type(m) is nn.Sequential:
        out: int | None = rank
        for child in m:
            out = _walk(child, out) if out is not None else None
        return out
    rule = _RULES.get(type(m))
    return None if rule is None else rule(m, rank)
