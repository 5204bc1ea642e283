"""``tj.JacobianOperator``: products, dense and scipy views against float64 oracles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import randn
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

import torchjac as tj
from torchjac._engine.core.fast import fast_paths

D = torch.float64


def _flat(jac: Any, rows: int) -> Tensor:
    """The flattened [m, n] matrix of a jacobian result (Tensor, tuple or dict of blocks)."""
    blocks = jac.values() if isinstance(jac, dict) else jac if isinstance(jac, tuple) else [jac]
    return torch.cat([b.reshape(rows, -1) for b in blocks], dim=1)


def _oracle(func: Callable[..., Any], xs: tuple[Tensor, ...]) -> Tensor:
    """``jacrev`` in float64: rows of every output, columns of every input, flattened."""
    jac = jacrev(
        lambda *a: torch.cat([y.reshape(-1) for y in _tuple(func(*a))]), tuple(range(len(xs)))
    )(*xs)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def _tuple(y: Any) -> tuple[Tensor, ...]:
    return (y,) if isinstance(y, Tensor) else tuple(y)


FUNCS = {
    "tensor": (lambda x: x.sin() * x.sum(), lambda g: (randn(3, 2, gen=g),)),
    "tuple_two_outputs": (
        lambda x, y: (x.tanh() @ y, (x**2).sum()),
        lambda g: (randn(2, 3, gen=g), randn(3, 4, gen=g)),
    ),
    "scalar_output": (lambda x: (x.exp() * x).sum(), lambda g: (randn(5, gen=g),)),
}


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_function_dense_and_products_match_the_oracle(name: str, gen: torch.Generator) -> None:
    func, make = FUNCS[name]
    xs = make(gen)
    inputs = xs[0] if name != "tuple_two_outputs" else xs
    want = _oracle(func, xs)
    J = tj.JacobianOperator(func, inputs)
    m, n = want.shape
    assert J.shape == (m, n) and J.dtype == D and J.device == xs[0].device
    torch.testing.assert_close(J.to_dense(), want)
    rows = m if not isinstance(func(*xs), Tensor) or func(*xs).dim() != 2 else None
    jac = tj.jacobian(func, inputs)
    torch.testing.assert_close(J.to_dense(), _flat(jac, rows or m))
    v, V = randn(n, gen=gen), randn(n, 5, gen=gen)
    u, U = randn(m, gen=gen), randn(m, 3, gen=gen)
    for chunk in (1, 2, None):
        Jc = tj.JacobianOperator(func, inputs, chunk_size=chunk)
        torch.testing.assert_close(Jc @ v, want @ v)
        torch.testing.assert_close(Jc @ V, want @ V)
        torch.testing.assert_close(Jc.T @ u, want.T @ u)
        torch.testing.assert_close(Jc.T @ U, want.T @ U)
        torch.testing.assert_close(U.T @ Jc, U.T @ want)
    torch.testing.assert_close(J.T.to_dense(), want.T)
    torch.testing.assert_close(J.gram().to_dense(), want @ want.T)
    torch.testing.assert_close(J.T.gram().to_dense(), want.T @ want)
    torch.testing.assert_close(J.T.gram() @ v, want.T @ (want @ v))
    assert J.T.T.shape == J.shape and (J @ torch.zeros(n, 0, dtype=D)).shape == (m, 0)


def test_dict_inputs_follow_key_order(gen: torch.Generator) -> None:
    a, b = randn(2, gen=gen), randn(3, gen=gen)
    J = tj.JacobianOperator(lambda d: d["b"].sum() * d["a"], {"b": b, "a": a})
    want = _oracle(lambda b_, a_: b_.sum() * a_, (b, a))  # columns: b, then a
    torch.testing.assert_close(J.to_dense(), want)


@pytest.mark.parametrize("batch_dim", [0, 1])
def test_batch_dim_is_the_block_diagonal_jacobian(batch_dim: int, gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    w = randn(3, 3, gen=gen)

    def f(x: Tensor) -> Tensor:  # samples along `batch_dim`, independent
        return torch.tanh(x @ w) if batch_dim == 0 else torch.tanh(w @ x)

    xb = x if batch_dim == 0 else x.T.contiguous()
    J = tj.JacobianOperator(f, xb, batch_dim=batch_dim)
    full = _oracle(f, (xb,))
    torch.testing.assert_close(J.to_dense(), full)
    per = tj.jacobian(f, xb, batch_dim=batch_dim)  # [B, out, in]
    rows = torch.arange(full.shape[0]).reshape(f(xb).shape).movedim(batch_dim, 0).reshape(4, -1)
    cols = torch.arange(full.shape[1]).reshape(xb.shape).movedim(batch_dim, 0).reshape(4, -1)
    for s in range(4):
        torch.testing.assert_close(full[rows[s]][:, cols[s]], per[s].reshape(3, 3))
    v = randn(12, gen=gen)
    torch.testing.assert_close(J @ v, full @ v)


def test_batch_coupling_is_an_error() -> None:
    with pytest.raises(tj.BatchCouplingError, match="JacobianOperator"):
        tj.JacobianOperator(lambda x: x - x.mean(0), torch.randn(5, 2, dtype=D), batch_dim=0)


def _mlp(seed: int = 0, dropout: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 5), nn.Tanh()] + ([nn.Dropout(0.5)] if dropout else [])
    return nn.Sequential(*layers, nn.Linear(5, 2)).double()


def _param_oracle(
    model: nn.Module, x: Tensor, names: list[str] | None = None, rows: int | None = None
) -> Tensor:
    params = {k: v.detach() for k, v in model.named_parameters() if names is None or k in names}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    return _flat(jac, x.shape[0] * 2 if rows is None else rows)


def test_module_one_batch_and_params_subset(gen: torch.Generator) -> None:
    model, x = _mlp(), randn(6, 3, gen=gen)
    J = tj.JacobianOperator.from_module(model, x)
    want = _param_oracle(model, x)
    torch.testing.assert_close(J.to_dense(), want)
    torch.testing.assert_close(J.to_dense(), _flat(tj.param_jacobian(model, x), 12))
    sub = tj.JacobianOperator.from_module(model, x, params=["2.weight"])
    torch.testing.assert_close(sub.to_dense(), _param_oracle(model, x, ["2.weight"]))
    V, U = randn(J.shape[1], 4, gen=gen), randn(12, 3, gen=gen)
    for chunk in (1, 3, None):
        Jc = tj.JacobianOperator.from_module(model, x, chunk_size=chunk)
        torch.testing.assert_close(Jc @ V, want @ V)
        torch.testing.assert_close(Jc.T @ U, want.T @ U)


@pytest.mark.parametrize("option", [{"padding_idx": 1}, {"scale_grad_by_freq": True}])
def test_embedding_products_agree_with_the_dense_operator(
    gen: torch.Generator, option: dict
) -> None:
    """``J @ v`` (forward mode) takes the embedding's derivative as its backward defines it:
    the padding row's columns are zero, rows divided by the indices' counts."""
    model = nn.Sequential(nn.Embedding(4, 2, **option), nn.Flatten(), nn.Tanh(), nn.Linear(6, 2))
    model = model.to(D)
    idx = torch.tensor([[1, 3, 3], [0, 1, 3]])
    J = tj.JacobianOperator.from_module(model, idx)
    want = _param_oracle(model, idx)
    torch.testing.assert_close(J.to_dense(), want)
    V = randn(J.shape[1], 3, gen=gen)
    torch.testing.assert_close(J @ V, want @ V)
    torch.testing.assert_close(J @ V[:, 0], want @ V[:, 0])


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.att(x, x, x, need_weights=False)[0]).flatten(1)


def test_attention_products_use_a_differentiable_kernel(gen: torch.Generator) -> None:
    """``nn.MultiheadAttention`` runs the fused CPU kernel, which has neither forward-mode AD nor
    a double backward: ``J @ V`` runs it as the math kernel (NOTE [fused attention])."""
    torch.manual_seed(0)
    model, x = _Attention().to(D), randn(2, 3, 4, gen=gen)
    J = tj.JacobianOperator.from_module(model, x)
    with sdpa_kernel(SDPBackend.MATH):  # the oracle: jacrev batches the backward
        want = _flat(
            jacrev(lambda p: functional_call(model, p, (x,)))(dict(model.named_parameters())), 6
        )
    V, U = randn(J.shape[1], 2, gen=gen), randn(6, 2, gen=gen)
    torch.testing.assert_close(J @ V, want @ V)
    torch.testing.assert_close(J.T @ U, want.T @ U)
    torch.testing.assert_close(J.to_dense(), want)


@pytest.mark.filterwarnings("ignore:.*performance drop.*:UserWarning")
def test_embedding_bag_products_by_rows_when_no_mode_follows(gen: torch.Generator) -> None:
    """``embedding_bag`` has neither forward-mode AD nor a double backward: ``J @ V`` takes the
    rows of ``J`` by reverse mode, a chunk at a time, with one warning (it raised)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(5, 3, mode="mean"), nn.Linear(3, 2)).to(D)
    idx = torch.tensor([[0, 4, 4], [2, 1, 0]])
    want = _param_oracle(model, idx)
    V = randn(want.shape[1], 3, gen=gen)
    for chunk in (1, None):
        J = tj.JacobianOperator.from_module(model, idx, chunk_size=chunk)
        with pytest.warns(tj.FallbackWarning, match="by rows of J") as record:
            got = J @ V
        assert len([w for w in record if issubclass(w.category, tj.FallbackWarning)]) == 1
        torch.testing.assert_close(got, want @ V)


def test_group_norm_on_channels_last_in_forward_mode(gen: torch.Generator) -> None:
    """torch's forward AD of ``group_norm`` fails on a channels-last input (a ``view`` error):
    forward-mode products give it the input contiguous (NOTE [embedding forward rules])."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten())
    net = net.to(D).to(memory_format=torch.channels_last)
    x = randn(1, 2, 3, 3, gen=gen)
    J = tj.JacobianOperator(net, x)
    want = jacrev(net)(x).reshape(36, 18)
    v = randn(18, gen=gen)
    torch.testing.assert_close(J @ v, want @ v)
    P = tj.JacobianOperator.from_module(net, x)
    V = randn(P.shape[1], 2, gen=gen)
    torch.testing.assert_close(P @ V, _param_oracle(net, x, rows=36) @ V)


def test_module_kwargs_reach_every_call(gen: torch.Generator) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2).double()

        def forward(self, x: Tensor, *, scale: float) -> Tensor:
            return scale * self.lin(x)

    model, x = Scaled(), randn(3, 2, gen=gen)
    J = tj.JacobianOperator.from_module(model, data=[x, x], scale=3.0)
    one = _flat(tj.param_jacobian(model, x, scale=3.0), 6)
    torch.testing.assert_close(J.to_dense(), torch.cat([one, one]))


@pytest.mark.parametrize("kind", ["list", "dataloader", "tuples"])
def test_data_rows_are_stacked_in_order(kind: str, gen: torch.Generator) -> None:
    model, x = _mlp(), randn(10, 3, gen=gen)
    if kind == "list":
        data: Any = [x[:4], x[4:7], x[7:]]
    elif kind == "tuples":
        data = [(x[:5],), (x[5:],)]
    else:
        data = DataLoader(TensorDataset(x), batch_size=4, shuffle=False)
    J = tj.JacobianOperator.from_module(model, data=data)
    want = _param_oracle(model, x)  # the whole set as one batch: samples are independent
    assert J.shape == want.shape
    torch.testing.assert_close(J.to_dense(), want)
    V, U = randn(J.shape[1], 3, gen=gen), randn(20, 2, gen=gen)
    for chunk in (1, None):
        Jc = tj.JacobianOperator.from_module(model, data=data, chunk_size=chunk)
        torch.testing.assert_close(Jc @ V, want @ V)
        torch.testing.assert_close(Jc.T @ U, want.T @ U)


def test_graph_operator_keeps_the_graph(gen: torch.Generator) -> None:
    w = randn(3, 3, gen=gen, grad=True)
    x = randn(3, gen=gen, grad=True)
    want = _oracle(lambda w_, x_: (torch.tanh(w_ @ x_), (x_**3).sum()), (w, x))
    J = tj.JacobianOperator.from_graph([torch.tanh(w @ x), (x**3).sum()], {"w": w, "x": x})
    torch.testing.assert_close(J.to_dense(), want)  # the outputs are referenced by J alone
    v, u = randn(12, gen=gen), randn(4, gen=gen)
    for _ in range(2):  # products never free the graph
        torch.testing.assert_close(J @ v, want @ v)
        torch.testing.assert_close(J.T @ u, want.T @ u)
    y = torch.tanh(w @ x)
    jac = tj.jac(y, [w, x], retain_graph=True)
    torch.testing.assert_close(tj.JacobianOperator.from_graph(y, [w, x]).to_dense(), _flat(jac, 3))


def test_graph_unused_input_gives_zero_columns(gen: torch.Generator) -> None:
    x, z = randn(2, gen=gen, grad=True), randn(3, gen=gen, grad=True)
    J = tj.JacobianOperator.from_graph(x * 2, [x, z])
    torch.testing.assert_close(
        J.to_dense(), torch.cat([2 * torch.eye(2, dtype=D), torch.zeros(2, 3, dtype=D)], 1)
    )


def test_to_scipy_is_float64_and_svds_matches_the_dense_svd(gen: torch.Generator) -> None:
    from scipy.sparse.linalg import lsmr, svds

    model = _mlp().float()
    x = torch.randn(40, 3)
    J = tj.JacobianOperator.from_module(model, data=[x[:25], x[25:]])
    A = J.to_scipy()
    assert A.shape == J.shape and A.dtype == np.float64
    dense = J.to_dense().double()
    got = np.sort(svds(A, k=4, return_singular_vectors=False))[::-1]
    np.testing.assert_allclose(got, torch.linalg.svdvals(dense)[:4].numpy(), rtol=1e-5)
    b = np.random.default_rng(0).standard_normal(J.shape[0])
    assert A.matvec(np.ones(J.shape[1])).dtype == np.float64
    A64 = tj.JacobianOperator.from_module(model.double(), x.double()).to_scipy()
    sol = lsmr(A64, b, damp=0.1, atol=1e-14, btol=1e-14, maxiter=2000)[0]
    d = dense.numpy()
    want = np.linalg.solve(d.T @ d + 0.01 * np.eye(J.shape[1]), d.T @ b)  # damped normal eqs
    np.testing.assert_allclose(sol, want, rtol=1e-4, atol=1e-4)


def test_model_rng_and_buffers_untouched_and_one_draw(gen: torch.Generator) -> None:
    model = _mlp(dropout=True)
    model.add_module("bn", nn.BatchNorm1d(2).double())  # train mode: running stats would move
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    before = [(n, t.clone()) for n, t in model.state_dict().items()]
    x = randn(8, 3, gen=gen)
    torch.manual_seed(5)
    J = tj.JacobianOperator.from_module(model, x)
    rng = torch.get_rng_state()
    dense = J.to_dense()
    torch.manual_seed(5)  # the draw of a plain call at construction: param_jacobian's draw
    torch.testing.assert_close(dense, _flat(tj.param_jacobian(model, x), 16))
    torch.set_rng_state(rng)
    v = randn(J.shape[1], gen=gen)
    torch.testing.assert_close(J @ v, dense @ v)  # one fixed J for every product
    torch.testing.assert_close(J.T @ (J @ v), dense.T @ (dense @ v))
    V = randn(J.shape[1], 8, gen=gen)  # vmap over the columns: the same draw for each
    torch.testing.assert_close(J @ V, dense @ V)
    assert torch.equal(torch.get_rng_state(), rng)
    for (n, t), (n2, t2) in zip(before, model.state_dict().items()):
        assert n == n2 and torch.equal(t, t2), n
    assert torch.equal(first.grad, torch.ones_like(first)) and isinstance(first, nn.Parameter)


def test_function_inputs_are_copied_and_rng_restored(gen: torch.Generator) -> None:
    x = randn(4, gen=gen)
    J = tj.JacobianOperator(lambda t: nn.functional.dropout(t, 0.5) * t, x)
    rng = torch.get_rng_state()
    first = J.to_dense()
    x.mul_(10)  # J was taken at the inputs as they were
    torch.testing.assert_close(J.to_dense(), first)
    assert torch.equal(torch.get_rng_state(), rng)


def test_fast_paths_do_not_matter(gen: torch.Generator) -> None:
    model, x = _mlp(), randn(5, 3, gen=gen)
    v = randn(sum(p.numel() for p in model.parameters()), gen=gen)
    on = tj.JacobianOperator.from_module(model, x) @ v
    with fast_paths(False):
        off = tj.JacobianOperator.from_module(model, x) @ v
    torch.testing.assert_close(on, off)


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_forward_ad_missing_falls_back_with_one_warning(gen: torch.Generator) -> None:
    x = randn(3, gen=gen)
    J = tj.JacobianOperator(_NoJvp.apply, x)
    with pytest.warns(tj.FallbackWarning, match="double backward"):
        got = J @ torch.ones(3, dtype=D)
    torch.testing.assert_close(got, 2 * x)


def test_block_products_take_any_layout_of_v(gen: torch.Generator) -> None:
    """``J @ V`` for a block ``V`` given as a transposed view, over a matrix and a 0-d input,
    by forward mode and by the double-backward fallback: both equal the dense Jacobian's."""
    a, s = randn(2, 3, gen=gen), randn(gen=gen)
    V = randn(4, 7, gen=gen).T  # [7, 4], not contiguous
    want = torch.cat([j.reshape(6, -1) for j in tj.jacobian(lambda a, s: a.sin() * s, (a, s))], 1)
    got = tj.JacobianOperator(lambda a, s: a.sin() * s, (a, s)) @ V
    torch.testing.assert_close(got, want @ V)
    J = tj.JacobianOperator(lambda a, s: _NoJvp.apply(a) * s, (a, s))
    want = torch.cat([torch.diag(2 * a.flatten() * s), (a**2).reshape(6, 1)], 1)
    with pytest.warns(tj.FallbackWarning, match="double backward"):
        got = J @ V
    torch.testing.assert_close(got, want @ V)
    assert V.stride() == (1, 7)  # V untouched


def test_signatures_are_the_contract() -> None:
    import inspect

    def described(fn: Any) -> list[tuple[str, str, Any]]:
        params = inspect.signature(fn).parameters.values()
        return [(p.name, p.kind.name, p.default) for p in params]

    empty = inspect.Parameter.empty
    assert described(tj.JacobianOperator) == [
        ("func", "POSITIONAL_OR_KEYWORD", empty),
        ("inputs", "POSITIONAL_OR_KEYWORD", empty),
        ("batch_dim", "KEYWORD_ONLY", None),
        ("chunk_size", "KEYWORD_ONLY", None),
        ("max_memory", "KEYWORD_ONLY", None),
        ("process_group", "KEYWORD_ONLY", None),
    ]
    assert described(tj.JacobianOperator.from_module) == [
        ("model", "POSITIONAL_OR_KEYWORD", empty),
        ("args", "VAR_POSITIONAL", empty),
        ("params", "KEYWORD_ONLY", None),
        ("data", "KEYWORD_ONLY", None),
        ("chunk_size", "KEYWORD_ONLY", None),
        ("max_memory", "KEYWORD_ONLY", None),
        ("process_group", "KEYWORD_ONLY", None),
        ("kwargs", "VAR_KEYWORD", empty),
    ]
    assert described(tj.JacobianOperator.from_graph) == [
        ("outputs", "POSITIONAL_OR_KEYWORD", empty),
        ("inputs", "POSITIONAL_OR_KEYWORD", empty),
        ("chunk_size", "KEYWORD_ONLY", None),
        ("max_memory", "KEYWORD_ONLY", None),
    ]
    doc = inspect.getdoc(tj.JacobianOperator) or ""
    assert ":math:" in doc and "Example" in doc and "tj.JacobianOperator(" in doc


def test_one_forward_per_batch_and_chunk(gen: torch.Generator) -> None:
    model, x = _mlp(), randn(9, 3, gen=gen)
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        J = tj.JacobianOperator.from_module(model, data=list(x.split(3)), chunk_size=2)
        assert len(calls) == 3  # building: one evaluation per batch (the rows' shapes)
        calls.clear()
        J.T @ randn(18, 4, gen=gen)  # one forward per batch, two backward chunks on its graph
        assert len(calls) == 3
        calls.clear()
        J @ randn(J.shape[1], 4, gen=gen)  # one jvp pass per batch and chunk of 2 columns
        assert len(calls) == 6
    finally:
        handle.remove()


def test_graph_products_leave_retained_grads_alone(gen: torch.Generator) -> None:
    x = randn(3, gen=gen, grad=True)
    y = x.sin()
    y.retain_grad()
    mark = torch.full((3,), 7.0, dtype=D)
    y.grad = mark
    J = tj.JacobianOperator.from_graph(y * x, [x, y])  # y is an input and on the path
    J @ randn(6, 2, gen=gen)
    J.T @ randn(3, gen=gen)
    J.to_dense()
    assert y.grad is mark and torch.equal(mark, torch.full((3,), 7.0, dtype=D)) and x.grad is None
