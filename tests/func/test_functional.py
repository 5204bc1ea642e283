"""``tj.jacobian`` on functions: float64 oracles from ``torch.func``, modes, batch, errors."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from conftest import randn
from torch import Tensor
from torch.func import jacrev, vmap

import torchjac as tj

MODES = ["auto", "rev", "fwd"]


def mlp(gen: torch.Generator, sizes: tuple[int, ...] = (3, 5, 4)) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers[:-1]).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return net


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_per_sample_mlp_matches_vmap_jacrev(
    gen: torch.Generator, mode: str, chunk_size: int | None
) -> None:
    net = mlp(gen)
    x = randn(6, 3, gen=gen)
    got = tj.jacobian(net, x, batch_dim=0, mode=mode, chunk_size=chunk_size)
    torch.testing.assert_close(got, vmap(jacrev(net))(x))


@pytest.mark.parametrize("mode", MODES)
def test_full_jacobian_tuple_and_dict_inputs(gen: torch.Generator, mode: str) -> None:
    a, b = randn(2, 3, gen=gen), randn(3, gen=gen)

    def f(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sin() @ b

    ja, jb = jacrev(f, argnums=(0, 1))(a, b)
    got = tj.jacobian(f, (a, b), mode=mode)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got, (ja, jb))
    got_d = tj.jacobian(lambda d: f(d["a"], d["b"]), {"a": a, "b": b}, mode=mode)
    assert list(got_d) == ["a", "b"]
    torch.testing.assert_close(got_d["a"], ja)
    torch.testing.assert_close(got_d["b"], jb)


@pytest.mark.parametrize("mode", MODES)
def test_sequence_outputs_concatenate_rows_and_aux(gen: torch.Generator, mode: str) -> None:
    x = randn(4, 2, gen=gen)

    def f(x: Tensor) -> tuple[list[Tensor], Tensor]:
        return [x.exp(), x[:, :1] * x[:, 1:]], x.sum()

    jac, aux = tj.jacobian(f, x, batch_dim=0, mode=mode, has_aux=True)
    assert jac.shape == (4, 3, 2)
    ref = vmap(jacrev(lambda r: torch.cat([r.exp(), r[:1] * r[1:]])))(x)
    torch.testing.assert_close(jac, ref)
    torch.testing.assert_close(aux, x.sum())


def test_scalar_output_and_nonzero_batch_dim(gen: torch.Generator) -> None:
    x = randn(3, 5, gen=gen)  # batch at dim 1
    got = tj.jacobian(lambda x: (x**2)[:2], x, batch_dim=1)
    ref = torch.zeros(5, 2, 3, dtype=x.dtype)
    ref[:, 0, 0], ref[:, 1, 1] = 2 * x[0], 2 * x[1]
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(tj.jacobian(lambda x: (x**3).sum(), x), 3 * x**2)


def test_create_graph_gives_parameter_gradients(gen: torch.Generator) -> None:
    net = mlp(gen)
    x = randn(5, 3, gen=gen)
    j = tj.jacobian(net, x, batch_dim=0, create_graph=True)
    loss = (j**2).sum()
    params = list(net.parameters())[:-1]  # the Jacobian does not depend on the last bias
    grads = torch.autograd.grad(loss, params)
    ref_loss = (vmap(jacrev(net))(x) ** 2).sum()
    ref = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(grads, ref)
    plain = tj.jacobian(net, x, batch_dim=0)
    assert not plain.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_data_dependent_control_flow_on_values_needs_no_fallback(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)

    def f(x: Tensor) -> Tensor:
        return x.sin() * 2 if x.sum() > 0 else x.cos()

    for mode in MODES:
        torch.testing.assert_close(tj.jacobian(f, x, batch_dim=0, mode=mode), _loop_jac(f, x))


def _loop_jac(f, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    full = jacrev(f)(x)  # [B, o, B, i]
    return torch.stack([full[b, :, b] for b in range(x.shape[0])])


class SavedCube(torch.autograd.Function):
    """x³ saving its input (new style: torch.func can call it); subclasses give the backward."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(inputs[0])


class Cube(SavedCube):
    """x³ with a backward that branches on the cotangent (no vmap) and no forward-mode rule."""

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[no-untyped-def,override]
        (x,) = ctx.saved_tensors
        if g.abs().sum() > 0:  # data-dependent: fails under vmap
            return g * 3 * x**2
        return torch.zeros_like(g)


class OldCube(torch.autograd.Function):
    """x³ as an old-style Function (no ``setup_context``): torch.func cannot call it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def,override]
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[no-untyped-def,override]
        (x,) = ctx.saved_tensors
        return g * 3 * x**2


def _one_fallback(record: pytest.WarningsRecorder) -> None:
    assert len([w for w in record if issubclass(w.category, tj.FallbackWarning)]) == 1


def test_vmap_failure_falls_back_to_a_loop(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    with pytest.warns(tj.FallbackWarning, match="loop") as record:
        got = tj.jacobian(Cube.apply, x, batch_dim=0, mode="rev")
    _one_fallback(record)
    torch.testing.assert_close(got, torch.diag_embed(3 * x**2))


def test_missing_forward_ad_falls_back_to_reverse(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    # NOTE [forward mode and no_grad]: a custom autograd.Function is seen before a jvp is tried
    with pytest.warns(tj.FallbackWarning, match="custom autograd.Function") as record:
        got = tj.jacobian(lambda x: Cube.apply(x).sum(-1), x, batch_dim=0, mode="fwd", chunk_size=1)
    _one_fallback(record)
    torch.testing.assert_close(got, 3 * x**2)


def test_old_style_function_in_every_mode(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    torch.testing.assert_close(
        tj.jacobian(OldCube.apply, x, batch_dim=0, mode="rev"), torch.diag_embed(3 * x**2)
    )
    for mode in ("auto", "fwd"):  # forward mode cannot see its backward: rows instead
        with pytest.warns(tj.FallbackWarning, match="autograd.Function") as record:
            got = tj.jacobian(OldCube.apply, x, batch_dim=0, mode=mode)
        _one_fallback(record)
        torch.testing.assert_close(got, torch.diag_embed(3 * x**2))


class Straight(SavedCube):
    """Forward x³, backward declared as 2x (a custom gradient, not the forward's derivative)."""

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[no-untyped-def,override]
        (x,) = ctx.saved_tensors
        return g * x * 2


def test_forward_mode_follows_the_declared_backward(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    with pytest.warns(tj.FallbackWarning, match="Taylor") as record:
        got = tj.jacobian(lambda x: Straight.apply(x).sum(-1), x, batch_dim=0, mode="fwd")
    _one_fallback(record)
    torch.testing.assert_close(got, 2 * x)


@pytest.mark.parametrize(
    "option", [{"padding_idx": 0}, {"padding_idx": -1}, {"scale_grad_by_freq": True}]
)
def test_forward_mode_follows_the_embedding_backward(gen: torch.Generator, option: dict) -> None:
    """torch's backward zeroes the padding row and divides by the indices' counts; its forward
    AD does neither. Every mode gives reverse mode's derivative (NOTE [embedding forward rules])."""
    weight, idx = randn(5, 2, gen=gen), torch.tensor([[0, 4, 4], [2, 0, 4]])

    def f(w: Tensor) -> Tensor:
        return torch.nn.functional.embedding(idx, w, **option).sin()

    want = jacrev(f)(weight)
    for mode in ("rev", "fwd", "auto"):
        torch.testing.assert_close(tj.jacobian(f, weight, mode=mode), want)
    # torch.embedding directly (a negative padding_idx means none there)
    pad = option.get("padding_idx", -1) % 5 if "padding_idx" in option else -1
    by_freq = option.get("scale_grad_by_freq", False)

    def g(w: Tensor) -> Tensor:
        return torch.embedding(w, idx, pad, by_freq).sin()

    torch.testing.assert_close(tj.jacobian(g, weight, mode="fwd"), jacrev(g)(weight))


def test_batch_coupling_raises(gen: torch.Generator) -> None:
    x = randn(6, 3, gen=gen)
    with pytest.raises(tj.BatchCouplingError, match="batch_dim=0"):
        tj.jacobian(lambda x: x - x.mean(0), x, batch_dim=0)
    bn = torch.nn.BatchNorm1d(3).double().train()
    with pytest.raises(tj.BatchCouplingError, match="BatchNorm"):
        tj.jacobian(bn, x, batch_dim=0)
    got = tj.jacobian(bn.eval(), x, batch_dim=0)
    scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).detach()
    torch.testing.assert_close(got, torch.diag(scale).expand(6, 3, 3))


def test_argument_errors(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    with pytest.raises(TypeError, match="`func` must be callable"):
        tj.jacobian(3, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor"):
        tj.jacobian(lambda a, b: a, (x, 1.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="func must return a Tensor"):
        tj.jacobian(lambda x: 1.0, x)
    with pytest.raises(TypeError, match="real floating dtype"):
        tj.jacobian(lambda x: x, torch.arange(3))
    with pytest.raises(ValueError, match="out of range"):
        tj.jacobian(lambda x: x, x, batch_dim=2)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        tj.jacobian(lambda a, b: a + b.sum(), (x, randn(5, 3, gen=gen)), batch_dim=0)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        tj.jacobian(lambda x: x[:2], x, batch_dim=0)
    with pytest.raises(ValueError, match="`mode` must be one of"):
        tj.jacobian(lambda x: x, x, mode="forward")
    with pytest.raises(TypeError, match="pair"):
        tj.jacobian(lambda x: x, x, has_aux=True)


@pytest.mark.parametrize(("d_in", "d_out"), [(6, 2), (6, 9), (2, 5), (5, 5)])
@pytest.mark.parametrize("batch", [0, 1, 3])
def test_plans_and_batch_sizes_agree_with_torch_func(
    gen: torch.Generator, d_in: int, d_out: int, batch: int
) -> None:
    net = mlp(gen, (d_in, 7, d_out))
    x = randn(batch, d_in, gen=gen)
    ref = vmap(jacrev(net))(x) if batch else torch.zeros(0, d_out, d_in, dtype=x.dtype)
    for mode in MODES:
        torch.testing.assert_close(tj.jacobian(net, x, batch_dim=0, mode=mode), ref)


def test_zero_dim_and_constant_outputs() -> None:
    s = torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(tj.jacobian(torch.sin, s), s.cos())
    torch.testing.assert_close(tj.hessian(torch.sin, s), -s.sin())
    torch.testing.assert_close(tj.hessian_diagonal(torch.sin, s), -s.sin())
    torch.testing.assert_close(tj.laplacian(torch.sin, s), -s.sin())
    x = torch.ones(3, dtype=torch.float64)
    const = torch.zeros(2, dtype=torch.float64)
    for mode in MODES:
        torch.testing.assert_close(
            tj.jacobian(lambda x: const, x, mode=mode), torch.zeros(2, 3, dtype=x.dtype)
        )
        torch.testing.assert_close(tj.laplacian(lambda x: const, x, mode=mode), const)


@pytest.mark.parametrize("out_features", [2, 40])
def test_func_always_sees_the_whole_batch(gen: torch.Generator, out_features: int) -> None:
    # DESIGN: with batch_dim, func is called on the whole batch, as the user would call it (a
    # fixed view works); both plans (2 rows: reverse, 40 rows: forward) come out right.
    w = randn(8, out_features, gen=gen)
    calls: list[int] = []

    def f(x: Tensor) -> Tensor:
        calls.append(x.shape[0])
        return torch.tanh(x.view(6, 8) @ w)

    x = randn(6, 8, gen=gen)
    got = tj.jacobian(f, x, batch_dim=0)
    expected = vmap(jacrev(lambda xi: torch.tanh(xi @ w)))(x)
    torch.testing.assert_close(got, expected)
    assert calls and set(calls) == {6}


def test_taylor_mode_follows_in_place_changes_of_inputs_and_weights(gen: torch.Generator) -> None:
    # an input changed in place is no longer the one-hot seed; a weight changed in place after a
    # Linear layer does not change the derivatives that layer already produced
    w = randn(3, 5, gen=gen)

    def scaled(x: Tensor) -> Tensor:
        x.mul_(2.0)
        return torch.tanh(torch.nn.functional.linear(x, w))

    def weight_zeroed(x: Tensor) -> Tensor:
        v = w.clone()
        h = torch.nn.functional.linear(x, v)
        v.mul_(0.0)
        return torch.tanh(h)

    def scaled_ref(x: Tensor) -> Tensor:
        return torch.tanh(torch.nn.functional.linear(2 * x, w))

    def plain_ref(x: Tensor) -> Tensor:
        return torch.tanh(torch.nn.functional.linear(x, w))

    x = randn(4, 5, gen=gen)
    for f, ref in ((scaled, scaled_ref), (weight_zeroed, plain_ref)):
        torch.testing.assert_close(
            tj.jacobian(f, x.clone(), batch_dim=0, mode="fwd"), vmap(jacrev(ref))(x)
        )
        diag = torch.diagonal(vmap(torch.func.hessian(ref))(x), dim1=-2, dim2=-1)
        torch.testing.assert_close(tj.hessian_diagonal(f, x.clone(), batch_dim=0), diag)


@pytest.mark.parametrize("chunk_size", [None, 2, 8])
def test_rows_of_a_gradient_through_group_norm(chunk_size: int | None) -> None:
    # The legacy vmap of is_grads_batched returned wrong rows through group_norm's backward when
    # func differentiates it itself (off by 0.18); rows one at a time, columns and jacrev agree.
    def energy(u: Tensor) -> Tensor:
        return torch.nn.functional.group_norm(u.reshape(1, 4, 2), 2).sin().sum()

    g = torch.func.grad(energy)
    x = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = jacrev(g)(x)
    got = tj.jacobian(g, x, mode="rev", chunk_size=chunk_size)
    torch.testing.assert_close(got, want)
    sparse = tj.sparse_jacobian(g, x, mode="rev", chunk_size=chunk_size).to_dense()
    torch.testing.assert_close(sparse, want)


@pytest.mark.parametrize(
    "fill",
    [
        lambda z, idx, v: z.index_fill(0, idx, v),
        lambda z, idx, v: torch.index_fill(z, 0, idx, v),
        lambda z, idx, v: z.clone().index_fill_(0, idx, v),
    ],
    ids=["method", "function", "in_place"],
)
@pytest.mark.parametrize("mode", ["fwd", "auto"])
def test_forward_mode_through_index_fill_with_a_tensor_value(fill, mode: str) -> None:  # type: ignore[no-untyped-def]
    # torch's vmapped forward derivative of index_fill drops the tangent of a tensor value
    # (NOTE [index_fill under vmap]): jacobian(mode="fwd") and "auto" were off by 2.0
    idx = torch.tensor([0, 2, 2])

    def f(x: Tensor) -> Tensor:
        return fill(torch.ones(4, dtype=x.dtype), idx, x[0]) * x[1] + x[2]

    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    want = jacrev(f)(x)
    with warnings.catch_warnings():  # in place into a constant: the Taylor mode falls back
        warnings.simplefilter("ignore", tj.FallbackWarning)
        torch.testing.assert_close(tj.jacobian(f, x, mode=mode), want)
        torch.testing.assert_close(tj.sparse_jacobian(f, x, mode="fwd").to_dense(), want)


def _write_into_a_chunk(x: Tensor) -> Tensor:
    """Autograd refuses an in-place write into one of ``chunk``'s views; forward mode follows."""
    y = x.clone()
    c = y.chunk(3)
    c[-1].copy_(c[0][: c[-1].numel()] * 2)
    return y


@pytest.mark.parametrize("rows", [7, 2], ids=["square", "wide"])
def test_columns_when_reverse_mode_ad_cannot_follow_func(rows: int) -> None:
    """Forward probes started from a call with autograd on, which raised (``Output 2 of Split
    is a view ... modified inplace``) though ``torch.func.jacfwd`` follows ``func``; now that
    call runs without autograd, and ``"auto"`` takes columns even where rows were fewer."""

    def f(x: Tensor) -> tuple[Tensor, Tensor]:
        y = _write_into_a_chunk(x)
        return y[:rows], y.sum()

    x = torch.randn(7, dtype=torch.float64)
    want = torch.func.jacfwd(lambda x: f(x)[0])(x)
    with warnings.catch_warnings():  # Taylor mode, or "auto"'s rows, fell back
        warnings.simplefilter("ignore", tj.FallbackWarning)
        for mode in ("fwd", "auto"):
            got, aux = tj.jacobian(f, x, mode=mode, has_aux=True)
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(aux, f(x)[1])
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        tj.jacobian(f, x, mode="rev", has_aux=True)
