"""What a call must leave as it found it, and what its result must not share.

``Snapshot.take(model, tensors)`` records, bitwise, every parameter, buffer and named tensor (the
user's inputs, outputs, ``jac_outputs``) with its ``.grad``, ``requires_grad``, storage and
version counter, the train/eval flag and hooks of every submodule, the global RNG state, grad
and inference mode, the forward-AD level and the default dtype. ``snap.changes()`` lists what
differs now; ``snap.aliases(result)`` lists the result tensors whose storage overlaps one of the
recorded tensors (or their ``.grad``).

Buffers are compared by value only: restoring BatchNorm statistics after a call may write them
back (bumping their version) and the contract is that they are bitwise as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.nn.modules import module as module_globals


def tensors_of(result: Any) -> list[Tensor]:
    """Every Tensor in a (nested) result: Tensor, tuple/list, dict."""
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in tensors_of(v)]
    if isinstance(result, (tuple, list)):
        return [t for v in result for t in tensors_of(v)]
    return []


def bits(t: Tensor) -> Tensor:
    """The bytes of ``t`` (so -0.0 != 0.0 and NaN == NaN with the same payload)."""
    # a fresh contiguous copy: a size-1 tensor may keep a stride other than 1 through clone()
    flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device).copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


def same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def _span(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def _overlap(a: Tensor, b: Tensor) -> bool:
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < a1 and b0 < b1 and a0 < b1 and b0 < a1


@dataclass
class _Record:
    name: str
    tensor: Tensor  # the object itself
    kind: str  # "param" | "buffer" | "tensor"
    value: Tensor
    cls: type
    requires_grad: bool
    ptr: int
    stride: tuple[int, ...]
    version: int
    grad: Tensor | None  # the .grad object
    grad_value: Tensor | None


def _record(name: str, t: Tensor, kind: str) -> _Record:
    g = t.grad if t.is_leaf else None
    return _Record(
        name,
        t,
        kind,
        t.detach().clone(),
        type(t),
        t.requires_grad,
        t.data_ptr(),
        t.stride(),
        t._version,
        g,
        None if g is None else g.detach().clone(),
    )


_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_module_registration_hooks",
    "_global_parameter_registration_hooks",
    "_global_buffer_registration_hooks",
)


def _global_state() -> dict[str, Any]:
    return {
        "grad mode": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "forward-AD level": forward_ad._current_level,
        "default dtype": torch.get_default_dtype(),
        "global module hooks": [len(getattr(module_globals, h)) for h in _GLOBAL_HOOKS],
    }


@dataclass
class Snapshot:
    records: list[_Record]
    modules: list[tuple[str, nn.Module, bool, list[int], dict[str, Any]]]
    rng: Tensor
    state: dict[str, Any]
    params: list[tuple[str, int]] = field(default_factory=list)

    @staticmethod
    def take(model: nn.Module | None, tensors: dict[str, Tensor]) -> Snapshot:
        records = [_record(n, t, "tensor") for n, t in tensors.items()]
        modules: list[Any] = []
        params: list[tuple[str, int]] = []
        if model is not None:
            records += [_record(n, p, "param") for n, p in model.named_parameters()]
            records += [_record(n, b, "buffer") for n, b in model.named_buffers()]
            params = [(n, id(p)) for n, p in model.named_parameters()]
            for name, m in model.named_modules():
                hooks = [len(getattr(m, h)) for h in _HOOKS]
                modules.append((name, m, m.training, hooks, dict(m.__dict__)))
        return Snapshot(records, modules, torch.get_rng_state(), _global_state(), params)

    def changes(self) -> list[str]:
        """What differs from the snapshot (empty: nothing)."""
        out: list[str] = []
        for r in self.records:
            t, what = r.tensor, f"{r.kind} {r.name!r}"
            if not same_bits(t, r.value):
                out.append(f"{what}: values changed")
            if type(t) is not r.cls:
                out.append(f"{what}: type {r.cls.__name__} -> {type(t).__name__}")
            if t.requires_grad != r.requires_grad:
                out.append(f"{what}: requires_grad {r.requires_grad} -> {t.requires_grad}")
            if t.data_ptr() != r.ptr or t.stride() != r.stride:
                out.append(f"{what}: storage or strides replaced")
            if r.kind != "buffer" and t._version != r.version:
                out.append(f"{what}: written in place (version {r.version} -> {t._version})")
            g = t.grad if t.is_leaf else None
            if g is not r.grad:
                out.append(f"{what}: .grad replaced ({r.grad is None} -> {g is None} for None)")
            elif g is not None and r.grad_value is not None and not same_bits(g, r.grad_value):
                out.append(f"{what}: .grad values changed")
        for name, m, training, hooks, attrs in self.modules:
            if m.training != training:
                out.append(f"module {name!r}: training {training} -> {m.training}")
            if [len(getattr(m, h)) for h in _HOOKS] != hooks:
                out.append(f"module {name!r}: hooks changed")
            if set(m.__dict__) != set(attrs):
                out.append(f"module {name!r}: attributes {sorted(set(m.__dict__) ^ set(attrs))}")
        if self.modules:
            model = self.modules[0][1]
            if [(n, id(p)) for n, p in model.named_parameters()] != self.params:
                out.append("the model's parameters were replaced")
        if not same_bits(torch.get_rng_state(), self.rng):
            out.append("global RNG state changed")
        now = _global_state()
        out += [f"{k}: {v} -> {now[k]}" for k, v in self.state.items() if now[k] != v]
        return out

    def aliases(self, result: Any) -> list[str]:
        """Result tensors sharing storage with a recorded tensor or its ``.grad``."""
        owned = [(r.kind + " " + repr(r.name), r.tensor) for r in self.records]
        owned += [(f".grad of {r.name!r}", r.grad) for r in self.records if r.grad is not None]
        return [
            f"result tensor {i} {tuple(t.shape)} shares storage with {what}"
            for i, t in enumerate(tensors_of(result))
            for what, u in owned
            if _overlap(t, u)
        ]
