"""``tj.gramian`` against ``J Jᵀ`` from the float64 oracles of the ``jac`` case registry."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from conftest import randn
from graph_cases import BATCHED, CASES, Case, ItemSin
from torch import Tensor
from torch.func import jacrev

import torchjac as tj
from torchjac._engine.core.basis import Group
from torchjac._engine.graph import graph_ghost
from torchjac._engine.graph.graph_ghost import find_ghost_layers
from torchjac._engine.graph.graph_probes import GraphProblem


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    return list(x.values()) if isinstance(x, dict) else list(x)


def explicit_gramian(outputs: Any, expected_jac: Any) -> Tensor:
    """``Σ_j J_j J_jᵀ`` from the oracle Jacobians, in the public layout of ``gramian``."""
    outs = _tensors(outputs)
    rows = outs[0].shape if isinstance(outputs, Tensor) else (sum(y.numel() for y in outs),)
    m = sum(y.numel() for y in outs)
    mats = [j.reshape(m, -1).double() for j in _tensors(expected_jac)]
    return sum((a @ a.T for a in mats), torch.zeros(m, m, dtype=torch.float64)).reshape(
        (*rows, *rows)
    )


def per_sample_blocks(outputs: Any, full: Tensor, bd: int) -> Tensor:
    """The per-sample Gramians ``[B, m_b, m_b]`` (diagonal blocks) of the full Gramian."""
    outs, idx, off = _tensors(outputs), [], 0
    for y in outs:
        ar = torch.arange(off, off + y.numel()).reshape(y.shape).movedim(bd % y.dim(), 0)
        idx.append(ar.reshape(ar.shape[0], -1))
        off += y.numel()
    index = torch.cat(idx, dim=1)  # [B, m_b]
    flat = full.reshape(off, off)
    return torch.stack([flat[i][:, i] for i in index])


@pytest.mark.parametrize("chunk_size", [None, 1, 3], ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_explicit_j_jt(
    case: Case, mode: str, chunk_size: int | None, gen: torch.Generator
) -> None:
    outputs, inputs, expected = case.build(gen)
    got = tj.gramian(outputs, inputs, mode=mode, chunk_size=chunk_size, **case.kwargs)
    want = explicit_gramian(outputs, expected)
    assert got.shape == want.shape
    tol = 1e-5 if any(t.dtype == torch.float32 for t in _tensors(inputs)) else 1e-10
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("max_memory", [200, 2000, 10**9], ids=lambda m: f"max_memory={m}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_memory_budget_streams_blocks(case: Case, max_memory: int, gen: torch.Generator) -> None:
    """Tiny budgets split inputs into groups and stream row chunks; the result is the same."""
    outputs, inputs, expected = case.build(gen)
    got = tj.gramian(outputs, inputs, max_memory=max_memory, **case.kwargs)
    tol = 1e-5 if any(t.dtype == torch.float32 for t in _tensors(inputs)) else 1e-10
    torch.testing.assert_close(
        got.double(), explicit_gramian(outputs, expected), rtol=tol, atol=tol
    )


@pytest.mark.parametrize("max_memory", [None, 300])
@pytest.mark.parametrize("case", BATCHED, ids=lambda c: c.id)
def test_batch_dim_gives_the_diagonal_blocks(
    case: Case, max_memory: int | None, gen: torch.Generator
) -> None:
    outputs, inputs, expected = case.build(gen)
    assert case.batch_dim is not None
    got = tj.gramian(outputs, inputs, batch_dim=case.batch_dim, max_memory=max_memory)
    full = explicit_gramian(outputs, expected)
    want = per_sample_blocks(outputs, full, case.batch_dim)
    outs = _tensors(outputs)
    if isinstance(outputs, Tensor):
        rest = list(outs[0].shape)
        del rest[case.batch_dim % outs[0].dim()]
        want = want.reshape((want.shape[0], *rest, *rest))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_multi_task_losses_of_a_shared_trunk(gen: torch.Generator) -> None:
    """Seed 004's use: the Gramian of several task losses (gradient norms and conflicts)."""
    x, t = randn(6, 4, gen=gen), randn(6, 3, gen=gen)
    w1, b1, heads = randn(5, 4, gen=gen), randn(5, gen=gen), randn(3, 5, gen=gen)
    params = [w1.requires_grad_(), b1.requires_grad_(), heads.requires_grad_()]

    def losses(w1: Tensor, b1: Tensor, heads: Tensor) -> Tensor:
        h = torch.tanh(x @ w1.T + b1)
        return ((h @ heads.T - t) ** 2).mean(0)  # one loss per task

    jacs = jacrev(losses, argnums=(0, 1, 2))(*[p.detach() for p in params])
    j = torch.cat([a.reshape(3, -1) for a in jacs], dim=1)
    got = tj.gramian(list(losses(*params).unbind()), params)
    torch.testing.assert_close(got, j @ j.T, rtol=1e-12, atol=1e-12)
    assert torch.linalg.eigvalsh(got).min() > -1e-12  # positive semi-definite


@pytest.mark.parametrize("max_memory", [None, 40], ids=["whole", "streamed"])
def test_create_graph_is_differentiable(max_memory: int | None, gen: torch.Generator) -> None:
    w = randn(3, 4, gen=gen, grad=True)
    x = randn(4, gen=gen)

    def trace_gram(w: Tensor) -> Tensor:
        j = jacrev(lambda w: torch.tanh(w @ x) ** 2)(w).reshape(3, -1)
        return (j @ j.T).trace()

    g = tj.gramian(torch.tanh(w @ x) ** 2, w, create_graph=True, max_memory=max_memory)
    (grad,) = torch.autograd.grad(g.trace(), w)
    torch.testing.assert_close(grad, jacrev(trace_gram)(w.detach()), rtol=1e-10, atol=1e-10)


def test_coupled_batch_raises(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen, grad=True)
    with pytest.raises(tj.BatchCouplingError, match="gramian: `batch_dim=0`"):
        tj.gramian(x - x.mean(0), x, batch_dim=0)


def test_argument_errors(gen: torch.Generator) -> None:
    x, z = randn(3, gen=gen, grad=True), randn(2, gen=gen, grad=True)
    with pytest.raises(ValueError, match=r"gramian: the outputs do not depend on inputs\[1\]"):
        tj.gramian(x.sin(), [x, z])
    with pytest.raises(ValueError, match="gramian: outputs is not on the autograd graph"):
        tj.gramian(x.detach().sin(), x)
    with pytest.raises(ValueError, match="gramian: `mode` must be one of"):
        tj.gramian(x.sin(), x, mode="sideways")
    with pytest.raises(TypeError, match="gramian: `outputs` must be a Tensor"):
        tj.gramian("y", x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gramian: `max_memory` must be"):
        tj.gramian(x.sin(), x, max_memory="lots")


@pytest.mark.parametrize("max_memory", [None, 200])
def test_retain_graph_keeps_the_graph(max_memory: int | None, gen: torch.Generator) -> None:
    x, w = randn(3, gen=gen, grad=True), randn(2, 3, gen=gen, grad=True)
    y = torch.tanh(w @ x) * x[:2]
    first = tj.gramian(y, [x, w], retain_graph=True, max_memory=max_memory)
    again = tj.gramian(y, [x, w], max_memory=max_memory)  # the graph is still there
    torch.testing.assert_close(first, again, rtol=0, atol=0)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch, torchjac as tj
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1024, 16, generator=g, dtype=torch.float64)
    y = torch.tanh(w @ x).sum(0)  # 16 outputs, each depending on all of w
    torch.autograd.grad(y[0], w, retain_graph=True)  # warm-up: lazy imports, thread pools
    v = torch.ones(3, requires_grad=True)
    tj.gramian(v.sin(), v, max_memory=8)  # the streamed path once, on a toy problem
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gram = tj.gramian(y, w, max_memory="24MiB")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    s = 1 - torch.tanh(w @ x).detach() ** 2  # closed form: grad of y_k is s_k ⊗ x_k
    want = (s.T @ s) * (x.T @ x)
    assert torch.allclose(gram, want, rtol=1e-10, atol=1e-8), (gram - want).abs().max()
    print(after - before, 16 * w.numel() * 8)
    """
)


@pytest.mark.slow
def test_peak_memory_streams_an_input_larger_than_the_budget() -> None:
    """J is 16 x 1Mi float64 (128 MiB) against a 24 MiB budget: only row chunks are held.

    glibc's dynamic mmap threshold keeps freed 8 MiB blocks in the heap, where fragmentation
    inflates the peak RSS; a fixed threshold makes the peak follow the live tensors.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=120, env=env
    )
    assert res.returncode == 0, res.stderr
    growth, j_bytes = map(int, res.stdout.split())
    assert growth < j_bytes / 3, (growth, j_bytes)


@pytest.mark.parametrize("max_memory", [None, 600], ids=["one_group", "two_groups"])
def test_one_fallback_warning_per_call(max_memory: int | None, gen: torch.Generator) -> None:
    w, x, z = randn(6, 2, gen=gen), randn(2, gen=gen, grad=True), randn(6, gen=gen, grad=True)
    y = (w @ ItemSin.apply(x)) * ItemSin.apply(z)  # both inputs' blocks fall back
    with pytest.warns(tj.FallbackWarning) as record:
        got = tj.gramian(y, [x, z], mode="rev", chunk_size=3, max_memory=max_memory)
    assert len(record) == 1 and str(record[0].message).startswith("gramian: ")
    jx = (w * x.detach().cos()) * z.detach().sin()[:, None]
    jz = torch.diag((w @ x.detach().sin()) * z.detach().cos())
    torch.testing.assert_close(got, jx @ jx.T + jz @ jz.T, rtol=1e-12, atol=1e-12)


def _linear_losses(gen: torch.Generator) -> tuple[list[Tensor], Any]:
    """3 task losses of a net whose weights are used once by ``F.linear`` (ghost products)."""
    x, t = randn(4, 16, gen=gen), randn(4, 3, gen=gen)
    w1, b1, w2 = randn(16, 16, gen=gen), randn(16, gen=gen), randn(16, 16, gen=gen)
    w3, heads = randn(16, 16, gen=gen), randn(3, 16, gen=gen)
    params = [p.requires_grad_() for p in (w1, b1, w2, w3, heads)]

    def losses(w1: Tensor, b1: Tensor, w2: Tensor, w3: Tensor, heads: Tensor) -> Tensor:
        h = torch.tanh(torch.nn.functional.linear(x, w1, b1))  # AddmmBackward0
        h = torch.tanh(torch.nn.functional.linear(h, w2))  # MmBackward0
        h = torch.tanh(h @ w3.T + h @ w3)  # w3 used twice: no ghost
        return ((h @ heads.T - t) ** 2).mean(0)

    return params, losses


def test_linear_weights_as_ghost_products(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ghost path itself (a fast path: on whatever the environment says)."""
    monkeypatch.delenv("TORCHJAC_FAST_PATHS", raising=False)
    params, losses = _linear_losses(gen)
    jacs = jacrev(losses, argnums=(0, 1, 2, 3, 4))(*[p.detach() for p in params])
    j = torch.cat([a.reshape(3, -1) for a in jacs], dim=1)
    ys = list(losses(*params).unbind())
    problem = GraphProblem(
        fn_name="gramian",
        outputs=tuple(ys),
        inputs=tuple(params),
        input_names=tuple(f"inputs[{i}]" for i in range(5)),
        used=(True,) * 5,
        jac_outputs=None,
        out_group=Group.of(ys, None),
        in_group=Group.of(params, None),
        batch_dim=None,
        create_graph=False,
        retain_graph=True,
    )
    found = find_ghost_layers(problem, lambda *_: True)
    assert [g.j for g in found] == [0, 2]  # w1 (addmm), w2 (mm)
    assert [g.ghost for g in find_ghost_layers(problem, lambda *_: False)] == [False, False]
    monkeypatch.setattr(graph_ghost, "ghost_is_cheaper", lambda *_: True)
    first = tj.gramian(ys, params, retain_graph=True)
    torch.testing.assert_close(first, j @ j.T, rtol=1e-12, atol=1e-12)
    again = tj.gramian(ys, params)  # the graph was kept
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    only_weight = tj.gramian(list(losses(*params).unbind()), params[0])  # nothing else to probe
    torch.testing.assert_close(only_weight, jacs[0].reshape(3, -1) @ jacs[0].reshape(3, -1).T)


@pytest.mark.parametrize("ghost", [True, False])
def test_a_hooked_weight_is_not_a_ghost(
    ghost: bool, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A weight's tensor hook changes its gradient; the ghost products (and the rows from ``δ``)
    never form that gradient, so a hooked weight takes the ordinary rows (NOTE [graph ghost])."""
    monkeypatch.delenv("TORCHJAC_FAST_PATHS", raising=False)
    monkeypatch.setattr(graph_ghost, "ghost_is_cheaper", lambda *_: ghost)
    x, w, b = randn(5, 4, gen=gen), randn(3, 4, gen=gen), randn(3, gen=gen)
    w.requires_grad_()
    b.requires_grad_()
    w.register_hook(lambda g: 2.0 * g)

    def losses() -> Tensor:
        y = torch.nn.functional.linear(x, w, b)
        return torch.stack([y.pow(2).sum(), y.tanh().sum()])

    ys = losses()
    j = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, [w, b], retain_graph=True)])
        for l in ys
    ])  # fmt: skip
    for inputs in ([w], [w, b]):
        got = tj.gramian(losses(), inputs)
        k = j if len(inputs) == 2 else j[:, : w.numel()]
        torch.testing.assert_close(got, k @ k.T, rtol=1e-12, atol=1e-12)


def test_a_gramian_walks_its_graph_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # the validation's walk also finds the ghost layers' consumers (NOTE [graph ghost])
    from torchjac._engine.kernel import kernels

    walks: list[int] = []
    count = kernels.graph_products
    monkeypatch.setattr(kernels, "graph_products", lambda *a: walks.append(1) or count(*a))
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    trunk.double()
    x = torch.randn(6, 3, dtype=torch.float64)
    losses = (trunk(x) ** 2).mean(0)
    params = list(trunk.parameters())
    got = tj.gramian(losses, params, retain_graph=True)
    assert walks == [1]
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(l, params, retain_graph=True)])
            for l in losses]  # fmt: skip
    j = torch.stack(rows)
    torch.testing.assert_close(got, j @ j.T)
