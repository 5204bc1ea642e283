"""NOTE [sequential proof]: a plain ``nn.Sequential`` of listed layers skips the coupling check;
every way out of the proof (a layer type, its configuration, the input's rank, hooks, a replaced
``forward``) gets the check, and a coupling there is caught."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import torchjac as tj
from torchjac._engine.core.module_proof import proven_per_sample

pytestmark = pytest.mark.filterwarnings("ignore:.*performance drop.*:UserWarning")
DTYPE = torch.float64


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(1, 3, 3, stride=2, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.MaxPool2d(2)),
            nn.Dropout(0.3),
            nn.Flatten(),
            nn.Linear(16, 5),
            nn.LayerNorm(5),
            nn.Tanh(),
            nn.Linear(5, 3),
            nn.LogSoftmax(dim=-1),
        )
        .to(DTYPE)
        .eval()
    )


def _oracle(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    one = lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)  # noqa: E731
    return vmap(jacrev(one), in_dims=(None, 0))(params, x)


def test_a_proven_sequential_skips_the_check_and_is_exact(verified: list[int]) -> None:
    model, x = _cnn(), torch.randn(6, 1, 12, 12, dtype=DTYPE)
    assert proven_per_sample(model, (x,), {}, 0)
    got = tj.param_jacobian(model, x, batch_dim=0)
    for name, ref in _oracle(model, x).items():
        torch.testing.assert_close(got[name], ref)
    tj.ntk(model, x, batch_dim=0)
    assert verified == []


class Centered(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x - x.mean(0)


class CenteredSequential(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        out = super().forward(x)
        return out - out.mean(0)


def _hooked(global_hook: bool) -> Iterator[nn.Module]:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)

    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return out - out.mean(0)

    handle = (
        nn.modules.module.register_module_forward_hook(hook)
        if global_hook
        else model[1].register_forward_hook(hook)
    )
    try:
        yield model
    finally:
        handle.remove()


def _replaced_forward() -> Iterator[nn.Module]:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).to(DTYPE)

    def forward(x: Tensor) -> Tensor:
        out = nn.Sequential.forward(model, x)
        return out - out.mean(0)

    model.forward = forward  # type: ignore[method-assign]
    yield model


def _one(model: nn.Module) -> Callable[[], Iterator[nn.Module]]:
    return lambda: iter([model.to(DTYPE)])


# (make the model, input shape): each couples the samples in a way the proof must not accept
COUPLED: dict[str, tuple[Callable[[], Iterator[nn.Module]], tuple[int, ...]]] = {
    "an unlisted layer": (_one(nn.Sequential(nn.Linear(4, 3), Centered())), (5, 4)),
    "a Sequential subclass": (_one(CenteredSequential(nn.Linear(4, 3))), (5, 4)),
    "a replaced forward": (_replaced_forward, (5, 4)),
    "a forward hook": (lambda: _hooked(False), (5, 4)),
    "a global forward hook": (lambda: _hooked(True), (5, 4)),
    "softmax over the batch": (_one(nn.Sequential(nn.Linear(4, 3), nn.Softmax(0))), (5, 4)),
    "batch norm in training": (
        _one(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()),
        (5, 4),
    ),
    "batch norm without running stats": (
        _one(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).eval()),
        (5, 4),
    ),
    "layer norm over the batch too": (
        _one(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm((5, 3)))),
        (5, 4),
    ),
    "a convolution on an unbatched input": (
        _one(nn.Sequential(nn.Conv2d(5, 5, 3, padding=1))),  # dim 0 is its channels
        (5, 4, 4),
    ),
}


@pytest.mark.parametrize("name", list(COUPLED))
def test_every_way_out_of_the_proof_is_checked(name: str) -> None:
    make, shape = COUPLED[name]
    x = torch.randn(*shape, dtype=DTYPE)
    for model in make():
        assert not proven_per_sample(model, (x,), {}, 0)
        with pytest.raises(tj.BatchCouplingError):
            tj.param_jacobian(model, x, batch_dim=0)


def test_other_layouts_are_not_proven() -> None:
    model = nn.Sequential(nn.Linear(4, 3)).to(DTYPE)
    x = torch.randn(2, 5, 4, dtype=DTYPE)
    assert not proven_per_sample(model, (x,), {}, 1)  # the batch is not leading
    assert not proven_per_sample(model, (x[0, 0],), {}, 0)  # rank 1: the batch is the features
    assert not proven_per_sample(model, (x, x), {}, 0)
    assert not proven_per_sample(model, (x,), {"scale": 2}, 0)
    assert not proven_per_sample(nn.Sequential(nn.Dropout(0.5)).train(), (x,), {}, 0)


def test_the_output_must_keep_the_batch_at_a_negative_batch_dim_too() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Unflatten(1, (3, 2))).to(DTYPE)
    x = torch.randn(3, 6, dtype=DTYPE)
    assert not proven_per_sample(model, (x,), {}, -2)  # -2 is dim 0 of x but dim 1 of the output
    with pytest.raises(tj.BatchCouplingError):
        tj.param_jacobian(model, x, batch_dim=-2)
    with pytest.raises(tj.BatchCouplingError):
        tj.ntk(model, x, batch_dim=-2)


def test_patched_calls_are_not_proven(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 3, dtype=DTYPE)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)
    assert proven_per_sample(model, (x,), {}, 0)
    model[1]._call_impl = lambda h: torch.tanh(h - h.mean(0, keepdim=True))  # type: ignore[method-assign]
    assert not proven_per_sample(model, (x,), {}, 0)
    with pytest.raises(tj.BatchCouplingError):
        tj.param_jacobian(model, x, batch_dim=0)
    del model[1]._call_impl
    monkeypatch.setattr(nn.Tanh, "forward", lambda self, h: torch.tanh(h - h.mean(0, keepdim=True)))
    assert not proven_per_sample(model, (x,), {}, 0)
    with pytest.raises(tj.BatchCouplingError):
        tj.param_jacobian(model, x, batch_dim=0)


def test_a_module_shared_by_two_paths_keeps_its_parameters() -> None:
    shared = nn.Linear(4, 4).to(DTYPE)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(3, 4, dtype=DTYPE)
    got = tj.param_jacobian(model, x, batch_dim=0)
    tj.param_jacobian(model, x)
    tj.ntk(model, x)
    assert isinstance(shared.weight, nn.Parameter) and isinstance(shared.bias, nn.Parameter)
    assert model[0].weight is model[2].weight and list(model.parameters()) == [
        shared.weight,
        shared.bias,
    ]
    params = {k: v.detach() for k, v in model.named_parameters()}
    one = lambda p, xi: functional_call(model, p, (xi[None],), tie_weights=False)[0]  # noqa: E731
    ref = vmap(jacrev(one), in_dims=(None, 0))(params, x)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name])
