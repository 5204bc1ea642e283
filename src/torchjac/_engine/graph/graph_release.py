"""Freeing the graph of ``outputs`` when ``retain_graph=False``, whatever the plan ran.

NOTE [retain_graph]: ``retain_graph=False`` (the default unless ``create_graph``, as in
``torch.autograd.grad``) frees the graph by the time the call returns, so that behaviour never
depends on the plan, and so never on ``chunk_size`` or on the free memory the default
``max_memory`` reads. The probes themselves always keep the graph: a vectorised pass that fails
is retried as a loop (NOTE [fallback]), columns fall back to rows, a Gramian solves its input
groups one after the other, and all of them need it. One release pass then frees exactly what
``torch.autograd.grad(outputs, inputs)`` frees: every node on a path from the outputs to the
inputs. It is a backward pass whose cotangent is undefined (a root node that returns ``None``):
each node still runs, and autograd frees its saved tensors after it, but torch's generated
backward formulas compute nothing without a defined gradient, so it costs a graph walk rather
than a backward pass (0.5 ms against 65 ms for one backward of an 8-layer MLP of width 512 on a
batch of 256). A gradient that stays undefined never reaches the ``.grad`` of a ``retain_grad()``
tensor, and a tensor hook on the path receives ``None``, as torch passes it when a custom
``Function`` returns ``None`` for an input. Should something on the path reject ``None`` (a hook
written for tensors only), the pass is repeated with zero cotangents, which costs a backward.

NOTE [retain_grad]: autograd writes the gradient of every backward pass into the ``.grad`` of a
``retain_grad()`` tensor on the path (``torch.autograd.grad`` included), through a hook on the
tensor's node that torch offers no way to see or to suspend. The probes' passes would leave there
what no user asked for: the sum of the probed rows (a loop), a ``BatchedTensor`` of a finished
``vmap`` (a vectorised pass), or a tensor whose ``grad_fn`` belongs to torchjac's dummy cotangents
(columns by double backward). A Jacobian has no single cotangent whose gradient could stand there,
so the outputs and inputs, which the call holds, get their ``.grad`` back as it was (the same
object, or ``None``); meanwhile it is cleared before each probe pass, so that a pass never adds its
gradient to an earlier pass's (a ``vmap`` of another size), and the release pass adds nothing (its
gradient is undefined; its repetition with zeros, when a hook rejects ``None``, clears it too: it
would add to a finished ``vmap``'s gradient). A ``retain_grad()`` tensor strictly inside the graph
cannot be reached from the call: it receives what torch writes during the probes, as with
``autograd.grad(..., is_grads_batched=True)``; a second vectorised pass then fails inside torch
when its hook adds to the first pass's ``BatchedTensor``, and the error says to probe with a loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["keep_retained_grads", "release_graph", "retained_batch_hint"]

_ESCAPED = "escaped from inside a function being vmapped"


class _UndefinedRoot(torch.autograd.Function):
    """A scalar on top of the outputs whose backward sends them undefined gradients."""

    @staticmethod
    def forward(ctx: Any, *outputs: Tensor) -> Tensor:
        ctx.n_outputs = len(outputs)
        return outputs[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, *_: Tensor) -> tuple[None, ...]:
        return (None,) * ctx.n_outputs


def release_graph(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], retained: Sequence[Tensor] = ()
) -> None:
    """Free the nodes on the paths from ``outputs`` to ``inputs`` (NOTE [retain_graph]);
    ``retained``: the call's ``retain_grad()`` outputs and inputs (NOTE [retain_grad])."""
    outs = [y for y in outputs if y.requires_grad]
    ins = [x for x in inputs if x.requires_grad]
    if not outs or not ins:
        return  # no path: torch.autograd.grad would free nothing either
    try:
        with torch.enable_grad():
            root = _UndefinedRoot.apply(*outs)
            torch.autograd.grad(root, ins, allow_unused=True)
    except Exception:  # something on the path rejects None (a hook, a custom backward)
        for t in retained:  # NOTE [retain_grad]: the zeros' pass adds to no probe's gradient
            t.grad = None
        _release_with_zeros(outs, ins)


def _release_with_zeros(outs: list[Tensor], ins: list[Tensor]) -> None:
    """The release pass again, with zero cotangents (a full backward pass), output by output.

    The first attempt freed the nodes it ran before the one that failed; a pass that meets
    such a node stops there with torch's "backward through the graph a second time", which is
    what a later ``backward`` of the outputs will meet too.
    """
    for y in outs:
        zero = torch.zeros((), dtype=y.dtype, device=y.device).expand(y.shape)
        try:
            torch.autograd.grad(y, ins, zero, allow_unused=True)
        except RuntimeError as err:
            if "a second time" not in str(err):
                raise


@contextlib.contextmanager
def keep_retained_grads(tensors: Sequence[Tensor]) -> Iterator[None]:
    """Give ``tensors`` (``retain_grad()`` ones) their ``.grad`` back on exit, on success and on
    error (NOTE [retain_grad])."""
    kept = [(t, t.grad) for t in tensors]
    try:
        yield
    finally:
        for t, grad in reversed(kept):
            t.grad = grad


@contextlib.contextmanager
def retained_batch_hint(fn_name: str) -> Iterator[None]:
    """Name the fix when a pass meets a gradient a ``vmap`` left behind (NOTE [retain_grad])."""
    try:
        yield
    except RuntimeError as err:
        if _ESCAPED not in str(err) or str(err).startswith(f"{fn_name}: "):
            raise
        raise RuntimeError(
            f"{fn_name}: a retain_grad() tensor (or a hook keeping gradients) inside the graph "
            "holds the gradient of a vectorised pass, which torch cannot add to the next pass's. "
            "Set its .grad to None and pass chunk_size=1 to probe with a loop, or call "
            f"retain_grad() after this call. ({err})"
        ) from err
