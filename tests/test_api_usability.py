"""Usability of the public API: no inputs is not an error, ``max_memory`` takes a float number of
bytes, messages name their function and a fix that works, and second derivatives through
``scaled_dot_product_attention`` (whose fused CPU kernel has none) just work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPE, randn
from torch import Tensor, nn
from torch.func import hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchjac as tj

# --- no inputs: nothing to compute -----------------------------------------------------------


def test_jac_of_no_inputs_is_an_empty_container(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen, grad=True)
    y = torch.tanh(x)
    assert tj.jac(y, []) == ()
    assert tj.jac(y, ()) == ()
    assert tj.jac([y, y.sum()], iter([])) == ()
    assert tj.jac(y, {}) == {}
    assert tj.jac(y, {}, randn(2, 4, 3, gen=gen), batch_dim=0, mode="fwd") == {}
    (g,) = torch.autograd.grad(y.sum(), x)  # nothing was computed, nothing freed
    torch.testing.assert_close(g, 1 - y.detach() ** 2)


def test_jac_of_no_inputs_still_validates(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen, grad=True)
    with pytest.raises(ValueError, match=r"jac: `mode` must be one of"):
        tj.jac(x.sin(), [], mode="both")
    with pytest.raises(ValueError, match=r"jac: `jac_outputs` must have shape \[k, 4, 3\]"):
        tj.jac(x.sin(), [], randn(4, 3, gen=gen))


@pytest.mark.parametrize("batch_dim", [None, 0, 1])
def test_gramian_of_no_inputs_is_the_zero_matrix_of_the_rows(
    batch_dim: int | None, gen: torch.Generator
) -> None:
    x = randn(4, 3, gen=gen, grad=True)
    y = torch.tanh(x) * 2
    for outputs in (y, [y, y * 3]):
        zero = tj.gramian(outputs, [], batch_dim=batch_dim)
        some = tj.gramian(outputs, [x], batch_dim=batch_dim, retain_graph=True)
        assert zero.shape == some.shape and zero.dtype == some.dtype == DTYPE
        assert not zero.any()
    assert tj.gramian(y, {}).shape == (4, 3, 4, 3)


# --- max_memory: bytes as an int, a float or a string ------------------------------------------


@pytest.mark.parametrize("max_memory", [4096.7, 1.5e9, 4096])
def test_max_memory_accepts_a_float_number_of_bytes(
    max_memory: float, gen: torch.Generator
) -> None:
    x = randn(5, 3, gen=gen, grad=True)
    w = randn(3, 4, gen=gen, grad=True)
    y = torch.tanh(x @ w)
    expected = jacrev(lambda a: torch.tanh(a @ w.detach()))(x.detach())
    got = tj.jac(y, x, max_memory=max_memory, retain_graph=True)
    torch.testing.assert_close(got, expected)
    gram = tj.gramian(y, [x, w], max_memory=max_memory)
    j = torch.cat([expected.reshape(20, -1), tj.jac(torch.tanh(x @ w), w).reshape(20, -1)], 1)
    torch.testing.assert_close(gram.reshape(20, 20), j @ j.T)
    f = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).to(DTYPE)
    torch.testing.assert_close(
        tj.jacobian(f, x.detach(), max_memory=max_memory),
        jacrev(f)(x.detach()),
    )


# --- ntk: a fix that works for ntk ----------------------------------------------------------


class _Centred(nn.Module):
    """Couples samples through a batch statistic."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x - x.mean(0))


@pytest.mark.parametrize(
    "model",
    [
        lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
        _Centred,
    ],
    ids=["batchnorm_train", "batch_statistic"],
)
def test_ntk_coupling_error_advises_what_works_for_ntk(model) -> None:
    net = model().to(DTYPE)
    x = torch.randn(5, 3, dtype=DTYPE)
    with pytest.raises(tj.BatchCouplingError, match=r"^ntk: ") as err:
        tj.ntk(net, x)
    message = str(err.value)
    assert "drop" not in message.lower()  # ntk has no batch_dim=None
    assert "tj.gramian(model(x1), list(model.parameters()))" in message
    # the advice is the kernel: on a model without coupling it equals tj.ntk
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    advised = tj.gramian(mlp(x), list(mlp.parameters()))
    torch.testing.assert_close(advised, tj.ntk(mlp, x))


def test_param_jacobian_coupling_error_still_advises_dropping_batch_dim() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(DTYPE)
    with pytest.raises(tj.BatchCouplingError, match=r"^param_jacobian: .*Drop `batch_dim`"):
        tj.param_jacobian(net, torch.randn(5, 3, dtype=DTYPE), batch_dim=0)


def test_ntk_unbatched_input_says_it_needs_a_batch_dimension() -> None:
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    one = torch.randn(3, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"^ntk: .*without a batch dimension.*x1\.unsqueeze\(0\)"):
        tj.ntk(mlp, one)
    with pytest.raises(ValueError, match=r"^ntk: .*x2\.unsqueeze\(0\)"):
        tj.ntk(mlp, one.expand(4, 3), one)
    with pytest.raises(ValueError, match=r"^ntk: .*needs a batch dimension.*x1\.unsqueeze\(0\)"):
        tj.ntk(mlp, torch.tensor(1.0, dtype=DTYPE))
    assert tj.ntk(mlp, one.unsqueeze(0)).shape == (1, 2, 1, 2)  # the fix works


class _Squeezed(nn.Module):
    """Drops the batch of one sample: per-sample probing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3, dtype=DTYPE))

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.scale).squeeze(0)


@pytest.mark.parametrize("fn", ["param_jacobian", "ntk"])
def test_per_sample_messages_start_with_the_function(fn: str) -> None:
    x = torch.randn(4, 3, dtype=DTYPE)
    call = {
        "param_jacobian": lambda: tj.param_jacobian(_Squeezed(), x, batch_dim=0),
        "ntk": lambda: tj.ntk(_Squeezed(), x),
    }[fn]
    with pytest.raises(ValueError, match=rf"^{fn}: on one sample \(a batch of 1\)"):
        call()


# --- second derivatives through scaled_dot_product_attention --------------------------------


def _attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v).tanh().sum(-1)  # [B, H, L]


def test_cpu_attention_takes_a_fused_kernel_without_second_derivative() -> None:
    """The premise (torch 2.13, CPU): 4-d inputs take flash attention, whose backward is not
    differentiable, in float64 too."""
    q = torch.randn(1, 2, 3, 4, dtype=DTYPE, requires_grad=True)
    (g,) = torch.autograd.grad(_attention(q, q, q).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=r"flash_attention.*not implemented"):
        torch.autograd.grad(g.sum(), q)


@pytest.mark.parametrize("fn", ["hessian", "hessian_diagonal", "laplacian"])
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_second_derivatives_through_attention(fn: str, mode: str, gen: torch.Generator) -> None:
    k, v = randn(1, 2, 3, 4, gen=gen), randn(1, 2, 3, 4, gen=gen)
    x = randn(1, 2, 3, 4, gen=gen)
    flags = [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()]

    def f(q: Tensor) -> Tensor:
        return _attention(q, k, v)

    got = getattr(tj, fn)(f, x, mode=mode)
    with sdpa_kernel(SDPBackend.MATH):  # the oracle: the math kernel has every derivative
        h = hessian(f)(x).reshape(6, 24, 24)
    expected = {
        "hessian": h,
        "hessian_diagonal": h.diagonal(dim1=1, dim2=2),
        "laplacian": h.diagonal(dim1=1, dim2=2).sum(-1),
    }[fn]
    torch.testing.assert_close(got.reshape(expected.shape), expected)
    assert [torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()] == (
        flags
    )  # the backends are as before


@pytest.mark.filterwarnings("ignore:.*performance drop.*:UserWarning")  # vmap over flash rows
def test_columns_on_a_flash_graph_fall_back_and_name_the_fix(gen: torch.Generator) -> None:
    k, v = randn(1, 2, 3, 4, gen=gen), randn(1, 2, 3, 4, gen=gen)
    x = randn(1, 2, 3, 4, gen=gen, grad=True)
    y = _attention(x, k, v)
    with pytest.warns(tj.FallbackWarning, match=r"^jac: .*sdpa_kernel\(SDPBackend\.MATH\)"):
        got = tj.jac(y, x, mode="fwd")
    torch.testing.assert_close(got, jacrev(lambda q: _attention(q, k, v))(x.detach()))
