"""The Taylor tape of ``hessian_diagonal`` (NOTE [taylor tape]): its reverse sweep over closed-form
and recomputed vector-Jacobian products, against ``torch.func`` in float64."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from conftest import randn
from torch import Tensor, nn
from torch.func import functional_call, hessian, vmap

import torchjac as tj
from torchjac._engine.taylor import taylor_tape

_W = torch.linspace(-1.5, 1.2, 15, dtype=torch.float64).reshape(5, 3)
_V = torch.linspace(0.7, -0.9, 20, dtype=torch.float64).reshape(4, 5)

# Each case mixes ops with closed-form products (Linear, activations, add, mul, div, matmul)
# and ops recomputed by the sweep (atan, slicing, cat, sum, logsumexp, layer norm).
CASES: dict[str, Callable[[Tensor], Tensor]] = {
    "recomputed pointwise": lambda x: torch.atan(x @ _W.T) @ _V.T,
    "slices and cat": lambda x: torch.cat(
        [torch.tanh(x[..., :2]) * x[..., 1:], (x**3).sum(-1, keepdim=True)], -1
    ),
    "product of broadcast Jets": lambda x: torch.sin(x).unsqueeze(-1) * torch.cos(x).unsqueeze(-2),
    "div, add, rsub": lambda x: (torch.sigmoid(x) / 3.0 + 2.0 - torch.exp(x / 4)) @ _W.T,
    "constant on the left of matmul": lambda x: _V @ torch.tanh(_W @ x.unsqueeze(-1)),
    "layer norm": lambda x: F.layer_norm(torch.tanh(x @ _W.T), (5,)),
    "logsumexp": lambda x: torch.logsumexp(torch.sin(x) * x, -1, keepdim=True),
    "a Jet times itself": lambda x: torch.tanh(x) * torch.tanh(x) + x * x,
}


@pytest.fixture
def sweeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the reverse sweeps (a call that fell back to the forward diagonal makes none)."""
    count = [0]
    sweep = taylor_tape._sweep

    def counted(*args):  # type: ignore[no-untyped-def]
        count[0] += 1
        return sweep(*args)

    monkeypatch.setattr(taylor_tape, "_sweep", counted)
    yield count


def _per_sample(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda s: f(s.unsqueeze(0)).squeeze(0)


@pytest.mark.parametrize("name", list(CASES))
def test_unbatched_rows_match_torch_func(
    gen: torch.Generator, sweeps: list[int], name: str
) -> None:
    f = _per_sample(CASES[name])
    x = randn(3, gen=gen)
    got = tj.hessian_diagonal(f, x)  # several output rows: one batched sweep
    want = hessian(f)(x).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(got, want.reshape(got.shape))
    assert sweeps[0] == 1


@pytest.mark.parametrize("name", list(CASES))
def test_batched_matches_torch_func(gen: torch.Generator, name: str) -> None:
    x = randn(6, 3, gen=gen)
    got = tj.hessian_diagonal(CASES[name], x, batch_dim=0)
    want = vmap(hessian(_per_sample(CASES[name])))(x).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(got, want.reshape(got.shape))


def test_a_recomputed_pointwise_op_keeps_the_batch(gen: torch.Generator, sweeps: list[int]) -> None:
    # atan has no rule: the general rule finds its batch dimension after recording its source,
    # which must still reach the tape's entry (else the call reruns the forward diagonal)
    x = randn(6, 3, gen=gen)
    tj.hessian_diagonal(CASES["recomputed pointwise"], x, batch_dim=0)
    assert sweeps[0] == 1


def test_parameter_gradient_through_the_sweep(gen: torch.Generator, sweeps: list[int]) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Sigmoid())
    model = nn.Sequential(*model, nn.Linear(8, 2)).double()
    x = randn(5, 3, gen=gen)
    d = tj.hessian_diagonal(model, x, batch_dim=0, create_graph=True)
    assert sweeps[0] == 1
    params = dict(model.named_parameters())
    got = torch.autograd.grad(d.square().sum(), list(params.values()), allow_unused=True)

    def loss(p: dict[str, Tensor]) -> Tensor:
        h = vmap(hessian(lambda s: functional_call(model, p, (s.unsqueeze(0),)).squeeze(0)))(x)
        return h.diagonal(dim1=-2, dim2=-1).square().sum()

    want = torch.func.grad(loss)(params)
    for (name, w), g in zip(want.items(), got):
        torch.testing.assert_close(torch.zeros_like(w) if g is None else g, w, msg=name)


def test_nodes_keep_no_stack_alive(gen: torch.Generator) -> None:
    # a node names Jets by key: after the pass, only the sources and small values stay
    x = randn(4, 3, gen=gen)
    spec_tapes: list[taylor_tape.Tape] = []
    record = taylor_tape.Tape.record

    def spy(self, *args):  # type: ignore[no-untyped-def]
        spec_tapes.append(self)
        return record(self, *args)

    taylor_tape.Tape.record = spy  # type: ignore[method-assign]
    try:
        tj.hessian_diagonal(CASES["div, add, rsub"], x, batch_dim=0)
    finally:
        taylor_tape.Tape.record = record  # type: ignore[method-assign]
    from torchjac._engine.taylor.taylor import Jet

    def held(fn: object) -> Iterator[object]:  # what a closure keeps, through inner closures
        for cell in getattr(fn, "__closure__", None) or ():
            yield cell.cell_contents
            if callable(cell.cell_contents):
                yield from held(cell.cell_contents)
            elif isinstance(cell.cell_contents, (list, tuple, dict)):
                yield from cell.cell_contents

    assert spec_tapes and spec_tapes[0].nodes
    for tape in spec_tapes:
        for node in tape.nodes:
            assert not any(isinstance(x, Jet) for x in held(node.back))


def test_a_constant_written_after_its_use_takes_the_forward_diagonal(gen: torch.Generator) -> None:
    # the sweep reads an op's constant after the pass: one written in place since must not be
    # read with its new value (the call takes the forward diagonal instead)
    def f(x: Tensor) -> Tensor:
        c = torch.full((3,), 2.0, dtype=x.dtype)
        h = torch.tanh(x) * c
        c.add_(1.0)
        return (h * h).sum(-1, keepdim=True) + (torch.sin(x) * c).sum(-1, keepdim=True)

    def same(x: Tensor) -> Tensor:  # what f computes, without the write (autograd refuses it)
        h = torch.tanh(x) * 2.0
        return (h * h).sum(-1, keepdim=True) + (torch.sin(x) * 3.0).sum(-1, keepdim=True)

    x = randn(4, 3, gen=gen)
    want = vmap(hessian(_per_sample(same)))(x).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(f, x, batch_dim=0), want)
    torch.testing.assert_close(tj.hessian_diagonal(_per_sample(f), x[0]), want[0])


@pytest.mark.parametrize("name", ["hessian_diagonal", "laplacian", "hessian"])
@pytest.mark.parametrize("first", ["input", "linear"])
def test_create_graph_through_a_lazy_first_order(
    gen: torch.Generator, name: str, first: str
) -> None:
    # sin saves the value row it reads; writing the lazy first order later must not change it
    # under autograd (found in review: "modified by an inplace operation" at backward)
    w1 = randn(4, 4, gen=gen).requires_grad_(True)
    w2 = randn(4, 2, gen=gen).requires_grad_(True)

    def f(z: Tensor) -> Tensor:
        return torch.sin(z if first == "input" else z @ w1) @ w2

    x = randn(3, 4, gen=gen).requires_grad_(True)
    fn = getattr(tj, name)
    out = fn(f, x, batch_dim=0, create_graph=True)
    got = torch.autograd.grad(out.sum(), (x, w1, w2), allow_unused=True)
    want_out = fn(f, x, batch_dim=0, create_graph=True, mode="rev")
    want = torch.autograd.grad(want_out.sum(), (x, w1, w2), allow_unused=True)
    for g, w, t in zip(got, want, (x, w1, w2)):
        zero = torch.zeros_like(t)
        torch.testing.assert_close(zero if g is None else g, zero if w is None else w)


def test_outputs_of_several_dtypes_add_up_in_the_result_dtype(gen: torch.Generator) -> None:
    # found in review: the sweep summed every output row in the first output's dtype (float16)
    x = randn(4, 3, gen=gen)

    def f(z: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros(z.shape[0], dtype=torch.float16), 1e3 * torch.tanh(z).sum(-1)

    got = tj.hessian_diagonal(f, x, batch_dim=0)
    want = vmap(hessian(lambda s: 1e3 * torch.tanh(s).sum(-1)))(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[:, 1], want.diagonal(dim1=-2, dim2=-1))
    torch.testing.assert_close(got[:, 0], torch.zeros_like(got[:, 0]))


def test_a_sweep_that_fails_takes_the_forward_diagonal(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. a recomputed op whose backward has no batching rule for the output rows: the call
    # falls back to the forward diagonal, exactly, instead of failing
    def fails(*args):  # type: ignore[no-untyped-def]
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(taylor_tape, "_recompute", fails)
    f = _per_sample(CASES["recomputed pointwise"])
    x = randn(3, gen=gen)
    want = hessian(f)(x).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(f, x), want)


@pytest.mark.parametrize("name", ["hessian", "hessian_diagonal", "laplacian", "jacobian"])
def test_slicing_functions_without_functorch_primitives(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # NOTE [lean vmap]: the Taylor mode's linear ops (slices, cat, sum, reshape) give the same
    # result through functorch's primitives and through torch.func.vmap
    from torchjac._engine.core import lean_vmap

    def f(z: Tensor) -> Tensor:
        a, b = z[:, 0:1], z[:, 1:]
        u = torch.tanh(torch.cat([a * b.sum(-1, keepdim=True), b], -1) @ _W[:, :3].T)
        return torch.stack(u.split(2, dim=-1)[:2], 0).sum(0).reshape(-1, 2)

    x = randn(4, 3, gen=gen)
    fn = getattr(tj, name)
    lean = fn(f, x, batch_dim=0)
    monkeypatch.setattr(lean_vmap, "_F", None)
    plain = fn(f, x, batch_dim=0)
    single = vmap(hessian(_per_sample(f)))(x)
    want = {
        "hessian": single,
        "hessian_diagonal": single.diagonal(dim1=-2, dim2=-1),
        "laplacian": single.diagonal(dim1=-2, dim2=-1).sum(-1),
        "jacobian": vmap(torch.func.jacrev(_per_sample(f)))(x),
    }[name]
    torch.testing.assert_close(lean, want)
    torch.testing.assert_close(plain, want)


_N = torch.linspace(-0.8, 1.1, 12, dtype=torch.float64).reshape(4, 3)  # a narrow layer: 4 outputs
_H = torch.linspace(0.9, -0.6, 8, dtype=torch.float64).reshape(2, 4)

# What reads the first order of a narrow Linear layer, whose product waits until it is read
# (NOTE [lazy first order]): nothing, a rule, the general rule, another Linear layer; with the
# deferred products made and those computed.
DEFERRED: dict[str, tuple[Callable[[Tensor], Tensor], int, int]] = {
    "returned": (lambda x: F.linear(torch.tanh(x), _N, _N[:, 0]), 1, 0),
    "an activation": (lambda x: torch.tanh(F.linear(torch.sin(x), _N)), 1, 1),
    "the general rule": (lambda x: torch.atan(F.linear(torch.sin(x), _N)).cumsum(-1), 1, 1),
    "another Linear": (lambda x: F.linear(torch.tanh(F.linear(torch.sin(x), _N)), _H), 2, 1),
}


@pytest.fixture
def pending_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the deferred products made and computed: ``[made, computed]``."""
    from torchjac._engine.taylor import taylor, taylor_rules

    count = [0, 0]
    deferred = taylor.Jet.deferred

    def counted(stack, pending, spec, bdim):  # type: ignore[no-untyped-def]
        count[0] += 1

        def run() -> Tensor:
            count[1] += 1
            return pending()

        return deferred(stack, run, spec, bdim)

    monkeypatch.setattr(taylor_rules.Jet, "deferred", staticmethod(counted))
    yield count


@pytest.mark.parametrize("name", list(DEFERRED))
@pytest.mark.parametrize("what", ["laplacian", "hessian_diagonal"])
def test_a_narrow_linear_computes_its_first_order_only_when_read(
    gen: torch.Generator, pending_reads: list[int], name: str, what: str
) -> None:
    f, made, computed = DEFERRED[name]
    x = randn(5, 3, gen=gen)
    got = getattr(tj, what)(f, x, batch_dim=0)
    diag = vmap(hessian(_per_sample(f)))(x).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(got, diag.sum(-1) if what == "laplacian" else diag)
    assert pending_reads == [made, computed]


def test_a_deferred_product_uses_the_weight_as_it_was_at_the_call(gen: torch.Generator) -> None:
    # found in review: a write through .data after the call went unseen (a silently wrong
    # Laplacian), a tracked one made the call fail, and an inference weight had no version
    w = randn(2, 4, gen=gen)

    def pure(x: Tensor) -> Tensor:
        return torch.tanh(F.linear(torch.tanh(x), w)) + torch.tanh(F.linear(torch.tanh(x), 2 * w))

    def through_data(x: Tensor) -> Tensor:
        y = F.linear(torch.tanh(x), w)  # deferred: read by the tanh below, after the write
        w.data.mul_(2)
        out = torch.tanh(y) + torch.tanh(F.linear(torch.tanh(x), w))
        w.data.div_(2)
        return out

    def tracked(x: Tensor) -> Tensor:
        y = F.linear(torch.tanh(x), w)
        with torch.no_grad():
            w.mul_(2)
        out = torch.tanh(y) + torch.tanh(F.linear(torch.tanh(x), w))
        with torch.no_grad():
            w.div_(2)
        return out

    x = randn(3, 4, gen=gen)
    want = vmap(hessian(_per_sample(pure)))(x).diagonal(dim1=-2, dim2=-1).sum(-1)
    for f in (through_data, tracked):
        torch.testing.assert_close(tj.laplacian(f, x, batch_dim=0), want)
    with torch.inference_mode():
        frozen = w.clone()
    got = tj.laplacian(lambda z: F.linear(torch.tanh(z), frozen), x, batch_dim=0)
    want = vmap(hessian(lambda s: F.linear(torch.tanh(s), w)))(x).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(got, want.sum(-1))
