"""``create_graph=True``: gradients of derivatives with respect to parameters and inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import randn
from test_functional import MODES, mlp
from torch import Tensor
from torch.func import hessian, vmap

import torchjac as tj


def test_pinn_residual_loss_parameter_gradient(gen: torch.Generator) -> None:
    net = mlp(gen, (2, 8, 8, 1))
    xt = randn(6, 2, gen=gen)
    lap = tj.laplacian(net, xt, batch_dim=0, create_graph=True)
    jac = tj.jacobian(net, xt, batch_dim=0, create_graph=True)
    loss = ((jac[:, 0, 1] - lap[:, 0]) ** 2).mean()
    params = list(net.parameters())[:-1]  # derivatives do not depend on the last bias
    got = torch.autograd.grad(loss, params)

    x = xt.clone().requires_grad_(True)
    u = net(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap_ref = sum(
        torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(2)
    )
    ref_loss = ((du[:, 1] - lap_ref) ** 2).mean()
    ref = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(got, ref)
    assert all(p.grad is None for p in net.parameters())


def _oracle(fn: str, net: Any, x: Tensor) -> Tensor:
    """``fn``'s per-sample result by torch.func (differentiable, like the input and net)."""
    h = vmap(hessian(net))(x)
    return {
        "hessian": h,
        "hessian_diagonal": h.diagonal(dim1=-2, dim2=-1),
        "laplacian": h.diagonal(dim1=-2, dim2=-1).sum(-1),
        "jacobian": vmap(torch.func.jacrev(net))(x),
    }[fn]


@pytest.mark.parametrize("fn", ["hessian", "hessian_diagonal", "laplacian", "jacobian"])
def test_create_graph_parameter_gradients_every_front_door(gen: torch.Generator, fn: str) -> None:
    net = mlp(gen, (3, 6, 2))
    x = randn(4, 3, gen=gen)
    params = list(net.parameters())[:-1]
    got = getattr(tj, fn)(net, x, batch_dim=0, create_graph=True)
    plain = getattr(tj, fn)(net, x, batch_dim=0)
    assert not plain.requires_grad
    ref = _oracle(fn, net, x)
    torch.testing.assert_close(got, ref)
    w = torch.linspace(-1, 1, got.numel(), dtype=got.dtype).view_as(got)
    grads = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    refs = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for g, r in zip(grads, refs):
        if r is None:
            assert g is None or bool((g == 0).all())
        else:
            torch.testing.assert_close(g, r)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", ["jacobian", "hessian", "hessian_diagonal", "laplacian"])
def test_create_graph_input_gradients(gen: torch.Generator, fn: str, mode: str) -> None:
    net = mlp(gen, (3, 6, 2))
    x = randn(4, 3, gen=gen, grad=True)
    ref = _oracle(fn, net, x)
    got = getattr(tj, fn)(net, x, batch_dim=0, mode=mode, create_graph=True)
    (g,) = torch.autograd.grad((got**2).sum(), x)
    (r,) = torch.autograd.grad((ref**2).sum(), x)
    torch.testing.assert_close(g, r)
    assert x.grad is None


def _written_out(norm: str, h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """LayerNorm over the last dim, or BatchNorm with batch statistics, in elementary ops."""
    dims = -1 if norm == "layer" else 0
    c = h - h.mean(dims, keepdim=True)
    return c * torch.rsqrt((c * c).mean(dims, keepdim=True) + 1e-5) * w + b


@pytest.mark.parametrize("fn", ["jacobian", "hessian", "laplacian"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_create_graph_through_fused_norms_is_exact(
    gen: torch.Generator, fn: str, mode: str, norm: str
) -> None:
    """NOTE [exact norms]: torch's fused layer/batch norm differentiate wrongly at order 3 (and
    in mixed second derivatives); a derivative of a Hessian through one must still be right."""
    lin1, lin2 = randn(3, 2, gen=gen), randn(1, 3, gen=gen)
    w, b = randn(3, gen=gen), randn(3, gen=gen)
    params = [t.clone().requires_grad_(True) for t in (lin1, lin2, w, b)]
    x = randn(4, 2, gen=gen)

    def net(ps: list[Tensor], fused: bool) -> Any:
        def f(x: Tensor) -> Tensor:
            h = x @ ps[0].T
            if not fused:
                h = _written_out(norm, h, ps[2], ps[3])
            elif norm == "layer":
                h = torch.nn.functional.layer_norm(h, (3,), ps[2], ps[3])
            else:
                h = torch.nn.functional.batch_norm(h, None, None, ps[2], ps[3], training=True)
            return (h.tanh() @ ps[1].T).sin()

        return f

    got = getattr(tj, fn)(net(params, True), x, mode=mode, create_graph=True)
    r = randn(*got.shape, gen=gen)
    grads = torch.autograd.grad((got * r).sum(), params, allow_unused=True)

    ref_params = [t.detach().clone().requires_grad_(True) for t in params]
    f = net(ref_params, False)
    if fn == "jacobian":
        want = torch.func.jacrev(f)(x)
    else:
        h = hessian(f)(x)  # [4, 1, 4, 2, 4, 2]
        want = h if fn == "hessian" else h.flatten(2, 3).flatten(3).diagonal(0, 2, 3).sum(-1)
    torch.testing.assert_close(got, want)
    refs = torch.autograd.grad((want * r).sum(), ref_params, allow_unused=True)
    for g, ref in zip(grads, refs):
        torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("fused", [True, False])
def test_nested_path_traces_again_only_for_fused_norms(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    """NOTE [exact norms]: the nested path keeps the trace made for its plan, unless that graph
    runs a fused norm; the Hessian is exact either way."""
    import torchjac._engine.func.second as second

    x, w = randn(8, gen=gen), randn(8, gen=gen)
    traces: list[int] = []
    trace = second.autograd_trace
    monkeypatch.setattr(second, "autograd_trace", lambda *a: traces.append(1) or trace(*a))

    def f(x: Tensor) -> Tensor:
        h = torch.nn.functional.layer_norm(x, (8,), w) if fused else _written_out("layer", x, w, 0)
        return (h * x).sum().sin()

    got = tj.hessian(f, x)  # 8 inputs, one output: nested AD is the plan
    torch.testing.assert_close(
        got, hessian(lambda x: (_written_out("layer", x, w, 0) * x).sum().sin())(x)
    )
    assert len(traces) == (2 if fused else 1)


@pytest.mark.parametrize("mode", ["fwd", "auto"])
def test_create_graph_linear_on_the_input_times_a_function_of_it(
    gen: torch.Generator, mode: str
) -> None:
    # F.linear on the input saves the input's value row for the weight's gradient; the product
    # then reads the input's one-hot first order, which was written in place into the same
    # stack: the result's graph raised "modified by an inplace operation" on backward
    w = randn(4, 2, gen=gen).requires_grad_()
    x = randn(3, 2, gen=gen)

    def f(x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, w) * x.sum(-1, keepdim=True)

    got = tj.jacobian(f, x, batch_dim=0, mode=mode, create_graph=True)
    want = vmap(torch.func.jacrev(f))(x)
    torch.testing.assert_close(got, want)
    (g,) = torch.autograd.grad(got.pow(2).sum(), w)
    (g_want,) = torch.autograd.grad(want.pow(2).sum(), w)
    torch.testing.assert_close(g, g_want)


_NORMS = {
    "normalize": lambda h: torch.nn.functional.normalize(h, dim=-1),
    "Tensor.norm": lambda h: h.norm(dim=-1, keepdim=True) * h,
    "vector_norm": lambda h: torch.linalg.vector_norm(h, dim=-1, keepdim=True) * h,
    "linalg.norm": lambda h: torch.linalg.norm(h, dim=-1, keepdim=True) * h,
    "std": lambda h: h.std(-1, keepdim=True) * h,
    "cosine_similarity": lambda h: torch.nn.functional.cosine_similarity(
        h, h.sin(), dim=-1
    ).unsqueeze(-1),
    "pairwise_distance": lambda h: torch.nn.functional.pairwise_distance(h, h.cos(), keepdim=True),
}


@pytest.mark.parametrize("fn", ["hessian", "hessian_diagonal", "laplacian"])
@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
@pytest.mark.parametrize("norm", list(_NORMS))
def test_create_graph_through_vector_norms(
    gen: torch.Generator, fn: str, mode: str, norm: str
) -> None:
    """NOTE [vector norms with create_graph]: torch's norm backward writes in place, so a
    forward-over-reverse result's graph raised on backward; the derivative must also be right."""
    w = randn(3, 2, gen=gen).requires_grad_()
    x = randn(4, 2, gen=gen)

    def f(x: Tensor) -> Tensor:
        return _NORMS[norm](x @ w.T).sum(-1)

    got = getattr(tj, fn)(f, x, batch_dim=0, mode=mode, create_graph=True)
    jacrev = torch.func.jacrev
    h = vmap(jacrev(jacrev(f)))(x)  # [4, 2, 2]; torch.func.hessian has the in-place write
    want = {"hessian": h, "hessian_diagonal": h.diagonal(0, 1, 2)}.get(fn, h.diagonal(0, 1, 2))
    if fn == "laplacian":
        want = want.sum(-1)
    torch.testing.assert_close(got, want)
    r = randn(*got.shape, gen=gen)
    (g,) = torch.autograd.grad((got * r).sum(), w)
    (g_want,) = torch.autograd.grad((want * r).sum(), w)
    torch.testing.assert_close(g, g_want)


@pytest.mark.parametrize("norm", ["norm", "std"])
def test_create_graph_vector_norms_keep_nan(norm: str) -> None:
    # NOTE [vector norms with create_graph]: a NaN input gives NaN, as without create_graph
    x = torch.tensor([[float("nan"), 1.0], [2.0, 3.0]], dtype=torch.float64)
    f = {"norm": lambda x: x.norm(dim=1), "std": lambda x: x.std(dim=1)}[norm]
    want = tj.jacobian(f, x)
    got = tj.jacobian(f, x, create_graph=True)
    torch.testing.assert_close(got, want, equal_nan=True)
