"""A function's chain of affine maps and activations, read from the operations it runs.

NOTE [chain from operations]: NOTE [taylor chain] applies to any function of one Tensor whose
forward is a chain ``x -> A_1 -> φ_1 -> A_2 -> ... -> A_L``, then a selection of the output
(``y[..., 0]``, ``squeeze``, ``reshape``), however the function is written: an ``nn.Sequential``,
a module class with a functional ``forward``, a ``ModuleList`` loop, a lambda or closure around
a model. ``A_l`` is a linear map whose operands do not depend on ``x`` (``F.linear``, ``@``,
``addmm``), or an elementwise scale or shift by such a constant (input normalisation), ``φ_l``
an activation of ``taylor_activations.ACTIVATIONS`` (module or functional). ``recorded_chain``
calls the function once, under a torch-function mode that follows the tensors derived from
``x`` (the first of them ``x``'s copy). It is a chain only when all of these hold, else ``None``
(and the general Taylor mode runs):

- every call that reads a derived tensor reads exactly the chain's current end (no branch, no
  residual), and is a step above, or a shape-preserving no-op (``contiguous``, an inactive
  dropout), or, once the chain has ended, a selection (``TAIL``); metadata reads (``shape``,
  ``dim``) are free;
- grad mode is on at each such call (a custom ``autograd.Function`` or a ``torch.no_grad()``
  block runs its body with it off: its own backward would be ignored, NOTE [taylor check]);
- no operand of a step depends on ``x`` through the autograd graph (``x``'s copy requires grad,
  so an operation the mode cannot see, such as a TorchScript function, still leaves a trace);
- the function returns the chain's end, and each output sample selects the same elements of
  its own sample of the last map's output (checked by running the selection on indices).

NOTE [recorded values]: the recording is a forward pass, so the chain keeps what it computed
(``Values``: each activation's input and output, and the last map's output) and NOTE [taylor
chain] starts from them instead of running the products again (on W2's module class, 2→64³→3
tanh at B=1024, the recording took 1.11 ms and the chain's own forward 0.85 ms more). The steps
hold copies of the weights, biases, scales and shifts as each step read them, so a write the
version counters do not see (through ``.data``) between a step and the end changes nothing: the
chain is the function as it ran. The values are dropped (and the chain runs its own forward)
when one was written in place after it was kept (an in-place activation, ``h.mul_``). A copy
costs a pass over the weight, the forward it saves one per sample: below ``_COPY_ROWS`` samples
a weight of more than ``_COPY_NUMEL`` elements is kept as it is, not copied, and the chain runs
its own forward, which must give the recorded output (``Chain.agrees``). (One thread, 2→W³→1
tanh, a full Hessian: copies and values against own forward 8.0 against 3.7 ms at W=1024 and
one sample, 12.6 against 8.9 at 16 samples, 21.7 against 23.3 at 64; 2.7 against 1.8 at W=512
and one sample, 5.3 against 5.8 at 32; at W=256, 1.7 against 1.7 at one sample, 2.8 against
3.4 at 16.)

``sequential_chain`` reads the same steps from an ``nn.Sequential``'s layers, without a call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from torchjac._engine.core.call_args import tensors_in
from torchjac._engine.core.module_proof import (
    DROPOUTS,
    as_torch_calls,
    inactive_dropout,
    layer_params_like,
    plain_chain,
    plain_float,
)
from torchjac._engine.core.structure import reachable
from torchjac._engine.taylor.taylor_activations import MODULES

__all__ = [
    "Act",
    "Chain",
    "Linear",
    "Scale",
    "Shift",
    "Values",
    "recorded_chain",
    "sequential_chain",
]


@dataclass(frozen=True)
class Linear:
    w: Tensor  # [n_out, n_in], never written
    b: Tensor | None


@dataclass(frozen=True)
class Scale:
    s: Tensor  # [] or [n]: ``h * s``


@dataclass(frozen=True)
class Shift:
    c: Tensor  # [] or [n]: ``h + c``


@dataclass(frozen=True)
class Act:
    name: str  # a key of ACTIVATIONS
    kwargs: tuple[tuple[str, Any], ...] = ()


Step = Linear | Scale | Shift | Act


@dataclass(frozen=True)
class Values:
    """NOTE [recorded values]: each activation's ``(input, output)`` in order, and the last map's
    output, as the recorded call computed them (detached, shaped as the call had them)."""

    acts: tuple[tuple[Tensor, Tensor], ...]
    last: Tensor


@dataclass(frozen=True)
class Chain:
    """The steps, the last map's width, and the output: ``h[:, rows]`` shaped ``out_shape``
    (``rows`` ``None``: all of ``h``, as it is)."""

    steps: tuple[Step, ...]
    width: int
    rows: Tensor | None
    out_shape: tuple[int, ...]
    expected: Tensor | None = None  # the recorded output, which the chain's value must equal
    values: Values | None = None  # NOTE [recorded values]

    def agrees(self, value: Tensor) -> bool:
        """The chain's value is the recorded one (a write that no version counter saw, such
        as one through ``.data`` between a step and the end, would make them differ)."""
        if self.expected is None:
            return True
        ref = self.expected
        tol = 64 * torch.finfo(ref.dtype).eps
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        return bool(torch.allclose(value, ref, rtol=tol, atol=tol * scale))

    @property
    def n_rows(self) -> int:
        return self.width if self.rows is None else self.rows.numel()


def sequential_chain(model: Any, x: Tensor, batched: bool) -> Chain | None:
    """The steps of a plain ``nn.Sequential`` of Linear layers and listed activations."""
    if not isinstance(model, nn.Sequential):
        return None
    layers = plain_chain(model)
    if layers is None:
        return None
    steps: list[Step] = []
    width = x.shape[-1]
    for layer in layers:
        if type(layer) is nn.Identity or (type(layer) in DROPOUTS and inactive_dropout(layer)):
            continue
        if type(layer) is nn.Linear:
            w, b = layer.weight, layer.bias
            if not layer_params_like(x, w, b) or w.dim() != 2 or w.shape[1] != width:
                return None
            steps.append(Linear(w, b))
            width = w.shape[0]
        elif type(layer) in MODULES:
            name, keys = MODULES[type(layer)]
            steps.append(Act(name, tuple((k, getattr(layer, k)) for k in keys)))
        else:
            return None
    shape = (x.shape[0], width) if batched else (width,)
    return _checked(Chain(tuple(steps), width, None, shape))


def _checked(chain: Chain) -> Chain | None:
    """Chains of at least one linear map, with activations whose rule covers their arguments
    (GELU's tanh approximation has no closed form)."""
    if not any(isinstance(s, Linear) for s in chain.steps):
        return None
    for s in chain.steps:
        if isinstance(s, Act) and dict(s.kwargs).get("approximate", "none") != "none":
            return None
    return chain


def recorded_chain(call: Callable[[Tensor], Any], x: Tensor, batched: bool) -> Chain | None:
    """NOTE [chain from operations] for ``call(x)``: ``x`` is ``[B, D]`` or unbatched ``[D]``."""
    if not as_torch_calls():  # a mode of the user's sees the model's own ops
        return None
    seed = x.detach().clone().requires_grad_(True)
    rec = _Recorder(seed)
    try:
        with torch.enable_grad(), rec:
            out = call(seed)
    except Exception:  # _Declined, or func's own error: the general path runs (and raises it)
        return None
    if rec.declined or out is not rec.end or not isinstance(out, Tensor):
        return None
    if any(t._version != v for t, v in rec.operands):
        return None  # written in place after its step (the steps hold copies; an odd forward)
    consts = [t for t, _ in rec.operands if t.requires_grad]
    if consts and any(reachable(consts, [seed])):
        return None
    width = rec.width
    if not plain_float(out) or (batched and x.shape[0] == 0):
        return None
    if rec.tail:
        rows = _selection(rec.tail, x.shape[0] if batched else None, width, tuple(out.shape))
        if rows is None:
            return None
        whole = rows.numel() == width and bool((rows == torch.arange(width)).all())
        picked = None if whole else rows.to(x.device)
    else:  # the last map's output, as it is
        picked = None
    steps = _merged(rec.steps)
    return _checked(Chain(steps, width, picked, tuple(out.shape), out.detach(), rec.values()))


def _merged(steps: list[Step]) -> tuple[Step, ...]:
    """A shift right after a linear map without bias is its bias (``x @ W.T + b`` is one
    ``F.linear``, and NOTE [fused tanh] sees the activation right after it)."""
    out: list[Step] = []
    for step in steps:
        last = out[-1] if out else None
        if isinstance(step, Shift) and isinstance(last, Linear) and last.b is None:
            n = last.w.shape[0]
            bias = step.c.detach().expand(n).clone(memory_format=torch.contiguous_format)
            out[-1] = Linear(last.w, bias)
        else:
            out.append(step)
    return tuple(out)


def _copied(step: Step) -> Step:
    """The step with copies of the tensors it read (NOTE [recorded values])."""
    if isinstance(step, Linear):
        b = None if step.b is None else step.b.detach().clone()
        return Linear(step.w.detach().clone(), b)
    if isinstance(step, Scale):
        return Scale(step.s.detach().clone())
    if isinstance(step, Shift):
        return Shift(step.c.detach().clone())
    return step


def _operands(step: Step) -> tuple[Tensor, ...]:
    if isinstance(step, Linear):
        return (step.w,) if step.b is None else (step.w, step.b)
    if isinstance(step, Scale):
        return (step.s,)
    if isinstance(step, Shift):
        return (step.c,)
    return ()


# NOTE [recorded values]: samples from which every operand is copied, and the size up to which
# an operand is copied whatever the number of samples
_COPY_ROWS = 32
_COPY_NUMEL = 1 << 16


class _Declined(Exception):
    """Not a chain: the recording stops here."""


_T = Tensor
_META = {_T.dim, _T.size, _T.numel, _T.__len__, _T.is_floating_point}
_META_PROPS = {_T.shape, _T.dtype, _T.device, _T.ndim, _T.is_cuda, _T.requires_grad, _T.layout}
_LINEAR = {F.linear}
_MATMUL = {torch.matmul, _T.matmul, _T.__matmul__}
_ADD = {torch.add, _T.add, _T.__add__, _T.__radd__}
_SUB = {torch.sub, _T.sub, _T.__sub__}
_MUL = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__}
_DIV = {torch.div, _T.div, _T.__truediv__}
_NEG = {torch.neg, _T.neg, _T.__neg__}
_ADDMM = {torch.addmm, _T.addmm}
_NOOP = {_T.contiguous}
TAIL = {
    _T.__getitem__, _T.squeeze, torch.squeeze, _T.unsqueeze, torch.unsqueeze, _T.reshape,
    torch.reshape, _T.view, _T.flatten, torch.flatten, _T.select, torch.select, _T.narrow,
    torch.narrow,
}  # fmt: skip
_ACTS: dict[Any, str] = {}
for _name in ("tanh", "sigmoid", "relu", "sin", "cos", "exp"):
    for _owner in (torch, _T, F):
        if hasattr(_owner, _name):
            _ACTS[getattr(_owner, _name)] = _name
    if hasattr(_T, _name + "_"):
        _ACTS[getattr(_T, _name + "_")] = _name
_ACTS.update({F.silu: "silu", F.gelu: "gelu", F.softplus: "softplus", torch.relu_: "relu"})
_ACT_KEYS = {"gelu": ("approximate",), "softplus": ("beta", "threshold")}


class _Recorder(TorchFunctionMode):
    """Follows the chain's end through the calls of NOTE [chain from operations]."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.end = x
        self.keep = [x]  # every tensor that ever was the end, alive (ids stay unique)
        self.steps: list[Step] = []
        self.tail: list[tuple[Any, tuple, dict]] = []
        self.width = x.shape[-1]
        self.operands: list[tuple[Tensor, int]] = []  # the steps' own, and versions as they ran
        self.acts: list[tuple[Tensor, Tensor]] = []  # NOTE [recorded values]
        self.last, self.last_version = x, x._version
        self.kept: list[tuple[Tensor, int]] = []  # the values, and their versions when kept
        self.overwritten = False  # an activation in place: its input is gone
        self.copy_all = x.dim() == 2 and x.shape[0] >= _COPY_ROWS
        self.referenced = False  # a step holds an operand itself, not a copy
        self.declined = False

    def values(self) -> Values | None:
        """NOTE [recorded values], or ``None`` where one was written after it was kept."""
        kept = [*self.kept, (self.last, self.last_version)]
        if self.referenced or self.overwritten or any(t._version != v for t, v in kept):
            return None
        return Values(tuple((a.detach(), b.detach()) for a, b in self.acts), self.last.detach())

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.declined:
            return func(*args, **kwargs)
        flat = tensors_in((*args, *kwargs.values()))
        derived = [a for a in flat if any(a is k for k in self.keep)]
        if not derived or func in _META or getattr(func, "__self__", None) in _META_PROPS:
            return func(*args, **kwargs)
        if not torch.is_grad_enabled() or any(a is not self.end for a in derived):
            return self._decline()
        if len([a for a in flat if a is self.end]) != 1:
            return self._decline()
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor) or not self._follow(func, args, kwargs, out):
            return self._decline()
        self.end = out
        self.keep.append(out)
        return out

    def _decline(self) -> Any:
        self.declined = True
        raise _Declined

    def _follow(self, func: Any, args: tuple, kwargs: dict, out: Tensor) -> bool:
        """Record the call as a step, a no-op or a selection; ``False`` if it is none of them."""
        if self.tail or func in TAIL:  # a selection ends the chain (a same-shaped one may
            if func not in TAIL or not args or args[0] is not self.end:  # permute: never
                return False  # taken for a no-op)
            self.tail.append((func, args, kwargs))
            return True
        if out.shape != self.end.shape and func not in _LINEAR | _MATMUL | _ADDMM:
            return False
        step = self._step(func, args, kwargs, out)
        if step is None:
            if func in _NOOP or _inactive_dropout(func, args, kwargs):
                self.last, self.last_version = out, out._version
                return True
            return False
        if isinstance(step, Linear):
            self.width = step.w.shape[0]
        if isinstance(step, Act):
            self.acts.append((self.end, out))
            self.kept += [(self.end, self.end._version), (out, out._version)]
            self.overwritten |= out is self.end
        operands = _operands(step)
        self.operands.extend((t, t._version) for t in operands)
        if self.copy_all or all(t.numel() <= _COPY_NUMEL for t in operands):
            step = _copied(step)
        else:  # the chain's own forward then checks it (NOTE [recorded values])
            self.referenced = True
        self.steps.append(step)
        self.last, self.last_version = out, out._version
        return True

    def _step(self, func: Any, args: tuple, kwargs: dict, out: Tensor) -> Step | None:
        end = self.end
        others = [a for a in args if a is not end]
        if func in _ACTS:
            name = _ACTS[func]
            keys = _ACT_KEYS.get(name, ())
            params = dict(zip(keys, args[1:]))
            params.update({k: v for k, v in kwargs.items() if k in keys})
            if set(kwargs) - {*keys, "inplace"} or args[0] is not end:
                return None
            return Act(name, tuple(params.items()))
        if func in _LINEAR and args and args[0] is end:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            return self._linear(w, b)
        if func in _MATMUL and len(args) == 2 and args[0] is end and not kwargs:
            c = args[1]
            return self._linear(c.t(), None) if isinstance(c, Tensor) and c.dim() == 2 else None
        if func in _ADDMM and len(args) == 3 and args[1] is end and not kwargs:
            b, c = args[0], args[2]  # addmm(b, h, W.T) is F.linear(h, W, b), default scales
            if isinstance(c, Tensor) and c.dim() == 2:
                return self._linear(c.t(), b)
            return None
        if func in _NEG and len(args) == 1 and not kwargs:
            return Scale(torch.tensor(-1.0, dtype=end.dtype, device=end.device))
        if kwargs or len(others) != 1:
            return None
        c = self._constant(others[0])
        if c is None:
            return None
        if func in _ADD:
            return Shift(c)
        if func in _MUL:
            return Scale(c)
        if func in _SUB and args[0] is end:
            return Shift(-c)
        if func in _DIV and args[0] is end:
            return Scale(1 / c)
        return None

    def _linear(self, w: Any, b: Any) -> Linear | None:
        end = self.end
        if not isinstance(w, Tensor) or w.dim() != 2 or w.shape[1] != self.width:
            return None
        if b is not None and not isinstance(b, Tensor):
            return None
        if not layer_params_like(end, w, b) or end.dim() not in (1, 2):
            return None
        return Linear(w, b)

    def _constant(self, c: Any) -> Tensor | None:
        """A scale or shift that broadcasts over the last dim without changing the shape."""
        end = self.end
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return torch.tensor(float(c), dtype=end.dtype, device=end.device)
        if not isinstance(c, Tensor) or not plain_float(c) or c.dtype != end.dtype:
            return None
        if c.device != end.device or c.dim() > end.dim() or c.numel() not in (1, self.width):
            return None
        if c.numel() == self.width and (c.dim() == 0 or c.shape[-1] != self.width):
            return None
        return c.reshape(()) if c.numel() == 1 and self.width != 1 else c.reshape(-1)


def _inactive_dropout(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is not F.dropout:
        return False
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", True)
    return not training or p == 0


def _selection(
    tail: list[tuple[Any, tuple, dict]], batch: int | None, width: int, shape: tuple[int, ...]
) -> Tensor | None:
    """The elements of the last map's output each sample's output selects, in order; ``None``
    where a sample's output reads another sample or the samples select differently."""
    n = 1 if batch is None else batch
    idx: Tensor = torch.arange(n * width).reshape(n, width)
    if batch is None:
        idx = idx[0]
    for func, args, kwargs in tail:  # each recorded with the chain's end as args[0]
        try:
            idx = func(idx, *args[1:], **kwargs)
        except (RuntimeError, IndexError, TypeError, ValueError):
            return None
        if not isinstance(idx, Tensor):
            return None
    if tuple(idx.shape) != shape or (batch is not None and (idx.dim() == 0 or len(idx) != batch)):
        return None
    per = idx.reshape(n, -1) if batch is not None else idx.reshape(1, -1)
    if batch is not None and (per.shape[0] != batch or batch == 0):
        return None
    sample = torch.arange(per.shape[0]).unsqueeze(1)
    if not bool((per // width == sample).all()):
        return None
    rows = per[0] % width
    if not bool((per % width == rows).all()):
        return None
    return rows
