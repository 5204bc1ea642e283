"""Registry of ``tj.jac`` problems with their float64 oracles (``torch.func.jacrev``).

Each case builds, from a seeded generator, the tensors a user would hold (``outputs`` already on
the graph, ``inputs`` in the user's container) and the expected result in the public layout
(rows, then columns; the container of ``inputs``). The oracle recomputes the function from
detached copies with ``torch.func.jacrev``, independent of the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from conftest import randn
from torch import Tensor
from torch.func import jacrev

Built = tuple[Any, Any, Any]  # (outputs, inputs, expected)


class SavedSin(torch.autograd.Function):
    """``sin`` saving its input; subclasses give the backward under test."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.sin()


class ItemSin(SavedSin):
    """``sin`` whose backward calls ``.item()`` (data-dependent control flow): no vmap.

    Shared by the fallback tests of every front door.
    """

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        if g.abs().sum().item() == 0:
            return torch.zeros_like(g)
        return g * x.cos()


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[torch.Generator], Built]
    kwargs: dict[str, Any] = field(default_factory=dict)
    batch_dim: int | None = None  # the samples are independent at this dim (for batch tests)


def oracle(fn: Callable[..., Any], args: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Jacobian of ``fn(*args)`` w.r.t. each arg in the public layout of ``tj.jac``.

    ``fn`` returns a Tensor (result ``y.shape + x.shape``) or a tuple (rows concatenated:
    ``[m] + x.shape``).
    """
    plain = [a.detach() for a in args]
    argnums = tuple(range(len(args)))
    jacs = jacrev(fn, argnums=argnums)(*plain)
    if isinstance(jacs[0], Tensor):  # one output
        return tuple(jacs)
    outs = fn(*plain)
    return tuple(
        torch.cat([jacs[i][j].reshape(y.numel(), *args[j].shape) for i, y in enumerate(outs)])
        for j in range(len(args))
    )


def _mlp(g: torch.Generator) -> Built:
    x, w1, b1, w2 = randn(4, 3, gen=g), randn(5, 3, gen=g), randn(5, gen=g), randn(2, 5, gen=g)
    params = [w1.requires_grad_(), b1.requires_grad_(), w2.requires_grad_()]

    def f(w1: Tensor, b1: Tensor, w2: Tensor) -> Tensor:
        return torch.tanh(x @ w1.T + b1) @ w2.T

    return f(*params), params, oracle(f, params)


def _conv(g: torch.Generator) -> Built:
    x, w = randn(2, 1, 4, 4, gen=g, grad=True), randn(2, 1, 3, 3, gen=g, grad=True)

    def f(w: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(F.conv2d(x, w, padding=1)).mean(dim=(2, 3))

    return f(w, x), [w, x], oracle(f, [w, x])


def _conv_per_sample(g: torch.Generator) -> Built:
    x, w = randn(2, 1, 4, 4, gen=g, grad=True), randn(2, 1, 3, 3, gen=g)

    def f(x: Tensor) -> Tensor:
        return torch.tanh(F.conv2d(x, w, padding=1))[:, :, 1:3, ::2]

    return f(x), x, oracle(f, [x])[0]


def _tied(g: torch.Generator) -> Built:
    a = randn(3, gen=g, grad=True)

    def f(a: Tensor) -> Tensor:
        return a * a + torch.sin(a).cumsum(0)

    (j,) = oracle(f, [a])
    return f(a), [a, a], (j, j)


def _unused(g: torch.Generator) -> Built:
    a, b = randn(3, gen=g, grad=True), randn(2, 2, gen=g, grad=True)

    def f(a: Tensor) -> Tensor:
        return torch.stack([a.prod(), (a**3).sum()])

    (j,) = oracle(f, [a])
    return f(a), [a, b], (j, torch.zeros(2, 2, 2, dtype=b.dtype))


def _nothing_used(g: torch.Generator) -> Built:
    a, c = randn(2, gen=g, grad=True), randn(3, gen=g, grad=True)
    return c.exp(), [a], (torch.zeros(3, 2, dtype=a.dtype),)


def _tied_outputs(g: torch.Generator) -> Built:
    x = randn(3, gen=g, grad=True)

    def f(x: Tensor) -> tuple[Tensor, Tensor]:
        y = x.sin() * x.sum()
        return y, y  # the same tensor twice: its rows twice

    y, _ = f(x)
    return [y, y], [x], oracle(f, [x])


def _views(g: torch.Generator) -> Built:
    leaf, w = randn(4, 3, gen=g, grad=True), randn(4, 2, gen=g)
    h = leaf.t()  # a non-contiguous view as the input

    def f(h: Tensor) -> Tensor:
        return torch.tanh(h @ w).t()[::2]  # a non-contiguous output

    return f(h), h, oracle(f, [h])[0]


def _empty_batch(g: torch.Generator) -> Built:
    x = randn(0, 3, gen=g, grad=True)

    def f(x: Tensor) -> Tensor:
        return torch.tanh(x) * 2

    return f(x), x, oracle(f, [x])[0]


def _scalar(g: torch.Generator) -> Built:
    x = randn(2, 3, gen=g, grad=True)

    def f(x: Tensor) -> Tensor:
        return (x.sin() * x).sum()

    return f(x), x, oracle(f, [x])[0]


def _scalar_of_scalar(g: torch.Generator) -> Built:
    x = randn(gen=g, grad=True)  # 0-d input and 0-d output: a 0-d Jacobian

    def f(x: Tensor) -> Tensor:
        return x.sin() * x**2

    return f(x), x, oracle(f, [x])[0]


def _one_element(g: torch.Generator) -> Built:
    x = randn(3, gen=g, grad=True)

    def f(x: Tensor) -> Tensor:
        return x.exp().sum().reshape(1)

    return f(x), x, oracle(f, [x])[0]


def _sequence_outputs(g: torch.Generator) -> Built:
    x, w = randn(3, gen=g, grad=True), randn(2, 3, gen=g, grad=True)

    def f(x: Tensor, w: Tensor) -> tuple[Tensor, ...]:
        return (w * x, (x**2).sum(), (w @ x).tanh())

    return list(f(x, w)), (x, w), oracle(f, [x, w])


def _dict_inputs(g: torch.Generator) -> Built:
    x, w = randn(4, gen=g, grad=True), randn(3, 4, gen=g, grad=True)

    def f(x: Tensor, w: Tensor) -> Tensor:
        return torch.sigmoid(w @ x)

    jx, jw = oracle(f, [x, w])
    # keys in an order that differs from the alphabetical one: the result keeps the user's order
    return f(x, w), {"x": x, "w": w}, {"x": jx, "w": jw}


def _batch_of_one(g: torch.Generator) -> Built:
    x, w = randn(1, 3, gen=g, grad=True), randn(3, 2, gen=g)

    def f(x: Tensor) -> Tensor:
        return torch.tanh(x @ w)

    return f(x), x, oracle(f, [x])[0]


def _non_leaf(g: torch.Generator) -> Built:
    leaf, w = randn(2, 3, gen=g, grad=True), randn(3, 3, gen=g)
    h = leaf * 2 + 1  # an intermediate tensor: the Jacobian stops there

    def f(h: Tensor) -> Tensor:
        return torch.tanh(h @ w) * h

    return f(h), h, oracle(f, [h])[0]


def _non_leaf_and_its_leaf(g: torch.Generator) -> Built:
    leaf = randn(3, gen=g, grad=True)
    h = leaf * 2
    y = h.sin() + leaf.exp()  # leaf reaches y directly and through h
    hd, ld = h.detach(), leaf.detach()
    # autograd's meaning: d/dh holds leaf fixed; d/dleaf takes both paths (closed form)
    return y, [h, leaf], (torch.diag(hd.cos()), torch.diag(2 * hd.cos() + ld.exp()))


def _mixed_dtypes(g: torch.Generator) -> Built:
    x32 = randn(3, gen=g, dtype=torch.float32, grad=True)
    w = randn(2, 3, gen=g, grad=True)

    def f(x: Tensor, w: Tensor) -> Tensor:
        return torch.tanh(w @ x.to(w.dtype))

    ref = oracle(f, [x32.double(), w])
    return f(x32, w), [x32, w], ref


def _output_is_input(g: torch.Generator) -> Built:
    x = randn(2, 2, gen=g, grad=True)
    return x, x, torch.eye(4, dtype=x.dtype).reshape(2, 2, 2, 2)


def _per_sample_mlp(g: torch.Generator) -> Built:
    x, w1, w2 = randn(3, 4, gen=g, grad=True), randn(5, 4, gen=g), randn(2, 5, gen=g)

    def f(x: Tensor) -> Tensor:
        return torch.tanh(x @ w1.T) @ w2.T

    return f(x), x, oracle(f, [x])[0]


def _batched_two_inputs(g: torch.Generator) -> Built:
    x, z = randn(4, 3, gen=g, grad=True), randn(4, 2, 2, gen=g, grad=True)

    def f(x: Tensor, z: Tensor) -> tuple[Tensor, ...]:
        return (x.sin() * z.sum(-1).sum(-1, keepdim=True), (x**2).sum(-1) + z.prod(-1).sum(-1))

    return list(f(x, z)), [x, z], oracle(f, [x, z])


def _batch_dim_last(g: torch.Generator) -> Built:
    x, w = randn(3, 5, gen=g, grad=True), randn(2, 3, gen=g)

    def f(x: Tensor) -> Tensor:
        return torch.tanh(w @ x)  # samples are the columns

    return f(x), x, oracle(f, [x])[0]


CASES = [
    Case("mlp", _mlp),
    Case("conv", _conv),
    Case("conv_per_sample", _conv_per_sample, batch_dim=0),
    Case("tied_inputs", _tied),
    Case("unused_input_allowed", _unused, {"allow_unused": True}),
    Case("nothing_used", _nothing_used, {"allow_unused": True}),
    Case("tied_outputs", _tied_outputs),
    Case("non_contiguous_views", _views),
    Case("scalar_0d_output", _scalar),
    Case("scalar_of_scalar", _scalar_of_scalar),
    Case("one_element_output", _one_element),
    Case("sequence_outputs", _sequence_outputs),
    Case("dict_inputs", _dict_inputs),
    Case("batch_of_one", _batch_of_one, batch_dim=0),
    Case("non_leaf_input", _non_leaf, batch_dim=0),
    Case("non_leaf_and_its_leaf", _non_leaf_and_its_leaf),
    Case("mixed_float32_float64", _mixed_dtypes),
    Case("output_is_input", _output_is_input),
    Case("per_sample_mlp", _per_sample_mlp, batch_dim=0),
    Case("batched_two_inputs", _batched_two_inputs, batch_dim=0),
    Case("batch_dim_last", _batch_dim_last, batch_dim=-1),
]
BATCHED = [c for c in CASES if c.batch_dim is not None]
# Degenerate cases only test_graph runs (other front doors' helpers may not handle them yet).
EDGE_CASES = [Case("empty_batch", _empty_batch, batch_dim=0)]
