"""``tj.jac``: chain rule (``jac_outputs``), the seeds' examples, higher order, graph retention."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from conftest import randn
from torch import Tensor
from torch.func import hessian, jacrev

import torchjac as tj

MODES = ["auto", "rev", "fwd"]
CHUNKS = [None, 1, 2, 10_000]


# --- seed 004: TorchJD's three documentation examples, with their exact numbers -------------


@pytest.mark.parametrize("mode", MODES)
def test_seed004_two_quantities_of_one_param(mode: str) -> None:
    param = torch.tensor([1.0, 2.0], requires_grad=True)
    y1 = torch.tensor([-1.0, 1.0]) @ param
    y2 = (param**2).sum()
    jacobians = tj.jac([y1, y2], [param], mode=mode)
    assert isinstance(jacobians, tuple) and len(jacobians) == 1
    assert torch.equal(jacobians[0], torch.tensor([[-1.0, 1.0], [2.0, 4.0]]))


@pytest.mark.parametrize("mode", MODES)
def test_seed004_gramian_of_combined_jacobian(mode: str) -> None:
    weight = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    bias = torch.tensor([0.5, -0.5], requires_grad=True)
    input_vec = torch.tensor([1.0, -1.0])
    y1 = weight @ input_vec + bias
    y2 = (weight**2).sum() + (bias**2).sum()
    jacobians = tj.jac([y1, y2], [weight, bias], mode=mode)
    assert [j.shape for j in jacobians] == [(3, 2, 2), (3, 2)]
    combined = torch.concat([j.flatten(1) for j in jacobians], dim=1)
    gramian = combined @ combined.T
    expected = torch.tensor([[3.0, 0.0, -1.0], [0.0, 3.0, -3.0], [-1.0, -3.0, 122.0]])
    assert torch.equal(gramian, expected)


@pytest.mark.parametrize("mode", MODES)
def test_seed004_chain_rule_in_two_steps(mode: str) -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    h = x**2
    y1 = h.sum()
    y2 = torch.tensor([1.0, -1.0]) @ h
    jac_h = tj.jac([y1, y2], [h], mode=mode)[0]
    assert torch.equal(jac_h, torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    jac_x = tj.jac(h, [x], jac_outputs=jac_h, mode=mode)[0]
    assert torch.equal(jac_x, torch.tensor([[2.0, 4.0], [2.0, -4.0]]))


# --- jac_outputs in every mode, chunk size, and per sample -----------------------------------


def _mlp(x: Tensor, w: Tensor) -> Tensor:
    return torch.tanh(x @ w.T) * x.sum(-1, keepdim=True)


@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("mode", MODES)
def test_jac_outputs_left_multiplies(mode: str, chunk_size: int | None, gen) -> None:
    x, w = randn(3, 4, gen=gen, grad=True), randn(2, 4, gen=gen, grad=True)
    a = randn(5, 3, 2, gen=gen)  # k = 5 rows
    y = _mlp(x, w)
    got = tj.jac(y, {"x": x, "w": w}, a, mode=mode, chunk_size=chunk_size)
    jx, jw = jacrev(_mlp, argnums=(0, 1))(x.detach(), w.detach())
    assert list(got) == ["x", "w"]
    torch.testing.assert_close(got["x"], torch.einsum("kab,abcd->kcd", a, jx))
    torch.testing.assert_close(got["w"], torch.einsum("kab,abcd->kcd", a, jw))


@pytest.mark.parametrize("mode", MODES)
def test_jac_outputs_sequence_of_outputs(mode: str, gen) -> None:
    x = randn(3, gen=gen, grad=True)
    y1, y2 = x.sin() * x, (x**3).sum()
    a1, a2 = randn(4, 3, gen=gen), randn(4, gen=gen)
    (got,) = tj.jac([y1, y2], [x], [a1, a2], mode=mode)
    j1 = torch.diag(x.detach().cos() * x.detach() + x.detach().sin())
    j2 = 3 * x.detach() ** 2
    torch.testing.assert_close(got, a1 @ j1 + a2[:, None] * j2[None, :])


@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("mode", MODES)
def test_jac_outputs_with_batch_dim(mode: str, chunk_size: int | None, gen) -> None:
    x, w = randn(3, 4, gen=gen, grad=True), randn(2, 4, gen=gen)
    a = randn(5, 3, 2, gen=gen)  # [k, B, out_rest]: sample b is left-multiplied by a[:, b]
    y = _mlp(x, w)
    got = tj.jac(y, x, a, batch_dim=0, mode=mode, chunk_size=chunk_size)
    full = jacrev(_mlp)(x.detach(), w)  # [B, 2, B, 4]
    per_sample = torch.stack([full[b, :, b] for b in range(3)])  # [B, 2, 4]
    expected = torch.einsum("kbo,boi->bki", a, per_sample)
    assert got.shape == (3, 5, 4)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_jac_outputs_sequence_with_batch_dim(mode: str, chunk_size: int | None, gen) -> None:
    x, w = randn(3, 2, gen=gen, grad=True), randn(2, 2, gen=gen)

    def f(x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(x @ w), (x**2).sum(-1)

    y1, y2 = f(x)
    a1, a2 = randn(4, 3, 2, gen=gen), randn(4, 3, gen=gen)
    got = tj.jac([y1, y2], x, [a1, a2], batch_dim=0, mode=mode, chunk_size=chunk_size)
    j1, j2 = jacrev(f)(x.detach())  # [3, 2, 3, 2], [3, 3, 2]
    per1 = torch.stack([j1[b, :, b] for b in range(3)])
    per2 = torch.stack([j2[b, b] for b in range(3)])
    want = torch.einsum("kbo,boi->bki", a1, per1) + torch.einsum("kb,bi->bki", a2, per2)
    assert got.shape == (3, 4, 2)
    torch.testing.assert_close(got, want)


# --- seed 000: Jacobian of the parameter gradients w.r.t. the model output -------------------


def seed000_jacobian(input: Sequence[Tensor], wrt: Sequence[Tensor], create_graph=False):
    """The seed's own row-by-row method (``eye`` basis, one ``autograd.grad`` per row)."""
    flat_input = torch.cat([i.reshape(-1) for i in input])
    grad_outputs = torch.eye(len(flat_input), device=input[0].device, dtype=input[0].dtype)
    rows = []
    for i in range(flat_input.numel()):
        rows.append(
            torch.autograd.grad(
                flat_input,
                wrt,
                grad_outputs[i],
                retain_graph=True,
                create_graph=create_graph,
                allow_unused=True,
            )
        )
    return [torch.stack(z) for z in zip(*rows)]


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_seed000_jacobian_of_gradients_wrt_output(mode: str, chunk_size: int | None) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model = model.double()
    outputs = model(torch.randn(2, dtype=torch.float64))
    loss = (outputs**2).mean()
    params = list(model.parameters())

    grad = seed000_jacobian([loss], params, create_graph=True)
    expected = seed000_jacobian(grad, [outputs])[0]  # [17, 2]

    grads = torch.autograd.grad(loss, params, create_graph=True)
    (got,) = tj.jac(list(grads), [outputs], mode=mode, chunk_size=chunk_size, retain_graph=True)
    assert got.shape == expected.shape == (sum(p.numel() for p in params), 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)

    # the same with the gradients themselves from tj.jac(create_graph=True)
    tj_grads = tj.jac(loss, params, create_graph=True)
    assert all(g.requires_grad for g in tj_grads)
    (again,) = tj.jac(list(tj_grads), [outputs], mode=mode, chunk_size=chunk_size)
    torch.testing.assert_close(again, expected, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in params)


# --- create_graph: differentiable results, second order --------------------------------------


def _scalar_fn(x: Tensor) -> Tensor:
    return (x.sin() * x.roll(1)).sum() + (x**3).prod()


# torch.func.hessian's forward AD loads decompositions that call the deprecated torch.jit.script
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("mode", MODES)
def test_create_graph_second_order_matches_hessian(mode: str, gen) -> None:
    x = randn(4, gen=gen, grad=True)
    g = tj.jac(_scalar_fn(x), x, create_graph=True, mode=mode)
    assert g.requires_grad
    h = tj.jac(g, x, mode=mode)
    torch.testing.assert_close(h, hessian(_scalar_fn)(x.detach()))


@pytest.mark.parametrize("mode", MODES)
def test_create_graph_result_backpropagates(mode: str, gen) -> None:
    x = randn(3, gen=gen, grad=True)
    j = tj.jac(torch.tanh(x) * x.sum(), x, create_graph=True, mode=mode)  # [3, 3]
    (got,) = torch.autograd.grad((j**2).sum(), x)

    def frob(x: Tensor) -> Tensor:
        return (jacrev(lambda z: torch.tanh(z) * z.sum())(x) ** 2).sum()

    torch.testing.assert_close(got, jacrev(frob)(x.detach()))


def test_without_create_graph_the_result_is_detached(gen) -> None:
    x = randn(3, gen=gen, grad=True)
    assert not tj.jac(x.exp(), x).requires_grad


# --- retain_graph defaults to create_graph, as in torch.autograd.grad ------------------------


# NOTE [retain_graph] in graph_release.py: the probes keep the graph and one release pass frees
# it, whatever the plan (every plan: test_graph_retain.py).
@pytest.mark.parametrize("chunk_size", [1, 2])
def test_default_frees_the_graph_like_autograd(chunk_size: int, gen) -> None:
    x = randn(3, gen=gen, grad=True)
    y = torch.tanh(x) * 2
    torch.autograd.grad(y.sum(), x)
    with pytest.raises(RuntimeError, match="backward through the graph a second time") as ref:
        torch.autograd.grad(y.sum(), x)

    y = torch.tanh(x) * 2
    tj.jac(y, x, mode="rev", chunk_size=chunk_size)
    with pytest.raises(RuntimeError, match="backward through the graph a second time") as got:
        torch.autograd.grad(y.sum(), x)
    assert type(got.value) is type(ref.value)


@pytest.mark.parametrize("kwargs", [{"retain_graph": True}, {"create_graph": True}])
@pytest.mark.parametrize("mode", MODES)
def test_retained_graph_can_be_used_again(mode: str, kwargs: dict, gen) -> None:
    x = randn(3, gen=gen, grad=True)
    y = torch.tanh(x) * 2
    first = tj.jac(y, x, mode=mode, **kwargs)
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)  # the graph is still there
    torch.testing.assert_close(g, first.sum(0))
    torch.testing.assert_close(tj.jac(y, x, mode=mode), first.detach())


@pytest.mark.parametrize("mode", MODES)
def test_create_graph_under_no_grad_is_differentiable_like_autograd(mode: str, gen) -> None:
    x = randn(3, gen=gen, grad=True)
    y = _scalar_fn(x)
    with torch.no_grad():
        (ref,) = torch.autograd.grad(y, x, create_graph=True, retain_graph=True)
        got = tj.jac(y, x, create_graph=True, mode=mode)
        assert not torch.is_grad_enabled()  # the user's grad mode is kept
    assert ref.requires_grad and got.requires_grad
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(tj.jac(got, x), jacrev(jacrev(_scalar_fn))(x.detach()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_gramian_with_create_graph_under_no_grad_has_a_graph(
    mode: str, chunk_size: int | None, gen
) -> None:
    """The Gramian's final reshape happens with the graph on: a leaf claiming requires_grad
    (a view made under no_grad) would carry no derivative at all."""
    x = randn(3, gen=gen, grad=True)
    y = torch.tanh(x) * x.sum()
    with torch.no_grad():
        got = tj.gramian(y, x, create_graph=True, mode=mode, chunk_size=chunk_size)
        assert not torch.is_grad_enabled()
    assert got.grad_fn is not None

    def gram(x: torch.Tensor) -> torch.Tensor:
        j = jacrev(lambda x: torch.tanh(x) * x.sum())(x)
        return j @ j.T

    torch.testing.assert_close(got, gram(x.detach()))
    (g,) = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(g, jacrev(lambda x: gram(x).sum())(x.detach()))


@pytest.mark.parametrize("steps", [1, 5000])  # a graph the count walks whole, and a longer one
@pytest.mark.parametrize("fn", ["jac", "gramian"])
def test_create_graph_through_fused_norms_warns(steps: int, fn: str, gen) -> None:
    """NOTE [exact norms]: a graph the user built through torch's fused layer_norm or train-mode
    batch_norm cannot be rewritten; create_graph=True says so, and only then."""
    x = randn(4, 3, gen=gen, grad=True)
    for norm in (
        lambda h: torch.nn.functional.layer_norm(h, (3,)),
        lambda h: torch.nn.functional.batch_norm(h, None, None, training=True),
    ):
        y = norm(x)
        for _ in range(steps - 1):
            y = y * 1.0
        with pytest.warns(UserWarning, match=f"{fn}: create_graph=True.*fused"):
            getattr(tj, fn)(y, x, create_graph=True)
        getattr(tj, fn)(y, x, retain_graph=True)  # no warning without create_graph
    rm, rv = torch.zeros(3, dtype=x.dtype), torch.ones(3, dtype=x.dtype)
    y = torch.nn.functional.batch_norm(x, rm, rv, training=False)  # eval: exact to every order
    getattr(tj, fn)(y, x, create_graph=True)
