"""Proving a model per sample from the operations its forward runs, during the capture forward.

NOTE [op batch proof]: the type whitelist of NOTE [sequential proof] proves only an
``nn.Sequential`` of listed modules; a module class with a functional ``forward`` (``F.relu``,
``x.flatten(1)``, a residual add, a ``ModuleList`` loop) got the coupling check, about 40% of
``ntk``'s time on a small CNN. Here the capture's forward (run anyway) runs under a
``TorchFunctionMode`` that follows the batch dimension through every op that touches a tensor
derived from the inputs, whatever module or function calls it: the inputs start with their
``batch_dim``; a rule keeps it only when the op provably maps sample ``i`` to sample ``i``:
elementwise ops and activations (a constant operand of any shape is no coupling: it carries no
derivative), ``F.linear``/``matmul``/``addmm`` that contract another dimension against a
constant, convolutions, pooling and ``group_norm``/``instance_norm`` on batched input with the
batch first, ``batch_norm`` on running statistics, ``layer_norm``/``softmax`` over other
dimensions, inactive dropout, ``embedding`` lookups, reshapes that keep the batch leading, basic
indexing that keeps the whole batch, reductions, concatenations and permutations that do not
touch it (``taylor_batch.structural_bdim``). Shapes and dtypes may be read; values may not (an
``item``, a ``bool``, ``tolist``: a branch on data), nor may anything be written into a tensor
that does not already carry the batch, nor may an input without the batch be read (it could
carry what the batch should). Any other op on such a tensor ends the proof, and so
does an autograd node the forward made that torch does not define (a custom
``autograd.Function`` or a backward hook may couple samples in its backward). The model is then
proven per sample exactly when its output carries the batch at ``batch_dim``; a missed proof
costs only the check (NOTE [coupling check]), never a wrong answer. Only where no other mode is
active (``module_proof.as_torch_calls``); the capture's own hooks run outside the proof.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from torchjac._engine.core.call_args import call_arg, tensors_in
from torchjac._engine.core.module_proof import as_torch_calls
from torchjac._engine.kernel import kernels
from torchjac._engine.taylor.taylor_batch import structural_bdim

__all__ = ["METADATA", "BatchTrace"]

_ELEMENTWISE = frozenset(
    [
        *("relu", "relu6", "gelu", "silu", "tanh", "sigmoid", "elu", "selu", "celu", "mish"),
        *("leaky_relu", "softplus", "hardtanh", "hardswish", "hardsigmoid", "logsigmoid"),
        *("tanhshrink", "softsign", "prelu", "exp", "exp2", "expm1", "log", "log1p", "log2"),
        *("log10", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh"),
        *("sqrt", "rsqrt", "square", "abs", "neg", "reciprocal", "sign", "erf", "erfc"),
        *("add", "sub", "mul", "div", "true_divide", "pow", "clamp", "clip", "where"),
        *("maximum", "minimum", "atan2", "hypot", "float", "double", "half", "to", "type_as"),
        *("contiguous", "clone", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__"),
        *("__rmul__", "__truediv__", "__rtruediv__", "__pow__", "__rpow__", "__neg__"),
        *("__iadd__", "__isub__", "__imul__", "__itruediv__", "add_", "sub_", "mul_", "div_"),
        *("relu_", "clamp_", "tanh_", "sigmoid_", "exp_", "neg_", "leaky_relu_", "elu_"),
        *("hardtanh_", "silu_", "square_", "sqrt_", "pow_", "abs_", "erf_", "requires_grad_"),
    ]
)
METADATA = frozenset(
    [
        *("size", "dim", "ndim", "numel", "__len__", "shape", "dtype", "device", "stride"),
        *("is_floating_point", "is_complex", "requires_grad", "is_contiguous", "layout"),
        *("element_size", "grad_fn", "is_leaf", "ndimension", "nelement", "is_cuda"),
    ]
)
_SPATIAL = {
    **{f"conv{k}d": k for k in (1, 2, 3)},
    **{f"conv_transpose{k}d": k for k in (1, 2, 3)},
    **{f"{p}_pool{k}d": k for p in ("max", "avg", "_max", "lp") for k in (1, 2, 3)},
    **{f"adaptive_{p}_pool{k}d": k for p in ("max", "avg") for k in (1, 2, 3)},
}
_INACTIVE = frozenset(["dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout"])


class _Dim:
    """What ``structural_bdim`` reads of a tensor: its batch dimension, rank and shape."""

    def __init__(self, bdim: int, t: Tensor) -> None:
        self.bdim, self.shape = bdim, t.shape

    def dim(self) -> int:
        return len(self.shape)


class BatchTrace(TorchFunctionMode):
    """Follows the batch dimension through one forward (NOTE [op batch proof]).

    ``with BatchTrace.of(args, batch_dim) as trace:`` run the model, then
    ``trace.proves(output)``; ``trace is None`` where no proof is attempted.
    """

    def __init__(self, seeds: list[tuple[Tensor, int]]) -> None:
        super().__init__()
        self._bdim: dict[int, int] = {}
        self._alive: list[Tensor] = []  # ids stay unique while the trace lives
        self.failed: str | None = None
        self._paused = 0
        self._foreign: set[int] = set()  # ids of inputs without the batch (never proven)
        self._size = seeds[0][0].shape[seeds[0][1]] if seeds else 0
        for t, b in seeds:
            self._mark(t, b)

    @staticmethod
    @contextlib.contextmanager
    def of(args: tuple, kwargs: dict, batch_dim: int | None) -> Iterator[BatchTrace | None]:
        """A trace seeded with every tensor argument that has the batch, or ``None``."""
        flat = tensors_in((args, kwargs))
        if batch_dim is None or not flat or not as_torch_calls():
            yield None
            return
        first = flat[0]
        if first.dim() == 0:
            yield None
            return
        size = first.shape[batch_dim % first.dim()]
        seeds = [
            (t, batch_dim % t.dim())
            for t in flat
            if t.dim() and t.shape[batch_dim % t.dim()] == size
        ]
        with BatchTrace(seeds) as trace:
            for t in flat:  # an input without the batch: the proof ends where it is read
                if id(t) not in trace._bdim:
                    trace._foreign.add(id(t))
                    trace._alive.append(t)
            yield trace

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Our own code inside the forward (the capture's hooks): not the model's ops."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def same_batch(self, old: Any, new: Any) -> None:
        """``new`` stands for ``old`` (a hook's returned output): it carries the same batch."""
        if isinstance(old, Tensor) and isinstance(new, Tensor) and id(old) in self._bdim:
            self._mark(new, self._bdim[id(old)])

    def batch_at(self, t: Tensor) -> int | None:
        """Where ``t`` carries the batch, ``-1`` where it carries none (it derives from no
        input, or only through what kept no batch), ``None`` once the proof has ended (unknown).
        """
        if self.failed is not None:
            return None
        return self._bdim.get(id(t), -1)

    def proves(self, output: Any, batch_dim: int) -> bool:
        """Whether ``output`` provably keeps samples apart at ``batch_dim``."""
        if self.failed is not None or not isinstance(output, Tensor) or output.dim() == 0:
            return False
        if self._bdim.get(id(output)) != batch_dim % output.dim():
            return False
        return kernels.graph_products([output]).builtin  # no custom Function, no hook node

    def _mark(self, t: Tensor, b: int) -> None:
        self._bdim[id(t)] = b
        self._alive.append(t)

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            self._bdim.clear()
            self._alive.clear()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused or self.failed is not None:
            return out
        given = tensors_in((*args, *kwargs.values()))
        if any(id(t) in self._foreign for t in given):
            self._fail(f"{getattr(func, '__name__', func)} reads an input without the batch")
            return out
        tracked = [t for t in given if id(t) in self._bdim]
        if not tracked:
            return out
        name = getattr(func, "__name__", "")
        if name == "__get__":  # a property: name it by its descriptor
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        outs = tensors_in((out,))
        if not outs:
            if name not in METADATA:
                self._fail(f"{name} reads values")
            return out
        if name == "detach":  # carries no derivative: a constant from here on
            return out
        b = None if "out" in kwargs else self._rule(name, args, kwargs, tracked, out)
        if b is None or any(t.dim() <= b or t.shape[b] != self._size for t in outs):
            self._fail(name)
        else:
            for t in outs:
                self._mark(t, b)
        return out

    def _rule(self, name: str, args: tuple, kwargs: dict, tracked: list[Tensor], out: Any) -> Any:
        bd = self._bdim
        first = args[0] if args else None
        x = first if isinstance(first, Tensor) and id(first) in bd else None
        in_place = (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")
        if in_place and x is None:  # a write into a tensor without the batch
            return None
        if not isinstance(out, Tensor):
            if name in ("split", "chunk", "unbind") and x is not None and len(tracked) == 1:
                return self._structural(name, args, kwargs, x, out)
            return None
        nd = out.dim()
        if name in _ELEMENTWISE:
            agreed = {bd[id(t)] + nd - t.dim() for t in tracked}
            return agreed.pop() if len(agreed) == 1 else None
        if name == "addmm" and len(args) == 3 and len(tracked) == 1 and tracked[0] is args[1]:
            return 0 if bd[id(args[1])] == 0 and isinstance(args[2], Tensor) else None
        if x is None:
            return None
        b = bd[id(x)]
        if len(tracked) != 1:  # below: one operand carries the batch, the rest are constants
            return self._both_matmul(name, args, tracked, out)
        if name in ("linear", "matmul", "__matmul__", "mm"):
            w = call_arg(args, kwargs, 1, "weight")
            if not isinstance(w, Tensor) or w.dim() != 2 or x.dim() < 2 or b >= x.dim() - 1:
                return None
            return b + nd - x.dim()
        if name in _SPATIAL:
            k = _SPATIAL[name]
            return 0 if b == 0 and x.dim() == k + 2 else None
        if name in ("batch_norm", "instance_norm", "group_norm"):
            if b != 0 or x.dim() < 2:
                return None
            if name == "batch_norm":
                stats = call_arg(args, kwargs, 1, "running_mean") is not None
                return 0 if stats and not call_arg(args, kwargs, 5, "training", False) else None
            return 0
        if name == "layer_norm":
            shape = call_arg(args, kwargs, 1, "normalized_shape", ())
            return b if b < x.dim() - len(shape) else None
        if name in ("softmax", "log_softmax"):
            d = call_arg(args, kwargs, 1, "dim")
            return b if isinstance(d, int) and d % x.dim() != b else None
        if name in _INACTIVE:
            p = call_arg(args, kwargs, 1, "p", 0.5)
            return b if p == 0 or not call_arg(args, kwargs, 2, "training", True) else None
        if name == "embedding":
            return b
        if name == "squeeze":
            given = call_arg(args, kwargs, 1, "dim")
            dims: set[int] | None = None
            if given is not None:
                dims = {d % x.dim() for d in _ints(given)}
            if x.shape[b] == 1 or (dims is not None and b in dims):
                return None
            return b - sum(x.shape[i] == 1 and (dims is None or i in dims) for i in range(b))
        if name in ("expand", "expand_as", "broadcast_to"):
            return b + nd - x.dim()  # new dims lead; the batch keeps its size (checked)
        if name == "__getitem__" and len(args) == 2:
            return _index_bdim(args[1], b, x.dim())
        if name == "flatten" and b == 0:
            return 0 if out.dim() and out.shape[0] == x.shape[0] else None
        return self._structural(name, args, kwargs, x, out)

    def _structural(self, name: str, args: tuple, kwargs: dict, x: Tensor, out: Any) -> Any:
        proxy = _Dim(self._bdim[id(x)], x)
        return structural_bdim(name, (proxy, *args[1:]), kwargs, [proxy], out)

    def _both_matmul(self, name: str, args: tuple, tracked: list[Tensor], out: Tensor) -> Any:
        """``q @ kᵀ`` within each sample: both batched at the same leading dim, same rank."""
        if name not in ("matmul", "__matmul__", "bmm") or len(args) < 2:
            return None
        a, c = args[0], args[1]
        if not all(isinstance(t, Tensor) and id(t) in self._bdim for t in (a, c)):
            return None
        b = self._bdim[id(a)]
        same = a.dim() == c.dim() == out.dim() and self._bdim[id(c)] == b
        return b if same and b < a.dim() - 2 else None


def _index_bdim(index: Any, b: int, ndim: int) -> int | None:
    """Where basic indexing (ints, slices, ``None``, ``...``) puts dimension ``b``; ``None``
    when it selects from it or the index is advanced (a slice that drops samples fails the
    trace's size check)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(
        not (i is None or i is Ellipsis or isinstance(i, slice) or type(i) is int) for i in items
    ):
        return None
    if sum(i is Ellipsis for i in items) > 1:
        return None
    used = sum(isinstance(i, (slice, int)) for i in items)
    where, inp, out = None, 0, 0
    for i in items:
        if i is Ellipsis:
            span = ndim - used
            if inp <= b < inp + span:
                where = out + b - inp
            inp, out = inp + span, out + span
        elif i is None:
            out += 1
        elif isinstance(i, slice):
            where = out if inp == b else where
            inp, out = inp + 1, out + 1
        else:  # an int selects one element of its dimension
            if inp == b:
                return None
            inp += 1
    return where if where is not None else out + b - inp if b >= inp else None


def _ints(d: Any) -> tuple[int, ...]:
    return tuple(d) if isinstance(d, (tuple, list)) else (d,)
