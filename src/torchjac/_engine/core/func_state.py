"""What a call on a function leaves as it found: the random draw, and the modules' buffers.

NOTE [one draw per call]: ``jacobian``, ``hessian``, ``hessian_diagonal`` and ``laplacian`` may
evaluate ``func`` several times (a counting pass, the Taylor mode, a coupling check, a loop of
probes), and a vectorised evaluation draws once for all of its probes (``vmap(...,
randomness="same")``). Every evaluation starts from the global RNG state the call found (CPU,
and every CUDA device in use), so a function that draws (dropout in train mode) is
differentiated for one realisation: the one a plain call ``func(inputs)`` would have drawn right
then. When the call returns, on success or error, the RNG state is what it was before it.

NOTE [module state]: a function may update buffers of the modules it runs (BatchNorm's running
statistics and ``num_batches_tracked`` in train mode), once per evaluation. The modules it can
reach are found from the callable itself: a module, a bound method's owner, a
``functools.partial``'s function and arguments, a closure's cells, defaults and the globals its
code names (lambdas and nested functions followed), and the modules held by a plain object's
attributes. Their buffers are copied before the call, and every buffer whose values changed is
written back bitwise when the call returns, on success and on error (compared by value: a write
under a functorch transform need not move the buffer's version counter). A module the function
reaches only through a container it builds at run time is not seen.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CallState", "call_state", "reachable_modules"]

_MAX_DEPTH = 4  # nested functions, partials and holders followed from ``func``


class CallState:
    """The RNG state a call found, and copies of the buffers its function may write."""

    def __init__(self, func: Any, tensors: tuple[Tensor, ...]) -> None:
        cuda = {t.device.index or 0 for t in tensors if t.device.type == "cuda"}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda.update(range(torch.cuda.device_count()))
        self._cuda = sorted(cuda)
        self._cpu_rng = torch.get_rng_state()
        self._cuda_rng = [torch.cuda.get_rng_state(d) for d in self._cuda]
        seen: set[int] = set()
        self._buffers: list[tuple[Tensor, Tensor]] = []
        modules = reachable_modules(func)
        # whether func reaches a parameter: a model, worth NOTE [chain from operations]
        self.runs_a_model = any(next(m.parameters(False), None) is not None for m in modules)
        for module in modules:
            for buf in module.buffers():
                if id(buf) not in seen:
                    seen.add(id(buf))
                    self._buffers.append((buf, buf.detach().clone()))

    def reset_rng(self) -> None:
        """Every evaluation draws from the state the call found (NOTE [one draw per call])."""
        torch.set_rng_state(self._cpu_rng)
        for d, state in zip(self._cuda, self._cuda_rng):
            torch.cuda.set_rng_state(state, d)

    def restore(self) -> None:
        """The RNG state, and every buffer an evaluation wrote into, as the call found them."""
        self.reset_rng()
        with torch.no_grad():
            for buf, saved in self._buffers:
                # through .data: a graph that saved the buffer (a create_graph result through
                # BatchNorm in train mode) would refuse a moved version counter; train-mode
                # backward formulas do not read the running statistics
                if not torch.equal(buf, saved):
                    buf.data.copy_(saved)


@contextmanager
def call_state(func: Any, tensors: tuple[Tensor, ...]) -> Iterator[CallState]:
    """NOTE [one draw per call] and NOTE [module state] around one public call."""
    state = CallState(func, tensors)
    try:
        yield state
    finally:
        state.restore()


def reachable_modules(func: Any) -> list[nn.Module]:
    """The modules ``func`` can reach (NOTE [module state]), each with its submodules once."""
    found: dict[int, nn.Module] = {}
    _visit(func, found, set(), 0)
    return list(found.values())


def _visit(obj: Any, found: dict[int, nn.Module], seen: set[int], depth: int) -> None:
    if id(obj) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        for m in obj.modules():
            found.setdefault(id(m), m)
        return
    if isinstance(obj, (str, bytes, int, float, bool, Tensor, type)) or obj is None:
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _visit(item, found, seen, depth + 1)
        return
    if isinstance(obj, dict):
        for item in obj.values():
            _visit(item, found, seen, depth + 1)
        return
    if isinstance(obj, types.MethodType):
        _visit(obj.__self__, found, seen, depth)
        _visit(obj.__func__, found, seen, depth)
        return
    if isinstance(obj, functools.partial):
        for item in (obj.func, obj.args, obj.keywords):
            _visit(item, found, seen, depth + 1)
        return
    if isinstance(obj, types.FunctionType):
        _visit_function(obj, found, seen, depth)
        return
    if isinstance(obj, types.ModuleType):
        return
    holder = getattr(obj, "__dict__", None)  # a callable object holding modules
    if isinstance(holder, dict):
        for item in holder.values():
            _visit(item, found, seen, depth + 1)


def _visit_function(
    fn: types.FunctionType, found: dict[int, nn.Module], seen: set[int], depth: int
) -> None:
    for cell in fn.__closure__ or ():
        try:
            _visit(cell.cell_contents, found, seen, depth + 1)
        except ValueError:  # an empty cell
            continue
    _visit(fn.__defaults__, found, seen, depth + 1)
    _visit(fn.__kwdefaults__, found, seen, depth + 1)
    for name in _global_names(fn.__code__):
        if name in fn.__globals__:
            _visit(fn.__globals__[name], found, seen, depth + 1)


def _global_names(code: types.CodeType) -> Iterator[str]:
    """The names ``code`` and the code objects nested in it may read as globals."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)
