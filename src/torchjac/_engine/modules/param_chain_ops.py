"""The layers of NOTE [parameter chain] read from the operations a model's forward runs.

NOTE [parameter chain from operations]: a model that is not an ``nn.Sequential`` (a module
class with a functional ``forward``, a ``ModuleList`` loop, a module around a model) still runs a
chain when its forward does: ``recorded_layers`` calls it once (``functional_call`` on the
call's detached aliases, buffers cloned, the RNG state restored) under a ``TorchFunctionMode``
that follows the tensors derived from the input, and maps each call on the chain's end to a
layer of the chain: ``F.linear`` or a 1-d/2-d convolution whose weight and bias are those of an
``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` of the model, with the module's own geometry (that
module is the layer); an activation of ``taylor_activations.MODULES``, however called
(``nn.ReLU()``, ``F.relu``, ``torch.relu``, ``x.relu()``); ``flatten`` or a reshape to
``[N, -1]``; and as no-ops ``contiguous``, an inactive dropout, a slice that keeps everything.
It is that chain only when every call that reads a derived tensor reads exactly the chain's end,
once, with grad mode on (a custom ``autograd.Function`` runs its forward with it off), and the
forward returns the chain's end; anything else gives ``None`` and the graph is captured as
before. A chain of such layers on an input batched at dim 0 keeps samples apart by
construction, so no coupling check is needed (as NOTE [sequential proof]).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from torchjac._engine.core.call_args import call_arg
from torchjac._engine.core.module_proof import as_torch_calls
from torchjac._engine.modules.batch_trace import METADATA
from torchjac._engine.modules.layers import ModelState, call
from torchjac._engine.taylor.taylor_activations import MODULES

__all__ = ["recorded_layers"]

# call name -> (activation module, the keywords its rule reads), from the rules' own table; an
# in-place call (``x.relu_()``) names the same activation
_ACTIVATIONS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    called: (kind, keys) for kind, (name, keys) in MODULES.items() for called in (name, name + "_")
}
_CONVS = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d}
_DROPOUTS = frozenset(["dropout", "dropout1d", "dropout2d", "alpha_dropout"])


class _Declined(BaseException):
    """Not a chain: the forward is stopped (a ``BaseException``, past ``except Exception``)."""


def recorded_layers(model: nn.Module, state: ModelState, x: Tensor) -> list[nn.Module] | None:
    """The chain's layers, in call order (NOTE [parameter chain from operations]), or ``None``."""
    if not as_torch_calls():
        return None
    tensors = state.with_leaves(state.leaves)
    owners: dict[int, tuple[nn.Module, str]] = {}
    for name, t in tensors.items():
        prefix, _, attr = name.rpartition(".")
        owners[id(t)] = (model.get_submodule(prefix), attr)
    devices = [x.device] if x.device.type == "cuda" else []
    recorder = _Recorder(x, owners)
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        try:
            with recorder:
                out = call(model, tensors, (x,), {})
        except _Declined:
            return None
    if recorder.declined or out is not recorder.end:
        return None
    return recorder.layers or None


class _Recorder(TorchFunctionMode):
    def __init__(self, x: Tensor, owners: dict[int, tuple[nn.Module, str]]) -> None:
        super().__init__()
        self.start, self.end = x, x
        self.keep = [x]  # every tensor that was the end, alive (ids stay unique)
        self.owners = owners
        self.layers: list[nn.Module] = []
        self.declined = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        flat = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        flat += [
            b for a in args if isinstance(a, (list, tuple)) for b in a if isinstance(b, Tensor)
        ]
        derived = [a for a in flat if any(a is k for k in self.keep)]
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        if not derived or name in METADATA:
            return func(*args, **kwargs)
        if self.end is self.start and name == "clone" and derived == [self.start]:
            out = func(*args, **kwargs)  # call()'s copy of the input: the chain starts there
            self.start = self.end = out
            self.keep.append(out)
            return out
        if not torch.is_grad_enabled() or any(a is not self.end for a in derived):
            return self._decline()
        if len(derived) != 1 or not args or args[0] is not self.end or "out" in kwargs:
            return self._decline()
        out = func(*args, **kwargs)
        layer = self._layer(name, args, kwargs, out) if isinstance(out, Tensor) else None
        if layer is None:
            return self._decline()
        if isinstance(layer, nn.Module):
            self.layers.append(layer)
        self.end = out
        self.keep.append(out)
        return out

    def _decline(self) -> Any:
        self.declined = True
        raise _Declined

    def _layer(self, name: str, args: tuple, kwargs: dict, out: Tensor) -> nn.Module | bool | None:
        """The layer of one call on the end; ``True`` for a no-op; ``None``: not a chain."""
        end = self.end
        if name == "linear":
            return self._owned(
                nn.Linear, call_arg(args, kwargs, 1, "weight"), call_arg(args, kwargs, 2, "bias")
            )
        if name in _CONVS:
            layer = self._owned(
                _CONVS[name], call_arg(args, kwargs, 1, "weight"), call_arg(args, kwargs, 2, "bias")
            )
            if layer is None or layer.padding_mode != "zeros":
                return None
            geometry = [call_arg(args, kwargs, i, k, d) for i, k, d in _CONV_ARGS]
            own = [getattr(layer, k) for _, k, _ in _CONV_ARGS]
            nd = 1 if name == "conv1d" else 2
            return (
                layer if [_tuple(g, nd) for g in geometry] == [_tuple(g, nd) for g in own] else None
            )
        if name in _ACTIVATIONS:
            kind, keys = _ACTIVATIONS[name]
            extra = set(kwargs) - {*keys, "inplace"}
            if extra or len(args) > 1 + len(keys):
                return None
            params = dict(zip(keys, args[1:]))
            params.update({k: v for k, v in kwargs.items() if k in keys})
            return kind(**params)
        if name in ("flatten", "reshape", "view"):
            if out.dim() < 2 or out.shape[0] != end.shape[0] or end.dim() < 2:
                return None
            if name == "flatten":
                start = call_arg(args, kwargs, 1, "start_dim", 0)
                stop = call_arg(args, kwargs, 2, "end_dim", -1)
                return nn.Flatten(start, stop) if start % end.dim() >= 1 else None
            return (
                nn.Flatten()
                if out.dim() == 2 and out.shape[1] == math.prod(end.shape[1:])
                else None
            )
        if name == "contiguous":
            return True
        if name in _DROPOUTS:
            p, training = (
                call_arg(args, kwargs, 1, "p", 0.5),
                call_arg(args, kwargs, 2, "training", True),
            )
            return True if p == 0 or not training else None
        if name == "__getitem__" and out.shape == end.shape and len(args) == 2:
            items = args[1] if isinstance(args[1], tuple) else (args[1],)
            return True if all(i is Ellipsis or i == slice(None) for i in items) else None
        return None

    def _owned(self, kind: type, w: Any, b: Any) -> Any:
        """The model's ``kind`` module whose weight is ``w`` and bias ``b`` right now."""
        owner = self.owners.get(id(w)) if isinstance(w, Tensor) else None
        if owner is None or owner[1] != "weight" or type(owner[0]) is not kind:
            return None
        layer = owner[0]
        if getattr(layer, "weight", None) is not w or getattr(layer, "bias", None) is not b:
            return None
        return layer


_CONV_ARGS = [(3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)]


def _tuple(v: Any, nd: int) -> Any:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * nd
    return tuple(v) if isinstance(v, (list, tuple)) else v
