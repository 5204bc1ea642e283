"""``tj.param_jacobian`` and ``tj.ntk``: dict order, ``params`` forms, layout, hooks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import randn
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import torchjac as tj


class _Tied(nn.Module):
    """Embedding-free tied weights, a frozen layer and a bare parameter; output [N, 2, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5]))
        self.out = nn.Linear(4, 3, bias=False)
        self.tied = nn.Linear(3, 4, bias=False)
        self.tied.weight = self.out.weight  # [3, 4] used twice (as W and Wᵀ)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.frozen(self.inp(x)))
        o = self.out(h)  # [N, 3]
        h2 = torch.tanh(o @ self.tied.weight)  # [N, 4]
        o2 = self.out(h2)
        return torch.stack([o, o2], 1) * self.scale[None, :, None]


def _model() -> nn.Module:
    torch.manual_seed(1)
    return _Tied().double()


def _oracle_param_jac(model: nn.Module, x: Tensor, names: list[str]) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    ps = {n: params[n].detach() for n in names}

    def f(ps: dict[str, Tensor]) -> Tensor:
        return functional_call(model, ps, (x,), tie_weights=True, strict=False)

    return jacrev(f)(ps)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_param_jacobian_dict_order_shapes_values(
    gen: torch.Generator, batch_dim: int | None
) -> None:
    model = _model()
    x = randn(5, 3, gen=gen)
    got = tj.param_jacobian(model, x, batch_dim=batch_dim)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == ["scale", "inp.weight", "inp.bias", "out.weight"]  # tied once, frozen out
    assert type(got) is dict and list(got) == names
    want = _oracle_param_jac(model, x, names)
    for n, p in model.named_parameters():
        if n in got:
            assert got[n].shape == (5, 2, 3, *p.shape), n
            torch.testing.assert_close(got[n], want[n], msg=n)


def test_param_jacobian_params_selects_frozen_and_orders(gen: torch.Generator) -> None:
    model = _model()
    x = randn(2, 3, gen=gen)
    got = tj.param_jacobian(model, x, params=["out.weight", "frozen.bias"])
    # named_parameters() order, not the order given
    assert list(got) == ["frozen.bias", "out.weight"]
    want = _oracle_param_jac(model, x, ["frozen.bias", "out.weight"])
    torch.testing.assert_close(got["frozen.bias"], want["frozen.bias"])
    got2 = tj.param_jacobian(model, x, params=[model.scale])
    assert list(got2) == ["scale"]


def test_param_jacobian_passes_args_and_kwargs(gen: torch.Generator) -> None:
    class TwoIn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor, z: Tensor, *, gain: float = 1.0) -> Tensor:
            return self.lin(x) * z * gain

    model = TwoIn().double()
    x, z = randn(4, 3, gen=gen), randn(4, 2, gen=gen)
    got = tj.param_jacobian(model, x, z, gain=3.0, batch_dim=0)
    ps = {n: p.detach() for n, p in model.named_parameters()}
    want = jacrev(lambda ps: functional_call(model, ps, (x, z), {"gain": 3.0}))(ps)
    assert list(got) == ["lin.weight", "lin.bias"]
    torch.testing.assert_close(got["lin.bias"], want["lin.bias"])
    torch.testing.assert_close(got["lin.weight"], want["lin.weight"])


def test_params_forms_and_ntk_subset(gen: torch.Generator) -> None:
    model = _model()
    x1, x2 = randn(3, 3, gen=gen), randn(2, 3, gen=gen)
    forms: list[Any] = [
        ["out.weight", "frozen.bias"],
        [model.out.weight, model.frozen.bias],
        (p for p in (model.frozen.bias, model.out.weight)),
    ]
    for params in forms:
        assert list(tj.param_jacobian(model, x1, params=params)) == ["frozen.bias", "out.weight"]
    assert list(tj.param_jacobian(model, x1, params=model.parameters())) == [
        "scale",
        "inp.weight",
        "inp.bias",
        "frozen.weight",
        "frozen.bias",
        "out.weight",
    ]
    names = ["frozen.bias", "out.weight"]

    def flat(x: Tensor) -> Tensor:
        j = _oracle_param_jac(model, x, names)
        return torch.cat([j[n].reshape(*j[n].shape[:3], -1) for n in names], -1)

    got = tj.ntk(model, x1, x2, params=["out.weight", model.frozen.bias])
    torch.testing.assert_close(got, torch.einsum("iabp,jcdp->iabjcd", flat(x1), flat(x2)))


def _flat_param_jac(model: nn.Module, x: Tensor) -> Tensor:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    j = _oracle_param_jac(model, x, names)
    return torch.cat([j[n].reshape(*j[n].shape[:3], -1) for n in names], -1)  # [N, 2, 3, P]


def test_ntk_layout_and_values(gen: torch.Generator) -> None:
    model = _model()
    x1, x2 = randn(4, 3, gen=gen), randn(2, 3, gen=gen)
    j1, j2 = _flat_param_jac(model, x1), _flat_param_jac(model, x2)
    got = tj.ntk(model, x1, x2)
    assert got.shape == (4, 2, 3, 2, 2, 3)
    torch.testing.assert_close(got, torch.einsum("iabp,jcdp->iabjcd", j1, j2))
    k11 = tj.ntk(model, x1)
    assert k11.shape == (4, 2, 3, 4, 2, 3)
    torch.testing.assert_close(k11, torch.einsum("iabp,jcdp->iabjcd", j1, j1))


def test_ntk_batch_dim_1(gen: torch.Generator) -> None:
    class Cols(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:  # x [3, N] -> [2, N]
            return torch.tanh(self.lin(x.T)).T

    model = Cols().double()
    x1, x2 = randn(3, 4, gen=gen), randn(3, 5, gen=gen)
    got = tj.ntk(model, x1, x2, batch_dim=1)
    assert got.shape == (4, 2, 5, 2)
    ps = {n: p.detach() for n, p in model.named_parameters()}

    def flat(x: Tensor) -> Tensor:
        j = jacrev(lambda ps: functional_call(model, ps, (x,)).T)(ps)  # [N, 2, *p]
        return torch.cat([j[n].reshape(*j[n].shape[:2], -1) for n in ps], -1)

    torch.testing.assert_close(got, torch.einsum("iap,jbp->iajb", flat(x1), flat(x2)))


def test_ntk_vector_output(gen: torch.Generator) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double()
    x1, x2 = randn(5, 3, gen=gen), randn(2, 3, gen=gen)
    ps = {n: p.detach() for n, p in model.named_parameters()}

    def flat(x: Tensor) -> Tensor:
        j = jacrev(lambda ps: functional_call(model, ps, (x,)))(ps)
        return torch.cat([j[n].reshape(x.shape[0], -1) for n in ps], 1)

    got = tj.ntk(model, x1, x2)
    assert got.shape == (5, 2)
    torch.testing.assert_close(got, flat(x1) @ flat(x2).T)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_module_hooks_are_part_of_the_model(gen: torch.Generator, batch_dim: int | None) -> None:
    """The model is differentiated as the user calls it: its own hooks run, and stay."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].register_forward_hook(lambda mod, inp, out: out * 2 + 1)
    model[2].register_forward_pre_hook(lambda mod, inp: (inp[0] ** 2,))
    x = randn(4, 3, gen=gen)
    ps = {n: p.detach() for n, p in model.named_parameters()}
    want = jacrev(lambda ps: functional_call(model, ps, (x,)))(ps)
    got = tj.param_jacobian(model, x, batch_dim=batch_dim)
    for n in ps:
        torch.testing.assert_close(got[n], want[n], msg=n)
    flat = torch.cat([want[n].reshape(4, 2, -1) for n in ps], -1)
    torch.testing.assert_close(tj.ntk(model, x), torch.einsum("iap,jbp->iajb", flat, flat))
    assert len(model[0]._forward_hooks) == 1 and len(model[2]._forward_pre_hooks) == 1


def test_embedding_scaled_by_frequency_per_sample_equals_full() -> None:
    """``scale_grad_by_freq``: torch's derivative divides by the index's count in the whole call,
    so the per-sample rows (closed form) and the kernel must use those counts too."""
    torch.manual_seed(0)
    emb = nn.Embedding(5, 2, scale_grad_by_freq=True, padding_idx=4)
    model = nn.Sequential(emb, nn.Flatten(), nn.Tanh(), nn.Linear(6, 2)).double()
    idx = torch.tensor([[0, 2, 2], [2, 1, 4], [3, 0, 4]])
    full = tj.param_jacobian(model, idx)
    per_sample = tj.param_jacobian(model, idx, batch_dim=0)
    for name, j in full.items():
        torch.testing.assert_close(per_sample[name], j)
    rows = torch.cat([j.reshape(6, -1) for j in full.values()], 1)
    torch.testing.assert_close(tj.ntk(model, idx).reshape(6, 6), rows @ rows.T)
