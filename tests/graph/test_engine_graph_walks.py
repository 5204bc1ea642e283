"""Graph walks never skip a node, whatever the life of the Python objects of autograd nodes.

Up to torch 2.12 the Python object of an autograd node lives only while something refers to it:
a walk that drops it frees it, and the next node read may get the same ``id``. A walk keyed on
``id(node)`` alone then takes a node it has never seen for one it has, and skips its subgraph
(on those torch versions the README's first ``tj.jac`` raised "do not depend on inputs"). The
fixture below makes every torch behave so: ``Tensor.grad_fn`` and ``next_functions`` hand out
short-lived stand-ins for the nodes (one per node while it lives, like torch's own), and a
garbage collection runs between reads.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import test_gramian
import torch
from conftest import randn
from torch import Tensor, nn
from torch.func import jacrev

import torchjac as tj
from torchjac._engine.core.structure import reachable
from torchjac._engine.graph import graph_ghost
from torchjac._engine.kernel.kernels import graph_products
from torchjac._graph_args import _walk

_LIVE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_TYPES: dict[type, type] = {}


class _ShortLivedNode:
    """A node's stand-in that dies when the walk drops it (see the module docstring)."""

    def __init__(self, node: Any) -> None:
        self._node = node

    @property
    def next_functions(self) -> tuple[tuple[Any, int], ...]:
        gc.collect(0)  # free every dropped stand-in now: their ids are up for reuse
        return tuple((_short_lived(n), nr) for n, nr in self._node.next_functions)

    def __getattr__(self, name: str) -> Any:  # variable, _saved_*, register_prehook, name...
        return getattr(self._node, name)


def _short_lived(node: Any) -> Any:
    """The live stand-in of ``node`` if there is one (as torch's), else a new one."""
    if node is None:
        return None
    held = _LIVE.get(node)
    if held is None:
        kind = type(node)
        if kind not in _TYPES:  # same type name as the node's: walks read it
            _TYPES[kind] = type(kind.__name__, (_ShortLivedNode,), {})
        held = _TYPES[kind](node)
        _LIVE[node] = held
    return held


@pytest.fixture(params=["torch_nodes", "short_lived_nodes"])
def short_lived_nodes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs on torch's own nodes (short-lived up to 2.12), then on the stand-ins."""
    if request.param == "short_lived_nodes":
        _hand_out_stand_ins(monkeypatch)


def _hand_out_stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch._C.TensorBase.grad_fn
    short = property(lambda t: _short_lived(real.__get__(t)))
    monkeypatch.setattr(torch.Tensor, "grad_fn", short, raising=False)


def _wide_graph() -> tuple[Tensor, list[Tensor]]:
    """An output on many branches of small ops, each ending in its own leaf."""
    leaves = [randn(3, grad=True) for _ in range(12)]
    out = sum(((x * 2).sin().exp() + 1).sum() for x in leaves)
    assert isinstance(out, Tensor)
    return out, leaves


def test_stand_ins_die_and_their_ids_come_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stand-ins do reproduce torch <= 2.12: a dropped node's id is handed to another."""
    _hand_out_stand_ins(monkeypatch)
    out, _ = _wide_graph()
    ids, reused = set(), 0
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        reused += id(node) in ids
        ids.add(id(node))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    assert reused > 0


def test_reachable_finds_every_leaf(short_lived_nodes: None) -> None:
    out, leaves = _wide_graph()
    assert reachable([out], leaves) == [True] * len(leaves)
    mid = (leaves[0] * 3).cos()
    assert reachable([mid.sum() + out], [mid, *leaves]) == [True] * (len(leaves) + 1)


def test_the_front_doors_walk_finds_every_leaf(short_lived_nodes: None) -> None:
    out, leaves = _wide_graph()
    counted, used, _ = _walk((out,), tuple(leaves), False, None)
    assert used == [True] * len(leaves)
    assert counted is not None and counted.nodes == 7 * len(leaves)
    mid = (leaves[0] * 3).cos()
    _, used, _ = _walk((mid.sum() + out,), (mid, *leaves), False, None)
    assert used == [True] * (len(leaves) + 1)


def test_graph_products_counts_every_node(short_lived_nodes: None) -> None:
    out, leaves = _wide_graph()
    # per branch: sum, add, exp, sin, mul, AccumulateGrad, and the add into the running sum
    counted = graph_products([out])
    assert (counted.macs, counted.nodes, counted.builtin) == (0, 7 * len(leaves), True)


def test_readme_jac_and_gramian(short_lived_nodes: None) -> None:
    param = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    y1 = torch.tensor([-1.0, 1.0], dtype=torch.float64) @ param
    y2 = (param**2).sum()
    want = torch.tensor([[-1.0, 1.0], [2.0, 4.0]], dtype=torch.float64)
    (got,) = tj.jac([y1, y2], [param], retain_graph=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(tj.gramian([y1, y2], [param]), want @ want.T)


def test_jac_allow_unused_is_not_zero(short_lived_nodes: None) -> None:
    out, leaves = _wide_graph()
    unused = randn(2, grad=True)
    got = tj.jac(out, [*leaves, unused], allow_unused=True)
    for x, g in zip(leaves, got):
        want = (2 * (x * 2).cos() * (x * 2).sin().exp()).detach()
        torch.testing.assert_close(g, want)
    assert torch.equal(got[-1], torch.zeros(2, dtype=torch.float64))


def test_param_jacobian_without_batch_dim(short_lived_nodes: None) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = randn(5, 3)
    got = tj.param_jacobian(model, x)
    params = dict(model.named_parameters())
    want = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    assert list(got) == list(want)
    for name in want:
        assert want[name].abs().sum() > 0
        torch.testing.assert_close(got[name], want[name])


def test_ghost_products_stay_exact(
    short_lived_nodes: None, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-ins cannot be named by a ``GradientEdge``: the ghosts decline, values exact."""
    params, losses = test_gramian._linear_losses(gen)
    jacs = jacrev(losses, argnums=(0, 1, 2, 3, 4))(*[p.detach() for p in params])
    j = torch.cat([a.reshape(3, -1) for a in jacs], dim=1)
    monkeypatch.setattr(graph_ghost, "ghost_is_cheaper", lambda *_: True)
    got = tj.gramian(list(losses(*params).unbind()), params)
    torch.testing.assert_close(got, j @ j.T, rtol=1e-12, atol=1e-12)
