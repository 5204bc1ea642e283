"""Custom ``torch.autograd.Function``s in the sparsity trace: their backward is their own.

NOTE [custom functions in sparsity]: the tracer sees the aten ops of a custom Function's
``forward``, but AD takes its derivative from the Function's ``backward``, which may be anything
(a straight-through estimator's identity behind a step, whose ops say "constant"): the pattern of
the forward's ops is no superset of AD's nonzeros. No dispatch or function mode sees
``Function.apply`` (nor does a hook on it see ``f = MyFunction.apply`` bound before the call), but
the autograd graph does: the trace runs with autograd on, and a tensor whose ``grad_fn`` is a
custom Function's node (a ``BackwardCFunction``) is seen as the argument of the first op that
reads or views it (of a view op, only the tensor it views is looked at), or as ``func``'s
output. Each of its elements then depends on every element
of each of the Function's differentiable inputs (``next_functions``), and the Function is
reported with the ops that forced density. An input's sets are those the tracer had when the
``forward`` read it: a ``forward`` runs with autograd off, so every tensor argument with a node
that an op reads with autograd off is remembered by its node and output number (an input the
``forward`` never passed to an op counts as all of ``x``). A leaf other than ``x`` is a constant,
an input without a node has no derivative. The forward's own sets stay too (a superset). Torch's
own Functions whose backward is their forward's derivative keep the forward's sets alone:
reentrant checkpointing, and the identity that carries a module's full backward hooks (a hook
that returns other gradients is not followed). Not ``CrossMapLRN2d``: its backward is off its
forward's derivative by 3e-4 and has nonzeros the forward's ops do not. The cost, for
``sparsity_pattern`` alone (``sparse_jacobian`` traced with autograd on already): 12-20% of its
time on W9's 64×64 Bratu residuals (1.2 against 1.4 ms), most of it autograd's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import BackwardCFunction

from torchjac._engine.sparse.index_sets import Sets
from torchjac._engine.sparse.sparsity_base import tensors

__all__ = ["CustomFunctions"]

# torch's Functions whose backward is the derivative of the ops their forward runs; a name that
# moves in a later torch is only dense (reported), never wrong
_DERIVATIVE_OF_FORWARD = frozenset(
    [
        "torch.utils.checkpoint.CheckpointFunction",
        "torch.nn.modules._functions.BackwardHookFunction",
    ]
)


class CustomFunctions:
    """Widens the sets of custom Functions' outputs (NOTE [custom functions in sparsity])."""

    def __init__(self, storages: Any, dense_ops: list[str]) -> None:
        self.storages = storages  # the tracer's ``_Storages``
        self.dense_ops = dense_ops
        self.read_off: dict[tuple[Any, int], Sets] = {}  # (node, output_nr) -> sets
        self.done: set[tuple[Any, int]] = set()

    def see(self, leaves: list[Tensor]) -> None:
        """An op's tensor arguments (before it runs), or ``func``'s output."""
        grad = torch.is_grad_enabled()
        for t in leaves:
            node = t.grad_fn
            if node is None:
                continue
            key = (node, t.output_nr)
            if not grad and key not in self.read_off:
                self.read_off[key] = self.storages.read(t)
            if isinstance(node, BackwardCFunction) and key not in self.done:
                self.done.add(key)
                self._widen(t, node)

    def see_viewed(self, args: Any, kwargs: Any) -> None:
        """A view op's arguments: with autograd on, only the tensor viewed (its first) can be a
        custom Function's output that no op read yet."""
        if not torch.is_grad_enabled():
            self.see(tensors(args) + tensors(kwargs) if kwargs else tensors(args))
            return
        t = args[0] if args else None
        if isinstance(t, Tensor) and isinstance(t.grad_fn, BackwardCFunction):
            self.see([t])

    def _widen(self, t: Tensor, node: Any) -> None:
        cls = node._forward_cls
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in _DERIVATIVE_OF_FORWARD or not t.numel():
            return
        n = self.storages.n
        parts = []
        for prev, nr in node.next_functions:
            if prev is None or hasattr(prev, "variable"):  # no derivative, or a constant leaf
                continue
            found = self.read_off.get((prev, nr))
            parts.append(Sets.identity(n) if found is None else found)
        row = Sets.union([s.dense_to(1) for s in parts], 1, n)
        if not row.live:  # its inputs are constants: no derivative through it
            return
        self.dense_ops.append(f"{name} (a custom autograd.Function)")
        rows = t.numel()
        self.storages.write(t, Sets.union([self.storages.read(t), row.dense_to(rows)], rows, n))
