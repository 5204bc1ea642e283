"""``retain_graph`` on ``tj.jac`` and ``tj.gramian``: ``False`` (the default unless
``create_graph``) frees the graph whatever the plan, ``True`` keeps it, as ``torch.autograd.grad``
does (NOTE [retain_graph]); the ``.grad`` of ``retain_grad()`` outputs and inputs is left as it
was (NOTE [retain_grad])."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import randn, record_answers
from torch import Tensor
from torch.func import jacrev

import torchjac as tj
from torchjac._engine.graph import gram_graph

FREED = "backward through the graph a second time"

# Every plan the engine can take on a small graph (rows then columns), none of which may change
# what retain_graph means.
PLANS: dict[str, dict[str, Any]] = {
    "rows_one_vectorised_pass": {"mode": "rev"},
    "rows_loop": {"mode": "rev", "chunk_size": 1},
    "rows_in_chunks": {"mode": "rev", "chunk_size": 2},
    "rows_tiny_max_memory": {"mode": "rev", "max_memory": "4KiB"},
    "columns_one_vectorised_pass": {"mode": "fwd"},
    "columns_loop": {"mode": "fwd", "chunk_size": 1},
    "auto": {},
    "batch_dim": {"batch_dim": 0},
}
FNS = {"jac": tj.jac, "gramian": tj.gramian}


def _problem(gen: torch.Generator, kwargs: dict[str, Any]) -> tuple[Tensor, list[Tensor]]:
    """``tanh`` saves its result, so a freed graph cannot be differentiated again."""
    x = randn(4, 3, gen=gen, grad=True)
    w = randn(3, 5, gen=gen, grad=True)
    y = torch.tanh(x @ w) * 2
    return y, [x] if "batch_dim" in kwargs else [x, w]


@pytest.mark.parametrize("retain_graph", [None, False], ids=["default", "False"])
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("fn", FNS)
def test_false_frees_the_graph_whatever_the_plan(
    fn: str, plan: str, retain_graph: bool | None, gen: torch.Generator
) -> None:
    kwargs = PLANS[plan]
    y, inputs = _problem(gen, kwargs)
    FNS[fn](y, inputs, retain_graph=retain_graph, **kwargs)
    with pytest.raises(RuntimeError, match=FREED):
        y.backward(torch.ones_like(y))


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("fn", FNS)
def test_true_keeps_the_graph_whatever_the_plan(fn: str, plan: str, gen: torch.Generator) -> None:
    kwargs = PLANS[plan]
    y, inputs = _problem(gen, kwargs)
    first = FNS[fn](y, inputs, retain_graph=True, **kwargs)
    y.backward(torch.ones_like(y), retain_graph=True)  # the graph is still there
    x = inputs[0]
    assert x.grad is not None
    if len(inputs) == 2:
        expected = jacrev(lambda a, b: (torch.tanh(a @ b) * 2).sum())(
            x.detach(), inputs[1].detach()
        )
        torch.testing.assert_close(x.grad, expected)
    torch.testing.assert_close(FNS[fn](y, inputs, **kwargs), first)  # and can be probed again


@pytest.mark.parametrize("plan", ["rows_loop", "rows_in_chunks", "columns_loop"])
def test_every_output_is_freed(plan: str, gen: torch.Generator) -> None:
    """The last probe of a loop reaches only the last output; the others are freed as well."""
    x = randn(4, gen=gen, grad=True)
    y1, y2 = torch.tanh(x) * 2, torch.sigmoid(x) * 3
    tj.jac([y1, y2], x, **PLANS[plan])
    for y in (y1, y2):
        with pytest.raises(RuntimeError, match=FREED):
            y.backward(torch.ones_like(y))


def _ghost_losses(gen: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    """Task losses of a net whose weights are used once by ``F.linear`` (NOTE [graph ghost])."""
    x = randn(4, 16, gen=gen)
    w1, b1 = randn(16, 16, gen=gen, grad=True), randn(16, gen=gen, grad=True)
    w2 = randn(3, 16, gen=gen, grad=True)
    h = torch.tanh(torch.nn.functional.linear(x, w1, b1))
    return list((torch.nn.functional.linear(h, w2) ** 2).mean(0).unbind()), [w1, b1, w2]


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost_products", "blocks_of_J"])
@pytest.mark.parametrize("retain_graph", [None, True], ids=["default", "True"])
def test_gramian_ghost_path_and_blocks(
    ghost: bool, retain_graph: bool | None, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered = record_answers(monkeypatch, gram_graph, "ghost_gramian")
    losses, params = _ghost_losses(gen)
    kwargs: dict[str, Any] = {} if ghost else {"mode": "fwd"}  # columns skip the ghost products
    tj.gramian(losses, params, retain_graph=retain_graph, **kwargs)
    assert answered == ([True] if ghost else [])
    total = sum(losses)
    assert isinstance(total, Tensor)
    if retain_graph:
        total.backward()
        assert all(p.grad is not None for p in params)
    else:
        with pytest.raises(RuntimeError, match=FREED):
            total.backward()


def test_create_graph_keeps_it_unless_told(gen: torch.Generator) -> None:
    x = randn(3, gen=gen, grad=True)
    y = torch.tanh(x) * 2
    tj.jac(y, x, create_graph=True)  # retain_graph defaults to create_graph
    y.backward(torch.ones_like(y), retain_graph=True)
    tj.jac(y, x, create_graph=True, retain_graph=False)  # as torch.autograd.grad: freed
    with pytest.raises(RuntimeError, match=FREED):
        y.backward(torch.ones_like(y))


def test_gramian_then_backward_multi_task(gen: torch.Generator) -> None:
    """The docstring's pattern: weights from the Gramian, then ``backward`` of the same losses."""
    x = randn(8, 3, gen=gen)
    w, heads = randn(4, 3, gen=gen, grad=True), randn(2, 4, gen=gen, grad=True)
    losses = (torch.tanh(x @ w.T) @ heads.T).pow(2).mean(0)  # 2 tasks
    g = tj.gramian(losses, [w], retain_graph=True, max_memory="4KiB")
    weights = 1 / g.diagonal().sqrt()
    losses.backward(weights)
    j = jacrev(lambda w: (torch.tanh(x @ w.T) @ heads.detach().T).pow(2).mean(0))(w.detach())
    torch.testing.assert_close(w.grad, torch.einsum("t,tij->ij", weights, j))


def test_a_hook_that_rejects_none_still_gets_the_graph_freed(gen: torch.Generator) -> None:
    """The release pass sends undefined gradients; a hook written for tensors only makes it
    repeat with zeros (NOTE [retain_graph]). The Jacobian sees the hook as autograd does."""
    x = randn(4, 3, gen=gen, grad=True)
    h = torch.tanh(x)
    h.register_hook(lambda g: g * 2)  # fails on None
    y = torch.exp(h * 3)
    got = tj.jac(y, x)
    torch.testing.assert_close(got, 2 * jacrev(lambda z: torch.exp(torch.tanh(z) * 3))(x.detach()))
    with pytest.raises(RuntimeError, match=FREED):
        y.backward(torch.ones_like(y))


@pytest.mark.parametrize("retain_graph", [None, True], ids=["default", "True"])
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("fn", FNS)
def test_retained_grads_of_outputs_and_inputs_are_left_as_they_were(
    fn: str, plan: str, retain_graph: bool | None, gen: torch.Generator
) -> None:
    """No probe's gradient (a vmap's BatchedTensor, a dummy cotangent's graph) stays in the
    ``.grad`` of a ``retain_grad()`` output or input: it is the object it was before."""
    kwargs = PLANS[plan]
    a = randn(4, 3, gen=gen, grad=True)
    x = a * 1.5  # a non-leaf input
    x.retain_grad()
    w = randn(3, 5, gen=gen, grad=True)
    y = torch.tanh(x @ w) * 2
    y.retain_grad()
    before = randn(4, 3, gen=gen)
    x.grad = before
    FNS[fn](y, [x] if "batch_dim" in kwargs else [x, w], retain_graph=retain_graph, **kwargs)
    assert x.grad is before
    assert y.grad is None
    if not retain_graph:
        return
    y.backward(torch.ones_like(y))  # autograd itself still fills them
    assert y.grad is not None and y.grad.grad_fn is None
    torch.testing.assert_close(y.grad, torch.ones_like(y))


@pytest.mark.parametrize("plan", ["rows_in_chunks", "rows_one_vectorised_pass"])
@pytest.mark.parametrize("fn", FNS)
def test_a_hook_rejecting_none_frees_the_graph_beside_a_retained_output(
    fn: str, plan: str, gen: torch.Generator
) -> None:
    """The release pass is repeated with zeros when a hook rejects ``None``; that pass adds no
    gradient to a retained output's ``.grad``, which still held the last vectorised pass's."""
    x = randn(4, 3, gen=gen, grad=True)
    w = randn(3, 5, gen=gen, grad=True)
    h = x * 1.0
    h.register_hook(lambda g: g * 1.5)  # written for tensors only
    y = torch.tanh(h @ w) * 2
    y.retain_grad()
    got = FNS[fn](y, [x, w], **PLANS[plan])
    assert y.grad is None
    with pytest.raises(RuntimeError, match=FREED):
        y.sum().backward()
    j = jacrev(lambda a: torch.tanh(a @ w.detach()) * 2)(x.detach()) * 1.5
    jw = jacrev(lambda b: torch.tanh(x.detach() @ b) * 2)(w.detach())
    if fn == "jac":
        torch.testing.assert_close(got[0], j)
        torch.testing.assert_close(got[1], jw)
    else:
        gram = torch.einsum("abij,cdij->abcd", j, j) + torch.einsum("abij,cdij->abcd", jw, jw)
        torch.testing.assert_close(got, gram)


@pytest.mark.parametrize("fn", FNS)
def test_a_retained_intermediate_names_the_loop_when_passes_collide(
    fn: str, gen: torch.Generator
) -> None:
    """Torch writes each vectorised pass's BatchedTensor into a retain_grad() intermediate, and
    cannot add the next pass's to it; the call says to probe with a loop, which works."""
    x = randn(4, 3, gen=gen, grad=True)
    h = x * 2
    h.retain_grad()
    y = torch.sin(h) * x
    with pytest.raises(RuntimeError, match=rf"^{fn}: a retain_grad\(\) tensor.*chunk_size=1"):
        FNS[fn](y, x, mode="rev", chunk_size=5, retain_graph=True)  # 5, 5 and 2 rows
    h.grad = None  # the fix the message gives
    got = FNS[fn](y, x, mode="rev", chunk_size=1)
    assert h.grad is not None and h.grad.grad_fn is None  # torch's sum of the rows at h
    j = jacrev(lambda z: torch.sin(z * 2) * z)(x.detach())
    expected = j if fn == "jac" else torch.einsum("abij,cdij->abcd", j, j)
    torch.testing.assert_close(got, expected)
