"""``tj.hessian``, ``tj.hessian_diagonal``, ``tj.laplacian``: closed forms, torch.func oracles,
every mode (Taylor mode under "auto", nested AD otherwise), fallbacks, create_graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randn
from test_functional import Cube, OldCube, Straight, _one_fallback, mlp
from torch import Tensor
from torch.func import hessian, vmap

import torchjac as tj

MODES = ["auto", "rev", "fwd"]


def closed_form(x: Tensor) -> Tensor:
    return x.sin().sum(-1) + x.sum(-1) ** 2


@pytest.mark.parametrize("mode", MODES)
def test_closed_form_diagonal_and_laplacian(gen: torch.Generator, mode: str) -> None:
    x = randn(5, 4, gen=gen)
    diag = tj.hessian_diagonal(closed_form, x, batch_dim=0, mode=mode)
    torch.testing.assert_close(diag, 2 - x.sin())
    lap = tj.laplacian(closed_form, x, batch_dim=0, mode=mode)
    torch.testing.assert_close(lap, (2 - x.sin()).sum(-1))
    full = tj.hessian(closed_form, x, batch_dim=0, mode=mode)
    torch.testing.assert_close(full, 2 + torch.diag_embed(-x.sin()))


def pinn_field(xt: Tensor) -> Tensor:
    """u(x, t) = [sin x · e^{-t}, x² t, x³] per sample."""
    x, t = xt[:, 0], xt[:, 1]
    return torch.stack([x.sin() * (-t).exp(), x**2 * t, x**3], dim=1)


def pinn_hessian(xt: Tensor) -> Tensor:
    x, t = xt[:, 0], xt[:, 1]
    h = torch.zeros(len(x), 3, 2, 2, dtype=xt.dtype)
    e = (-t).exp()
    h[:, 0] = torch.stack([-x.sin() * e, -x.cos() * e, -x.cos() * e, x.sin() * e], 1).view(-1, 2, 2)
    h[:, 1, 0, 0], h[:, 1, 0, 1], h[:, 1, 1, 0] = 2 * t, 2 * x, 2 * x
    h[:, 2, 0, 0] = 6 * x
    return h


@pytest.mark.parametrize("mode", MODES)
def test_pinn_field_closed_forms(gen: torch.Generator, mode: str) -> None:
    xt = randn(7, 2, gen=gen)
    h = pinn_hessian(xt)
    torch.testing.assert_close(tj.hessian(pinn_field, xt, batch_dim=0, mode=mode), h)
    diag = h.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(pinn_field, xt, batch_dim=0, mode=mode), diag)
    torch.testing.assert_close(tj.laplacian(pinn_field, xt, batch_dim=0, mode=mode), diag.sum(-1))


def general_ops(x: Tensor) -> Tensor:
    """Ops without a cheap rule (general nested-AD rule) mixed with ruled ones."""
    y = F.softplus(x @ torch.linspace(-1, 1, 12, dtype=x.dtype).view(3, 4)).pow(3)
    z = F.layer_norm(x.exp() * x, (3,))
    return torch.cat([y.sum(-1, keepdim=True), z, F.gelu(x).prod(-1, keepdim=True)], dim=-1)


@pytest.mark.parametrize("func", ["mlp", "general"])
def test_mlp_and_general_ops_match_torch_func(gen: torch.Generator, func: str) -> None:
    f = mlp(gen, (3, 6, 6, 2)) if func == "mlp" else general_ops
    x = randn(5, 3, gen=gen)
    h = vmap(hessian(f))(x)
    for mode in MODES:
        torch.testing.assert_close(tj.hessian(f, x, batch_dim=0, mode=mode), h)
        diag = tj.hessian_diagonal(f, x, batch_dim=0, mode=mode)
        torch.testing.assert_close(diag, h.diagonal(dim1=-2, dim2=-1))
        lap = tj.laplacian(f, x, batch_dim=0, mode=mode)
        torch.testing.assert_close(lap, h.diagonal(dim1=-2, dim2=-1).sum(-1))


def test_unbatched_several_inputs_nested_containers(gen: torch.Generator) -> None:
    a, b = randn(2, gen=gen), randn(3, gen=gen)

    def f(a: Tensor, b: Tensor) -> Tensor:
        return (a.sum() * b).tanh() * a.prod()

    ref = hessian(f, argnums=(0, 1))(a, b)
    for mode in MODES:
        got = tj.hessian(f, (a, b), mode=mode)
        for i in range(2):
            for j in range(2):
                torch.testing.assert_close(got[i][j], ref[i][j])
        diag = tj.hessian_diagonal(f, (a, b), mode=mode)
        torch.testing.assert_close(diag[0], ref[0][0].diagonal(dim1=-2, dim2=-1))
        torch.testing.assert_close(diag[1], ref[1][1].diagonal(dim1=-2, dim2=-1))
        lap = tj.laplacian(f, (a, b), mode=mode)
        torch.testing.assert_close(lap, diag[0].sum(-1) + diag[1].sum(-1))
    got_d = tj.hessian(lambda d: f(d["a"], d["b"]), {"a": a, "b": b})
    torch.testing.assert_close(got_d["b"]["a"], ref[1][0])


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


def test_custom_function_taylor_check_takes_nested_ad(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)

    with pytest.warns(tj.FallbackWarning, match="Taylor") as record:
        got = tj.hessian_diagonal(lambda x: Straight.apply(x).sum(-1), x, batch_dim=0)
    _one_fallback(record)
    torch.testing.assert_close(got, torch.full_like(x, 2.0))


def test_missing_forward_ad_uses_reverse_over_reverse(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    with pytest.warns(tj.FallbackWarning) as record:
        got = tj.hessian_diagonal(lambda x: Cube.apply(x).sum(-1), x, batch_dim=0, mode="fwd")
    _one_fallback(record)
    torch.testing.assert_close(got, 6 * x)


def test_second_order_errors(gen: torch.Generator) -> None:
    x = randn(6, 3, gen=gen)
    with pytest.raises(tj.BatchCouplingError, match="batch_dim=0"):
        tj.laplacian(lambda x: ((x - x.mean(0)) ** 2).sum(-1), x, batch_dim=0)
    bn = torch.nn.BatchNorm1d(3).double().train()
    with pytest.raises(tj.BatchCouplingError, match="BatchNorm"):
        tj.hessian_diagonal(bn, x, batch_dim=0)
    for mode in MODES:  # torch.func needs setup_context: autograd.grad on the graph instead
        with pytest.warns(tj.FallbackWarning, match="setup_context"):
            got = tj.hessian(lambda x: OldCube.apply(x).sum(), x[0], mode=mode)
        torch.testing.assert_close(got, torch.diag(6 * x[0]))
    with pytest.raises(TypeError, match="func must return a Tensor"):
        tj.laplacian(lambda x: 1.0, x)
    with pytest.raises(ValueError, match="out of range"):
        tj.hessian(lambda x: x.sum(), x, batch_dim=0)


def test_chunked_and_looped_nested_ad_agree(gen: torch.Generator) -> None:
    f = mlp(gen, (3, 5, 2))
    x = randn(4, 3, gen=gen)
    h = vmap(hessian(f))(x)
    for chunk in (1, 4):
        torch.testing.assert_close(tj.hessian(f, x, batch_dim=0, mode="fwd", chunk_size=chunk), h)


@pytest.mark.parametrize("fn", ["hessian", "hessian_diagonal", "laplacian", "jacobian"])
def test_create_graph_parameter_gradients_every_front_door(gen: torch.Generator, fn: str) -> None:
    net = mlp(gen, (3, 6, 2))
    x = randn(4, 3, gen=gen)
    params = list(net.parameters())[:-1]
    got = getattr(tj, fn)(net, x, batch_dim=0, create_graph=True)
    plain = getattr(tj, fn)(net, x, batch_dim=0)
    assert not plain.requires_grad
    h = vmap(hessian(net))(x)
    ref = {
        "hessian": h,
        "hessian_diagonal": h.diagonal(dim1=-2, dim2=-1),
        "laplacian": h.diagonal(dim1=-2, dim2=-1).sum(-1),
        "jacobian": vmap(torch.func.jacrev(net))(x),
    }[fn]
    torch.testing.assert_close(got, ref)
    w = torch.linspace(-1, 1, got.numel(), dtype=got.dtype).view_as(got)
    grads = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    refs = torch.autograd.grad((ref * w).sum(), params, allow_unused=True)
    for g, r in zip(grads, refs):
        if r is None:
            assert g is None or bool((g == 0).all())
        else:
            torch.testing.assert_close(g, r)


def _writes_through_a_view(x: Tensor) -> Tensor:
    h = x * 2
    v = h[:, 0]
    h.mul_(3)  # v sees this write
    return (v * h.sum(-1)).sin()


def _item_assignment(x: Tensor) -> Tensor:
    y = x.clone()
    y[:, 0] = 0.5 * x[:, 1] ** 2
    return y.tanh().sum(-1)


def _inplace_relu(x: Tensor) -> Tensor:
    h = F.linear(x, torch.linspace(-1, 1, 15, dtype=x.dtype).view(5, 3))
    torch.relu_(h)
    return (h**2).sum(-1) + h.exp().sum(-1)


@pytest.mark.parametrize("func", [_writes_through_a_view, _item_assignment, _inplace_relu])
def test_in_place_writes_are_followed_or_handed_to_nested_ad(gen: torch.Generator, func) -> None:  # type: ignore[no-untyped-def]
    x = randn(4, 3, gen=gen)
    h = torch.stack([hessian(lambda r: func(r.unsqueeze(0))[0])(x[b]) for b in range(4)])
    diag = h.diagonal(dim1=-2, dim2=-1)
    aliased = func is _writes_through_a_view
    for fn, ref in [(tj.hessian_diagonal, diag), (tj.laplacian, diag.sum(-1))]:
        if aliased:  # the Taylor mode cannot follow a write through a view: nested AD
            with pytest.warns(tj.FallbackWarning, match="view") as record:
                got = fn(func, x, batch_dim=0)
            _one_fallback(record)
        else:
            got = fn(func, x, batch_dim=0)
        torch.testing.assert_close(got, ref)
    torch.testing.assert_close(tj.hessian(func, x, batch_dim=0, mode="rev"), h)


ACTIVATIONS = {
    "softplus_beta_threshold": lambda x: F.softplus(x, 2.0, 5.0).sum(-1),
    "gelu": lambda x: F.gelu(x).sum(-1),
    "gelu_tanh_general_rule": lambda x: F.gelu(x, approximate="tanh").sum(-1),
    "pow_1.5": lambda x: (x.abs() + 1).pow(1.5).sum(-1),
    "cube": lambda x: (x**3).sum(-1),
    "square_times_sum": lambda x: torch.square(x).sum(-1) * x.sum(-1),
    "silu_product": lambda x: F.silu(x).prod(-1),
    "sigmoid_log_relu": lambda x: (x.sigmoid() + F.relu(x) + 1).log().cos().sum(-1),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_rules_match_torch_func(gen: torch.Generator, name: str) -> None:
    f = ACTIVATIONS[name]
    x = 4 * randn(6, 3, gen=gen)
    h = torch.stack([hessian(lambda r: f(r.unsqueeze(0))[0])(x[b]) for b in range(6)])
    diag = h.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(f, x, batch_dim=0), diag)
    torch.testing.assert_close(tj.laplacian(f, x, batch_dim=0), diag.sum(-1))
    rest = x[:, 2:]
    got = tj.hessian(lambda r: f(torch.cat([r, rest], dim=-1)), x[:, :2], batch_dim=0)
    torch.testing.assert_close(got, _h2(f, x))


def _h2(f, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    """Hessians in the first two coordinates (a two-input problem: full Taylor jets)."""
    rest = x[:, 2:]

    def g(r: Tensor, b: int) -> Tensor:
        return f(torch.cat([r, rest[b]]).unsqueeze(0))[0]

    return torch.stack([hessian(lambda r, b=b: g(r, b))(x[b, :2]) for b in range(x.shape[0])])


_MEMORY_SCRIPT = """
import resource, sys, torch, torchjac as tj
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                          torch.nn.Tanh(), torch.nn.Linear(256, 1))
x = torch.randn(512, 64)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
getattr(tj, sys.argv[1])(net, x, batch_dim=0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fn", ["laplacian", "hessian_diagonal"])
def test_peak_memory_is_linear_in_the_input_size(fn: str) -> None:
    """B=512, D=64, width 256: per-sample Hessians would hold B·D²·256 floats per layer (2 GiB);
    the Taylor mode holds O(B·D·256) per layer. Peak RSS growth, in a fresh process."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, fn], capture_output=True, text=True, check=True
    )
    assert int(out.stdout.strip()) < 600, out.stdout  # MiB


def _affine(n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.linspace(0.5, 1.5, n, dtype=dtype), torch.linspace(-0.3, 0.3, n, dtype=dtype)


NORMS = {
    "F.layer_norm": lambda x: F.layer_norm(x, (8,), *_affine(8, x.dtype)).exp().sum(-1),
    "torch.layer_norm": lambda x: torch.layer_norm(x, (8,)).tanh().sum(-1),
    "F.instance_norm": lambda x: (
        F.instance_norm(
            x.view(-1, 2, 4), weight=_affine(2, x.dtype)[0], bias=_affine(2, x.dtype)[1]
        )
        .sin()
        .flatten(1)
        .sum(-1)
    ),
    "torch.batch_norm_eval": lambda x: (
        torch.batch_norm(
            x.view(-1, 2, 4),
            *_affine(2, x.dtype),
            *_affine(2, x.dtype)[::-1],
            False,
            0.1,
            1e-5,
            False,
        )
        .sin()
        .flatten(1)
        .sum(-1)
    ),
    "group_norm": lambda x: F.group_norm(x.view(-1, 4, 2), 2).tanh().flatten(1).sum(-1),
    "rms_norm": lambda x: F.rms_norm(x, (8,)).exp().sum(-1),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_normalisations_match_torch_func(gen: torch.Generator, name: str) -> None:
    """PyTorch's nested forward mode is wrong for some norms (pytorch#196700): decomposed."""
    f = NORMS[name]
    x = randn(5, 8, gen=gen)
    h = torch.stack([hessian(lambda r: f(r.unsqueeze(0))[0])(x[b]) for b in range(5)])
    diag = h.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(tj.hessian_diagonal(f, x, batch_dim=0), diag)
    torch.testing.assert_close(tj.laplacian(f, x, batch_dim=0), diag.sum(-1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", ["jacobian", "hessian", "hessian_diagonal", "laplacian"])
def test_create_graph_input_gradients(gen: torch.Generator, fn: str, mode: str) -> None:
    net = mlp(gen, (3, 6, 2))
    x = randn(4, 3, gen=gen, grad=True)
    h = vmap(hessian(net))(x)
    ref = {
        "hessian": h,
        "hessian_diagonal": h.diagonal(dim1=-2, dim2=-1),
        "laplacian": h.diagonal(dim1=-2, dim2=-1).sum(-1),
        "jacobian": vmap(torch.func.jacrev(net))(x),
    }[fn]
    got = getattr(tj, fn)(net, x, batch_dim=0, mode=mode, create_graph=True)
    (g,) = torch.autograd.grad((got**2).sum(), x)
    (r,) = torch.autograd.grad((ref**2).sum(), x)
    torch.testing.assert_close(g, r)
    assert x.grad is None
