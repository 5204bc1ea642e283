"""Per-sample parameter Jacobians of a plain chain of layers, on plain tensors.

NOTE [parameter chain]: for an ``nn.Sequential`` that NOTE [sequential proof] accepts (or the
same layers read from the ops of any other model, NOTE [parameter chain from operations]), whose
modules are ``Linear``, ``Conv1d`` or ``Conv2d`` (zero padding given as numbers), activations of
``taylor_activations.MODULES``, ``Flatten``, ``Identity`` or an inactive dropout, called on one
plain float32 or float64 tensor batched at dim 0, with every requested parameter the weight or
bias of one of its Linear or convolution layers, the per-sample rows need no captured graph (NOTE
[per-sample parameter Jacobian]). One forward pass of the values keeps each layer's input and
each activation's ``φ'``; per chunk of ``k`` output probes, one backward pass carries the rows
down the chain, probes and samples folded into one batch, and each layer's ``δ`` meets its
closed form (``write_use``), as on the graph. The rows are the same for every sample until the
first activation (``[k, 1, ...]``: the last layer's weight rows, never expanded), and a
convolution's input gradient is one ``conv_input_grad`` of all ``k·N`` rows (NOTE [convolution
input gradient]), where ``is_grads_batched`` on the graph runs one ``convolution_backward`` per
probe. The values are the layers' own functions, the activations' those of their closed forms
(``taylor_activations``: GELU as ``v·Φ(v)``, which may differ from ``F.gelu`` in the last bit).
Anything else returns ``None``, and the graph is captured as before, as it is under autocast
(whose casts the backward pass here would not repeat).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchjac._engine.core import fast
from torchjac._engine.core.module_proof import (
    DROPOUTS,
    inactive_dropout,
    layer_params_like,
    plain_chain,
    plain_float,
)
from torchjac._engine.kernel.conv_grad import conv_input_grad
from torchjac._engine.modules.closed_forms import Use, make_use
from torchjac._engine.modules.layers import ModelState
from torchjac._engine.modules.param_chain_ops import recorded_layers
from torchjac._engine.taylor.taylor_activations import MODULES, module_parts

__all__ = ["Chain", "param_chain"]

Back = Callable[[Tensor], Tensor]  # rows at a layer's output [k, 1 or N, *out] -> at its input


@dataclass(frozen=True)
class Chain:
    """The chain's output value, one ``Use`` per layer with a requested parameter, per layer
    its backward step and the index of its use (if any), in call order, the first layer with a
    use (where the backward pass ends), and what one probe's backward pass allocates."""

    output: Tensor
    uses: list[Use]
    steps: list[tuple[Back, int | None]]
    first: int
    work: int  # elements the backward pass of one probe allocates (for the chunk size)

    def deltas(self, start: int, stop: int) -> list[Tensor | None]:
        """Canonical ``D`` of every use for the one-hot output probes ``start:stop``."""
        out = self.output
        k, n = stop - start, out.shape[0]
        n_out = out.numel() // n
        g = torch.zeros(k, 1, n_out, dtype=out.dtype, device=out.device)
        g[:, 0, start:stop].fill_diagonal_(1)
        g = g.view(k, 1, *out.shape[1:])
        ds: list[Tensor | None] = [None] * len(self.uses)
        for i in range(len(self.steps) - 1, self.first - 1, -1):
            back, u = self.steps[i]
            if u is not None:
                ds[u] = self.uses[u].rows(g.expand(k, n, *g.shape[2:]))
            if i > self.first:
                g = back(g)
        return ds


def param_chain(
    model: nn.Module,
    state: ModelState,
    args: tuple,
    kwargs: dict,
    batch_dim: int,
    recorded: bool = False,
) -> Chain | None:
    """NOTE [parameter chain] for ``model(*args, **kwargs)``, or ``None``; the chain's layout is
    the batch at dim 0, so another ``batch_dim`` gets ``None``. ``recorded``: the layers read
    from the ops of one call (NOTE [parameter chain from operations]) instead of an
    ``nn.Sequential``'s modules."""
    if not fast.enabled() or kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    if not plain_float(x) or x.dim() < 2 or not state.names or _autocast(x.device.type):
        return None
    if batch_dim % x.dim() != 0:
        return None
    layers = recorded_layers(model, state, x) if recorded else plain_chain(model)
    if layers is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    wanted = set(state.names)
    uses: list[Use] = []
    steps: list[tuple[Back, int | None]] = []
    h, work = x.detach(), 0
    with torch.no_grad():
        for layer in layers:
            if type(layer) is nn.Identity or (type(layer) in DROPOUTS and inactive_dropout(layer)):
                continue
            step = _step(layer, h, x)
            if step is None:
                return None
            y, back = step
            work += h.numel() + 2 * y.numel()  # the rows at its input, its D, a scatter's taps
            if type(layer) in (nn.Conv1d, nn.Conv2d):
                work += _taps(layer) * y[:, :1].numel()
            named = [names.get(id(getattr(layer, a, None))) for a in ("weight", "bias")]
            wn, bn = (n if n in wanted else None for n in named)
            use = None
            if wn is not None or bn is not None:
                made = make_use(layer, h, y, wn, bn, 0, y)  # y for e: its shape only
                if made is None:
                    return None
                uses.append(made)
                use = len(uses) - 1
            steps.append((back, use))
            h = y
    covered = {n for u in uses for n in (u.weight, u.bias) if n is not None}
    if covered != wanted:
        return None
    first = min(i for i, (_, u) in enumerate(steps) if u is not None)
    return Chain(h, uses, steps, first, work)


def _step(layer: Any, h: Tensor, x: Tensor) -> tuple[Tensor, Back] | None:
    """The layer's output on ``h`` and its backward step, or ``None`` where the chain stops."""
    kind = type(layer)
    if kind is nn.Linear:
        w, b = layer.weight, layer.bias
        if not layer_params_like(x, w, b) or h.shape[-1] != w.shape[1]:
            return None
        wd = w.detach()
        return F.linear(h, wd, None if b is None else b.detach()), lambda g: g @ wd
    if kind in (nn.Conv1d, nn.Conv2d):
        return _conv_step(layer, h, x)
    if kind in MODULES:
        parts = module_parts(layer, h)
        if parts is None:
            return None
        y, dy = parts[0], parts[1]
        return y, lambda g: g * dy
    if kind is nn.Flatten:
        shape = h.shape[1:]
        y = h.flatten(layer.start_dim, layer.end_dim)
        return y, lambda g: g.reshape(g.shape[0], g.shape[1], *shape)
    return None  # a dropout in train mode, or a module the chain has no step for


def _conv_step(layer: Any, h: Tensor, x: Tensor) -> tuple[Tensor, Back] | None:
    nd = 1 if type(layer) is nn.Conv1d else 2
    w, b = layer.weight, layer.bias
    if (
        not layer_params_like(x, w, b)
        or layer.padding_mode != "zeros"
        or isinstance(layer.padding, str)
    ):
        return None
    if h.dim() != nd + 2 or h.shape[1] != w.shape[1] * layer.groups:
        return None
    wd, bd = w.detach(), None if b is None else b.detach()
    conv = F.conv1d if nd == 1 else F.conv2d
    y = conv(h, wd, bd, layer.stride, layer.padding, layer.dilation, layer.groups)
    lead = (1,) * (2 - nd)  # a 1-d convolution as a 2-d one of height 1
    w2 = wd.view(*wd.shape[:2], *lead, *wd.shape[2:])
    geometry = (
        (*lead, *layer.stride),
        (0,) * (2 - nd) + tuple(layer.padding),
        (*lead, *layer.dilation),
    )
    in_size, shape = (*lead, *h.shape[2:]), h.shape[1:]

    def back(g: Tensor) -> Tensor:
        k, n = g.shape[:2]
        g2 = g.reshape(k * n, g.shape[2], *lead, *g.shape[3:])
        grad = conv_input_grad(g2, w2, in_size, geometry, layer.groups)
        return grad.reshape(k, n, *shape)

    return y, back


def _taps(conv: Any) -> int:
    """Rows of a convolution's scatter product (NOTE [convolution input gradient])."""
    return math.prod(conv.weight.shape[1:]) * conv.groups


def _autocast(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
