"""NOTE [dense kernels]: the engine's float32 products agree with ``F.linear`` and keep to their
limits (graphs, transforms, precision settings, small problems); float32 Taylor-mode results
that run through them match float64 oracles."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import hessian, jacrev, vmap
from torch.utils._python_dispatch import TorchDispatchMode

import torchjac as tj
from torchjac._engine.kernel import kernels

F32 = torch.float32


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    """Shapes of the inputs the oneDNN op was called on (the op itself still runs)."""
    seen: list[tuple[int, ...]] = []
    real = kernels._onednn()

    def spy() -> Callable[..., Tensor] | None:
        if real is None:
            return None

        def op(x: Tensor, *args: Any) -> Tensor:
            seen.append(tuple(x.shape))
            return real(x, *args)

        return op

    monkeypatch.setattr(kernels, "_onednn", spy)
    yield seen


def _oracle(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "shape", [(300, 64), (5, 70, 64), (64, 300)], ids=["2d", "3d", "wide-rows"]
)
def test_linear_matches_float64(shape: tuple[int, ...], bias: bool) -> None:
    x = torch.randn(shape, dtype=F32)
    w, b = torch.randn(96, shape[-1], dtype=F32), torch.randn(96, dtype=F32) if bias else None
    out = kernels.linear(x, w, b)
    assert out.dtype == F32 and out.shape == (*shape[:-1], 96)
    torch.testing.assert_close(out.double(), _oracle(x, w, b), rtol=1e-5, atol=1e-4)


def test_linear_strided_operands() -> None:
    x = torch.randn(64, 9, 128, dtype=F32).transpose(0, 1)  # not contiguous
    w = torch.randn(128, 100, dtype=F32).t()  # a transposed weight
    torch.testing.assert_close(
        kernels.linear(x, w).double(), _oracle(x, w, None), atol=1e-4, rtol=1e-5
    )


def test_big_float32_product_takes_onednn(calls: list[tuple[int, ...]]) -> None:
    if kernels._onednn() is None:
        pytest.skip("this torch has no usable oneDNN linear")  # pragma: no cover
    kernels.linear(torch.randn(4, 256, 64), torch.randn(64, 64))
    assert calls == [(4, 256, 64)]


@pytest.mark.parametrize(
    "case",
    ["float64", "small", "narrow-output", "recording-a-graph"],
)
def test_falls_back_to_f_linear(case: str, calls: list[tuple[int, ...]]) -> None:
    x, w = torch.randn(512, 64), torch.randn(64, 64)
    if case == "float64":
        x, w = x.double(), w.double()
    elif case == "small":
        x = x[:4]
    elif case == "narrow-output":
        w = w[:1]
    else:
        w.requires_grad_(True)
    out = kernels.linear(x, w)
    assert calls == []
    if case == "recording-a-graph":
        assert out.grad_fn is not None  # differentiable: F.linear's own backward
        (g,) = torch.autograd.grad(out.sum(), w)
        torch.testing.assert_close(g, x.sum(0).expand(64, 64), rtol=1e-4, atol=1e-4)


def test_reduced_precision_setting_is_respected(calls: list[tuple[int, ...]]) -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        kernels.linear(torch.randn(512, 64), torch.randn(64, 64))
    finally:
        torch.set_float32_matmul_precision(before)
    assert calls == []


def test_under_vmap_falls_back(calls: list[tuple[int, ...]]) -> None:
    x, w = torch.randn(3, 512, 64), torch.randn(64, 64)
    out = vmap(lambda xi: kernels.linear(xi, w))(x)
    assert calls == []
    torch.testing.assert_close(out.double(), _oracle(x, w, None), atol=1e-4, rtol=1e-5)


def test_disagreeing_op_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_lookup", lambda: lambda x, w, b, *_: F.linear(x, w, b) + 1)
    monkeypatch.setattr(kernels, "_state", {"checked": False, "usable": True, "tanh": True})
    monkeypatch.setattr(kernels, "_op", None)
    x, w = torch.randn(512, 64), torch.randn(64, 64)
    assert kernels._onednn() is None
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))


def test_failing_op_turns_itself_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any) -> Tensor:
        raise RuntimeError("no oneDNN kernel for this layout")

    monkeypatch.setattr(kernels, "_onednn", lambda: broken)
    monkeypatch.setattr(kernels, "_state", {"checked": True, "usable": True, "tanh": True})
    x, w = torch.randn(512, 64), torch.randn(64, 64)
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w))
    assert kernels._state["usable"] is False


@pytest.mark.parametrize(
    ("shape", "fused"),
    [
        ((256, 128, 128), True),
        ((1024, 2, 64), True),
        ((4, 64, 20, 64), True),
        ((16, 16, 64), False),
    ],
    ids=["big", "K=2", "3d", "below 16k outputs"],
)
def test_fused_tanh_from_16k_outputs(
    calls: list[tuple[int, ...]], shape: tuple[int, ...], fused: bool
) -> None:
    """NOTE [fused tanh]: fused from 16k outputs, below the product's own size limits; torch's
    tanh to 1e-6."""
    *rows, d_in, d_out = shape
    x, w, b = torch.randn(*rows, d_in), torch.randn(d_out, d_in) / d_in**0.5, torch.randn(d_out)
    got = kernels.linear(x, w, b, "tanh")
    torch.testing.assert_close(got.double(), torch.tanh(_oracle(x, w, b)), atol=1e-6, rtol=1e-5)
    assert calls == ([tuple(x.shape)] if fused and kernels._onednn() is not None else [])


def test_fused_tanh_keeps_to_the_other_limits(
    calls: list[tuple[int, ...]], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, w = torch.randn(64, 32), torch.randn(32, 32)
    want = torch.tanh(F.linear(x, w))
    torch.testing.assert_close(kernels.linear(x.double(), w.double(), None, "tanh").float(), want)
    w.requires_grad_(True)
    got = kernels.linear(x, w, None, "tanh")  # autograd records it: torch's own ops
    assert got.grad_fn is not None
    torch.testing.assert_close(got.detach(), want)
    assert calls == []
    monkeypatch.setitem(kernels._state, "tanh", False)  # the first check disagreed
    torch.testing.assert_close(kernels.linear(x, w.detach(), None, "tanh"), want)
    assert calls == []
    with pytest.raises(ValueError, match="activation must be 'none' or 'tanh', got 'relu'"):
        kernels.linear(x, w.detach(), None, "relu")


@pytest.mark.parametrize("activation", ["none", "tanh"])
def test_empty_products_leave_onednn_on(
    calls: list[tuple[int, ...]], activation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """oneDNN raises on an empty product, which would turn it off for the process."""
    monkeypatch.setitem(kernels._state, "usable", True)
    for x, w in [
        (torch.randn(4096, 0), torch.randn(64, 0)),
        (torch.randn(0, 64), torch.randn(64, 64)),
    ]:
        y = kernels.linear(x, w, torch.zeros(64), activation)
        assert y.shape == (x.shape[0], 64) and bool((y == 0).all())
    assert calls == [] and kernels._state["usable"]


def test_a_failing_fusion_turns_off_only_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    real = kernels._onednn()
    if real is None:
        pytest.skip("this torch has no usable oneDNN linear")  # pragma: no cover

    def no_tanh(x: Tensor, w: Tensor, b: Tensor | None, attr: str, *rest: Any) -> Tensor:
        if attr == "tanh":
            raise RuntimeError("no such post-op")
        return real(x, w, b, attr, *rest)

    monkeypatch.setattr(kernels, "_onednn", lambda: no_tanh)
    monkeypatch.setattr(kernels, "_state", {"checked": True, "usable": True, "tanh": True})
    x, w = torch.randn(512, 64), torch.randn(64, 64)
    torch.testing.assert_close(kernels.linear(x, w, None, "tanh"), torch.tanh(F.linear(x, w)))
    assert kernels._state == {"checked": True, "usable": True, "tanh": False}


def test_no_onednn_inside_forward_ad(calls: list[tuple[int, ...]]) -> None:
    """The op has no forward derivative: a dual input's tangent must come through."""
    import torch.autograd.forward_ad as fwad

    x, w, v = torch.randn(512, 64), torch.randn(64, 64) / 8, torch.randn(512, 64)
    with fwad.dual_level():
        for activation in ("none", "tanh"):
            y, dy = fwad.unpack_dual(kernels.linear(fwad.make_dual(x, v), w, None, activation))
            slope = 1 - y * y if activation == "tanh" else torch.ones_like(y)
            assert dy is not None
            torch.testing.assert_close(dy, slope * F.linear(v, w), atol=1e-5, rtol=1e-4)
    assert calls == []


def _mlp32() -> tuple[nn.Module, nn.Module, Tensor]:
    torch.manual_seed(3)
    f = nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3)
    ).float()
    twin = copy.deepcopy(f).double()  # a float64 copy for the oracle
    return f, twin, torch.randn(128, 16)


def _single(f: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda xi: f(xi.unsqueeze(0)).squeeze(0)


def test_float32_taylor_results_through_onednn(calls: list[tuple[int, ...]]) -> None:
    f, twin, x = _mlp32()
    xd = x.double()
    jac = tj.jacobian(f, x, batch_dim=0)
    hes = vmap(hessian(_single(twin)))(xd)  # [B, 3, 16, 16]
    torch.testing.assert_close(jac.double(), vmap(jacrev(_single(twin)))(xd), atol=1e-5, rtol=1e-4)
    diag = hes.diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(
        tj.hessian_diagonal(f, x, batch_dim=0).double(), diag, atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(
        tj.laplacian(f, x, batch_dim=0).double(), diag.sum(-1), atol=1e-5, rtol=1e-4
    )
    torch.testing.assert_close(tj.hessian(f, x, batch_dim=0).double(), hes, atol=1e-5, rtol=1e-4)
    if kernels._onednn() is not None:
        assert calls  # the hidden 64x64 layer's stacks went through oneDNN


class _Count(TorchDispatchMode):
    """A user's own dispatch mode (a stand-in for a flop counter)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def _trunk(
    dtype: torch.dtype = F32, width: int = 512
) -> tuple[Tensor, list[Tensor], Any, Callable[..., Tensor]]:
    """Sixteen losses of a wide two-layer trunk: big products, few graph nodes; and its float64
    oracle (``jacrev`` of the same losses)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(256, 64, generator=gen)
    w1 = torch.randn(width, 64, generator=gen) / 8
    w2 = torch.randn(width, width, generator=gen) / 16
    b2 = torch.randn(width, generator=gen)
    heads = torch.randn(16, width, generator=gen) / 16

    def losses(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        h = torch.tanh(x.to(a.dtype) @ a.T)
        h = torch.tanh(F.linear(h, b, c))
        return (h @ heads.to(a.dtype).T).pow(2).mean(0)

    params = [t.to(dtype).requires_grad_(True) for t in (w1, w2, b2)]
    oracle = jacrev(losses, argnums=(0, 1, 2))(*(t.detach().double() for t in params))
    return losses(*params), params, oracle, losses


def test_backward_products_mode_is_installed_for_big_graphs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if kernels._onednn() is None:
        pytest.skip("this torch has no usable oneDNN linear")  # pragma: no cover
    seen: list[str] = []
    real = kernels._OneDnnProducts.__torch_dispatch__

    def spy(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        seen.append(str(func))
        return real(self, func, types, args, kwargs)

    monkeypatch.setattr(kernels._OneDnnProducts, "__torch_dispatch__", spy)
    for chunk_size in (1, None):  # a loop of rows, then one vectorised pass
        seen.clear()
        ys, params, oracle, _ = _trunk()
        got = tj.jac(ys, params, chunk_size=chunk_size)
        assert "aten.mm.default" in seen
        for g, o in zip(got, oracle):
            torch.testing.assert_close(g.double(), o, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "case", ["float64", "narrow", "user-mode", "medium-precision", "little-work"]
)
def test_backward_products_mode_stays_out(case: str) -> None:
    ys, params, oracle, _ = _trunk(
        torch.float64 if case == "float64" else F32, 8 if case == "narrow" else 512
    )
    before = torch.get_float32_matmul_precision()
    try:
        if case == "medium-precision":
            torch.set_float32_matmul_precision("medium")
        if case == "user-mode":
            with _Count():
                assert kernels.backward_products([ys], F32, ys.device, 2**30) is None
        else:
            work = 2**20 if case == "little-work" else 2**30  # probes x elements they touch
            assert kernels.backward_products([ys], ys.dtype, ys.device, work) is None
    finally:
        torch.set_float32_matmul_precision(before)
    for g, o in zip(tj.jac(ys, params), oracle):
        torch.testing.assert_close(g.double(), o, rtol=1e-4, atol=1e-5)


def test_backward_products_second_order() -> None:
    """Under the mode, ``create_graph=True`` rows stay differentiable: the gradient of a
    function of the Jacobian matches float64 nested ``jacrev``."""
    ys, params, _, losses = _trunk()
    assert (
        kernels.backward_products([ys], F32, ys.device, 2**30) is not None
        or kernels._onednn() is None
    )
    j1 = tj.jac(ys, params[0], create_graph=True)
    (g,) = torch.autograd.grad(j1.pow(2).sum(), params[0])
    b, c = (t.detach().double() for t in params[1:])

    def outer(a: Tensor) -> Tensor:
        return jacrev(lambda a_: losses(a_, b, c))(a).pow(2).sum()

    oracle = torch.func.grad(outer)(params[0].detach().double())
    torch.testing.assert_close(g.double(), oracle, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("layout", ["strided", "expanded", "one-element"])
def test_bias_layouts_the_op_misreads_go_to_f_linear(
    layout: str, calls: list[tuple[int, ...]]
) -> None:
    x, w = torch.randn(512, 64), torch.randn(96, 64)
    b = {
        "strided": torch.randn(96, 3)[:, 1],
        "expanded": torch.tensor([3.0]).expand(96),
        "one-element": torch.tensor([3.0]),  # broadcast by F.linear
    }[layout]
    torch.testing.assert_close(
        kernels.linear(x, w, b).double(), _oracle(x, w, b), atol=1e-4, rtol=1e-5
    )
    assert calls == [] and kernels._state["usable"]


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_mode_leaves_addmm_with_a_strided_bias_to_torch(layout: str) -> None:
    if kernels._onednn() is None:
        pytest.skip("this torch has no usable oneDNN linear")  # pragma: no cover
    a, b = torch.randn(256, 128), torch.randn(256, 128).t()  # F.linear's addmm(bias, x, W.t())
    bias = torch.randn(256, 2)[:, 0] if layout == "strided" else torch.tensor([3.0]).expand(256)
    with kernels._OneDnnProducts():
        got = torch.addmm(bias, a, b)
    torch.testing.assert_close(got, torch.addmm(bias, a, b), atol=1e-4, rtol=1e-5)


def test_strided_bias_in_a_taylor_pass() -> None:
    """The first layer's bias (the one ``kernels.linear`` adds itself, on the seed input, big
    enough for oneDNN) is a column of a bigger tensor (found in review)."""
    torch.manual_seed(4)
    f = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 1))
    twin = copy.deepcopy(f).double()
    with torch.no_grad():
        for m in (f[0], twin[0]):
            store = torch.zeros(m.bias.shape[0], 3, dtype=m.bias.dtype)
            store[:, 1] = m.bias
            del m.bias
            m.bias = store[:, 1]  # a plain strided tensor attribute, as F.linear receives it
    x = torch.randn(512, 32)
    hes = vmap(hessian(_single(twin)))(x.double())
    torch.testing.assert_close(
        tj.laplacian(f, x, batch_dim=0).double(),
        hes.diagonal(dim1=-2, dim2=-1).sum(-1),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.skipif(
    getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None) is None,
    reason="torch's per-backend precision API (torch.backends.mkldnn.matmul.fp32_precision) "
    "came in torch 2.9",
)
def test_per_backend_precision_setting() -> None:
    """torch's per-backend precision API, set in a fresh process: the legacy getter raises from
    then on; oneDNN is left alone and the doors still work (a subprocess: no earlier legacy
    setting of this test session may mask it)."""
    script = """
import torch, torchjac as tj
from torchjac._engine.kernel import kernels
torch.backends.mkldnn.matmul.fp32_precision = "bf16"
assert not kernels._full_precision()
w = torch.randn(512, 512, requires_grad=True)
ys = torch.tanh(torch.randn(256, 512) @ w).sum(0)[:16]
assert tj.jac(ys, w).shape == (16, 512, 512)
f = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
assert tj.laplacian(f, torch.randn(256, 16), batch_dim=0).shape == (256, 1)
print("ok")
"""
    env = {**os.environ, "PYTHONWARNINGS": "error::UserWarning"}  # a FallbackWarning fails too
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_users_dispatch_mode_sees_torchs_own_ops(calls: list[tuple[int, ...]]) -> None:
    with _Count():
        kernels.linear(torch.randn(512, 64), torch.randn(64, 64))
    assert calls == []


def test_self_check_under_a_float64_default(monkeypatch: pytest.MonkeyPatch) -> None:
    if kernels._lookup() is None:
        pytest.skip("this torch has no oneDNN linear")  # pragma: no cover
    monkeypatch.setattr(kernels, "_state", {"checked": False, "usable": True, "tanh": True})
    monkeypatch.setattr(kernels, "_op", None)
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert kernels._onednn() is not None
    finally:
        torch.set_default_dtype(before)
