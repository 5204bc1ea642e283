"""Multi-task losses of a shared trunk: ``jac`` and ``gramian`` in one vectorised pass, Linear
weights as ghost products or as rows (NOTE [ghost or rows]), against float64 ``jacrev``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import randn, record_answers
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import torchjac as tj
from torchjac._engine.core import plan
from torchjac._engine.core.fast import fast_paths
from torchjac._engine.graph import gram_graph, graph_ghost

Losses = Callable[..., Tensor]


class _Trunk(nn.Module):
    """A module class with a functional forward: the same operations as the Sequential."""

    def __init__(self, d: int, w: int) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(w, d)), nn.Parameter(torch.randn(w))
        self.w2, self.b2 = nn.Parameter(torch.randn(w, w)), nn.Parameter(torch.randn(w))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(nn.functional.linear(x, self.w1, self.b1))
        return nn.functional.linear(h, self.w2, self.b2)


def _problem(style: str, m: int, n: int, w: int, seq: int = 0) -> tuple[nn.Module, Losses]:
    """``m`` task losses of a trunk ``3 -> w -> w`` on ``n`` samples (``seq``: 3-d inputs)."""
    torch.manual_seed(0)
    d = 3
    if style == "sequential":
        trunk: nn.Module = nn.Sequential(nn.Linear(d, w), nn.ReLU(), nn.Linear(w, w))
    else:
        trunk = _Trunk(d, w)
    trunk = trunk.double()
    heads = nn.Linear(w, m).double()
    shape = (n, seq, d) if seq else (n, d)
    x = randn(*shape, gen=torch.Generator().manual_seed(1))
    y = randn(*shape[:-1], m, gen=torch.Generator().manual_seed(2))

    def losses(params: dict[str, Tensor] | None = None) -> Tensor:
        z = torch.tanh(trunk(x) if params is None else functional_call(trunk, params, (x,)))
        r = (heads(z) - y) ** 2
        return r.reshape(-1, m).mean(0)

    return trunk, losses


def _oracle(trunk: nn.Module, losses: Losses) -> tuple[Tensor, ...]:
    params = {k: v.detach() for k, v in trunk.named_parameters()}
    jd = jacrev(losses)(params)
    return tuple(jd[k] for k in params)


def _gram(jacs: tuple[Tensor, ...]) -> Tensor:
    j = torch.cat([a.reshape(a.shape[0], -1) for a in jacs], dim=1)
    return j @ j.T


SHAPES = [(1, 1, 1, 0), (3, 2, 5, 0), (4, 3, 16, 0), (2, 2, 6, 4)]  # (m, N, width, seq)


@pytest.mark.parametrize("ghost", ["cost", "always", "never", "fast paths off"])
@pytest.mark.parametrize("style", ["sequential", "module"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}-N{}-w{}-seq{}".format(*s))
def test_gramian_of_task_losses(
    shape: tuple[int, int, int, int], style: str, ghost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, n, w, seq = shape
    trunk, losses = _problem(style, m, n, w, seq)
    want = _gram(_oracle(trunk, losses))
    if ghost in ("always", "never"):
        monkeypatch.setattr(graph_ghost, "ghost_is_cheaper", lambda *_: ghost == "always")
    ps = list(trunk.parameters())
    answered = record_answers(monkeypatch, gram_graph, "ghost_gramian")
    ghosts: list[bool] = []
    find = gram_graph.find_ghost_layers
    monkeypatch.setattr(
        gram_graph,
        "find_ghost_layers",
        lambda p, walked: (
            ghosts.append(any(g.ghost for g in find(p, walked=walked))) or find(p, walked=walked)
        ),
    )
    with fast_paths(ghost != "fast paths off"):
        got = tj.gramian(losses(), ps)
        kept = tj.gramian(losses(), ps, retain_graph=True, chunk_size=1)  # a loop of passes
        only_weights = tj.gramian(losses(), ps[::2])
    assert answered == [True] * 3  # one vectorised pass (or a loop of them) for every call
    assert ghosts == [ghost == "always"] * 3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kept, want, rtol=1e-10, atol=1e-12)
    weights = tuple(j for j, p in zip(_oracle(trunk, losses), ps) if p.dim() == 2)
    torch.testing.assert_close(only_weights, _gram(weights), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}-N{}-w{}-seq{}".format(*s))
def test_jac_of_task_losses(shape: tuple[int, int, int, int], fast: bool) -> None:
    trunk, losses = _problem("sequential", *shape[:3], seq=shape[3])
    want = _oracle(trunk, losses)
    ps = list(trunk.parameters())
    with fast_paths(fast):
        got = tj.jac(losses(), ps)
        looped = tj.jac(losses(), ps, chunk_size=1)
    for g, lp, wnt, p in zip(got, looped, want, ps):
        assert g.shape == (shape[0], *p.shape)
        torch.testing.assert_close(g, wnt, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lp, wnt, rtol=1e-10, atol=1e-12)
        assert g.untyped_storage().data_ptr() != p.untyped_storage().data_ptr()


@pytest.mark.parametrize("fn", ["jac", "gramian"])
def test_the_one_pass_frees_the_graph_unless_retained(fn: str) -> None:
    """NOTE [one pass frees]: retain_graph=False leaves no graph to backward through."""
    trunk, losses = _problem("sequential", 3, 4, 5)
    ps = list(trunk.parameters())
    door = getattr(tj, fn)
    ls = losses()
    door(ls, ps)
    with pytest.raises(RuntimeError, match="a second time"):
        ls.sum().backward()
    ls = losses()
    g = tj.gramian(ls, ps, retain_graph=True)
    ls.backward(1 / g.diagonal().sqrt())  # the multi-task step: weights from the Gramian
    assert all(p.grad is not None for p in ps)


@pytest.mark.parametrize("fn", ["jac", "gramian"])
def test_a_failed_freeing_pass_names_its_own_cause(fn: str) -> None:
    """NOTE [one pass frees]: a freeing pass that fails is not retried as a loop (the retry met
    the half-freed graph and its 'a second time' hid the cause, here an in-place write on a
    saved value, which the user's own backward would name)."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(2, 3), nn.Linear(3, 2)
    x = torch.randn(4, 2, requires_grad=True)
    h = torch.relu(lin1(x))
    h += 1.0  # writes relu's output, which relu saved for its backward
    inputs = [x] if fn == "jac" else [*lin1.parameters(), *lin2.parameters()]
    with pytest.raises(RuntimeError, match="modified by an inplace operation") as info:
        getattr(tj, fn)(lin2(h), inputs)
    assert "a second time" not in str(info.value)
    assert "retain_graph=True" in str(info.value)


def test_a_custom_function_keeps_the_release_pass_and_its_fallback() -> None:
    """With a custom Function on the graph the pass keeps the graph: a vmap failure inside it
    still falls back to a loop, and the release pass frees the graph afterwards."""

    class ItemScale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: object, x: Tensor) -> Tensor:
            return x * 2

        @staticmethod
        def backward(ctx: object, g: Tensor) -> Tensor:
            return g * float(g.sum().item() * 0 + 2)  # .item(): no vmap

    x = randn(4, gen=torch.Generator().manual_seed(3), grad=True)
    ys = ItemScale.apply(x).sin()
    with pytest.warns(tj.FallbackWarning):
        got = tj.jac(ys, x)
    torch.testing.assert_close(got, torch.diag(2 * torch.cos(2 * x.detach())))
    with pytest.raises(RuntimeError, match="a second time"):
        ys.sum().backward()


def test_ghost_cost_model() -> None:
    """NOTE [ghost or rows]: wide layers on a small batch are ghosts; tiny layers and batches
    much larger than the layer's input are rows."""
    assert graph_ghost.ghost_is_cheaper(16, 32, 512, 512)
    assert not graph_ghost.ghost_is_cheaper(4, 8, 4, 4)  # a handful of multiply-adds
    assert not graph_ghost.ghost_is_cheaper(4, 4096, 64, 64)  # N far above in


def test_loop_or_vmap_cost_model() -> None:
    """NOTE [loop or vmap on a graph]: a loop for one probe or one probe per pass; vectorised
    from two probes on; the user's chunk_size wins."""
    cpu = torch.device("cpu")
    kw = {"nodes": 17, "macs": 2 * 10**7, "products": 6, "device": cpu}
    assert plan.choose_graph_chunk_size(1, 100, 10**9, None, **kw) == 1
    assert plan.choose_graph_chunk_size(2, 100, 10**9, None, **kw) == 2
    assert plan.choose_graph_chunk_size(64, 100, 10**9, None, **kw) == 64
    assert plan.choose_graph_chunk_size(64, 100, 10**9, 1, **kw) == 1
    assert plan.choose_graph_chunk_size(64, 100, 250, None, **kw) == 2  # the budget's chunk
    per_pass = {"nodes": 17, "macs": 10**6, "products": 6, "threads": 1}
    assert plan.graph_rows_cost(8, 8, **per_pass) < plan.graph_rows_cost(8, 1, **per_pass)
