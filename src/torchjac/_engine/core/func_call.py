"""Calling a user's function the way the user would, and the one-warning rule of a call.

NOTE [calling convention]: ``func(inputs)`` for a Tensor or a mapping (rebuilt with the same
keys), ``func(*inputs)`` for a tuple. The result is a Tensor or a sequence of Tensors (rows
concatenated, as in ``jac``), plus an aux value when ``has_aux``.

NOTE [first call]: a one-off call pays what the engine does once per process, so it must not
pay for what it does not use. Forward mode needs torch's forward-AD decompositions, whose import
scripts a dozen functions with ``torch.jit`` (100-230 ms); they load in ``forward_jvp``, through
which every forward-mode product of the engine goes, and nowhere else. Loaded before every call
of ``func``, they made W1's first call as a module class or a lambda 136 and 142 ms against the
best peer's 26 (5.3x); loaded in ``forward_jvp``, 33-37 ms of wall and CPU time, against 32 ms
of CPU time for the best peer (1.02-1.07x). Still paid once per process: oneDNN's first use,
the agreement check of NOTE [dense kernels] included, ~4 ms, and ~0.6-1.3 ms per new product
shape: most of what puts W2's lambda form at 16 against the best peer's 10 ms of CPU time (1.6x;
0.93x by wall time). Each strategy's first call in a fresh process, after the workload's
float64 ``torch.func`` reference warmed ``torch.func`` for every strategy alike, the median of 3
processes: ``python -m benchmarks.first_call`` (figures in ``benchmarks/FIRST_CALL.md``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchjac._checks import Container, describe
from torchjac._engine.core.forward_rules import reverse_conventions
from torchjac._engine.core.func_state import CallState

__all__ = ["FuncProblem", "forward_jvp", "load_forward_ad"]


# What ``torch.jit.script`` says on each call: deprecated, a DeprecationWarning in torch 2.13 and a
# FutureWarning from 2.14 (another text on Python 3.14+); silent before 2.13.
JIT_SCRIPT_WARNING = r"`torch\.jit\.script` is"


@functools.cache
def load_forward_ad() -> None:
    """Import torch's forward-AD decompositions once, hiding the warnings their first import
    issues (one ``torch.jit.script`` per decomposition): torch's, not the user's business."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", JIT_SCRIPT_WARNING, category)
        import torch._decomp.decompositions_for_jvp  # noqa: F401


def forward_jvp(
    func: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> Any:
    """``torch.func.jvp``, torch's forward-AD decompositions loaded first (``load_forward_ad``).

    Every forward-mode product of the engine goes through here, so that a call needing none
    does not pay their import (NOTE [first call]). ``func`` runs under the derivatives reverse
    mode defines (NOTE [embedding forward rules])."""
    load_forward_ad()
    return torch.func.jvp(reverse_conventions(func), primals, tangents)


@dataclass
class FuncProblem:
    """A validated question on a function, see NOTE [calling convention]."""

    fn_name: str
    func: Callable[..., Any]
    container: Container
    inputs: tuple[Tensor, ...]
    input_names: tuple[str, ...]
    has_aux: bool
    batch_dim: int | None
    create_graph: bool
    single: bool = True  # set by the first call: the function returned one Tensor
    state: CallState | None = None  # NOTE [one draw per call], set while a public call runs
    chain: Any = None  # NOTE [chain from operations]: a Chain, False (none), None (not looked)

    @property
    def dtype(self) -> torch.dtype:
        dtype = self.inputs[0].dtype
        for t in self.inputs:
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype

    @property
    def device(self) -> torch.device:
        return self.inputs[0].device

    def call(self, *xs: Tensor) -> tuple[tuple[Tensor, ...], Any]:
        """Call the function on ``xs`` (one per input); return (output tensors, aux)."""
        return self.split(self.call_raw(*xs))

    def call_raw(self, *xs: Tensor) -> Any:
        """Call the function on ``xs`` as the user would (NOTE [calling convention])."""
        if self.state is not None:
            self.state.reset_rng()
        kind, keys = self.container
        if kind == "tensor":
            return self.func(xs[0])
        if kind == "dict":
            return self.func(dict(zip(keys, xs)))
        return self.func(*xs)

    def split(self, res: Any) -> tuple[tuple[Tensor, ...], Any]:
        """Validate a raw result; return (output tensors, aux)."""
        aux = None
        if self.has_aux:
            if not (isinstance(res, (tuple, list)) and len(res) == 2):
                raise TypeError(
                    f"{self.fn_name}: with has_aux=True, func must return a pair "
                    f"(output, aux), got {describe(res)}."
                )
            res, aux = res
        return self._outputs(res), aux

    def _outputs(self, res: Any) -> tuple[Tensor, ...]:
        fn = self.fn_name
        if isinstance(res, Tensor):
            outs: tuple[Any, ...] = (res,)
            self.single = True
        elif isinstance(res, (tuple, list)) and res:
            outs = tuple(res)
            self.single = False
        else:
            raise TypeError(
                f"{fn}: func must return a Tensor or a non-empty sequence of Tensors"
                f"{' (plus aux, with has_aux=True)' if self.has_aux else ''}, got {describe(res)}."
            )
        for i, y in enumerate(outs):
            where = "the output of func" + ("" if self.single else f"[{i}]")
            if not isinstance(y, Tensor):
                raise TypeError(f"{fn}: {where} must be a Tensor, got {describe(y)}.")
            if not y.is_floating_point():
                raise TypeError(
                    f"{fn}: {where} must have a real floating dtype, got {describe(y)}."
                )
        return outs

    def outputs_only(self, *xs: Tensor) -> tuple[Tensor, ...]:
        """The function's outputs as a tuple of Tensors (aux dropped)."""
        return self.call(*xs)[0]

    def outputs_of_copies(self, *xs: Tensor) -> tuple[Tensor, ...]:
        """:meth:`outputs_only` on copies of ``xs``: ``func`` may write into its arguments, and
        a primal of ``torch.func.jvp`` or ``vjp`` shares its storage with the user's input."""
        return self.call(*(x.clone() for x in xs))[0]
