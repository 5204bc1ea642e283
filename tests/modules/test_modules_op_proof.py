"""NOTE [op batch proof]: module classes written as users write them (functional ``forward``,
``ModuleList`` loops, residual adds, slicing, attention) are proven per sample from the ops
their forward runs and skip the coupling check, exactly; every coupling a forward can hide (a
batch statistic, a branch on values, a custom ``autograd.Function`` or backward hook, a write
into a buffer) is not proven, and the check catches it."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import torchjac as tj
from torchjac._engine.modules.batch_trace import BatchTrace, _index_bdim

pytestmark = pytest.mark.filterwarnings("ignore:.*performance drop.*:UserWarning")
DTYPE = torch.float64


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.c1(x)))
        x = F.max_pool2d(F.gelu(self.c2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class Residual(nn.Module):
    def __init__(self, width: int = 1) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x * self.scale))
        for block in self.blocks:
            h = h + F.silu(block(h))
        return self.out(self.norm(h))[..., :1] * 2


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:  # [N, T, 4] -> [N, 4]
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / 2
        return (torch.softmax(scores, dim=-1) @ self.v(x)).mean(1)


PROVEN = {
    "a CNN with a functional forward": (lambda: CNN().eval(), (5, 1, 10, 10)),
    "a residual ModuleList loop, sliced": (lambda: Residual(4), (5, 3)),
    "width-1 layers": (lambda: Residual(1), (4, 3)),
    "attention within each sample": (Attention, (3, 5, 4)),
}


def _oracle(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    one = lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)  # noqa: E731
    return vmap(jacrev(one), in_dims=(None, 0))(params, x)


@pytest.mark.parametrize("name", list(PROVEN))
def test_module_classes_are_proven_and_exact(name: str, verified: list[int]) -> None:
    make, shape = PROVEN[name]
    torch.manual_seed(0)
    model, x = make().to(DTYPE), torch.randn(*shape, dtype=DTYPE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = tj.param_jacobian(model, x, batch_dim=0)
    ref = _oracle(model, x)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    kernel = tj.ntk(model, x, batch_dim=0)
    flat = torch.cat([r.reshape(*r.shape[: r.dim() - model.get_parameter(k).dim()], -1)
                      .flatten(1, -2) for k, r in ref.items()], dim=-1)  # fmt: skip
    n, c = flat.shape[:2]
    torch.testing.assert_close(kernel.reshape(n * c, n * c), (flat @ flat.flatten(0, 1).T)
                               .reshape(n * c, n * c))  # fmt: skip
    assert verified == []  # no coupling check ran
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class _Coupled(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how, self.lin = how, nn.Linear(3, 3)
        self.register_buffer("seen", torch.zeros(5, 3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        if self.how == "a batch statistic":
            return h - h.mean(0)
        if self.how == "a branch on values":
            return h + h.roll(1, 0) if bool(h.sum() > -1e9) else h
        if self.how == "a custom Function":
            return _MeanGrad.apply(h)
        if self.how == "a write into a buffer":
            buf = self.seen.clone()
            buf[:] = h.flip(0)
            return h + buf
        raise AssertionError(self.how)


class _MeanGrad(torch.autograd.Function):
    """Identity forward, a backward that mixes the samples."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:  # type: ignore[no-untyped-def, override]
        return h * 1

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[no-untyped-def, override]
        return g.mean(0, keepdim=True).expand_as(g)


def _hooked() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x) * 1

    def hook(module: nn.Module, grad_in: tuple, grad_out: tuple) -> tuple:
        return (grad_in[0].mean(0, keepdim=True).expand_as(grad_in[0]),)

    model[1].register_full_backward_hook(hook)
    return Wrap()


COUPLED = {
    how: (lambda how=how: _Coupled(how))
    for how in (
        "a batch statistic",
        "a branch on values",
        "a custom Function",
        "a write into a buffer",
    )
}
COUPLED["a backward hook"] = _hooked


@pytest.mark.parametrize("how", list(COUPLED))
def test_hidden_couplings_are_not_proven_and_are_caught(how: str) -> None:
    torch.manual_seed(0)
    model, x = COUPLED[how]().to(DTYPE), torch.randn(5, 3, dtype=DTYPE)
    with BatchTrace.of((x,), {}, 0) as trace:
        out = model(x.clone().requires_grad_())
    assert trace is not None and not trace.proves(out, 0)
    with pytest.raises(tj.BatchCouplingError):
        tj.param_jacobian(model, x, batch_dim=0)


def test_the_batch_is_followed_at_other_dims_and_must_end_at_batch_dim() -> None:
    lin = nn.Linear(4, 2).to(DTYPE)
    x = torch.randn(3, 5, 4, dtype=DTYPE)  # the batch at dim 1
    with BatchTrace.of((x,), {}, 1) as trace:
        out = F.relu(lin(x)).transpose(0, 1)  # now at dim 0
    assert trace is not None and trace.proves(out, 0) and not trace.proves(out, 1)
    with BatchTrace.of((x,), {}, 1) as trace:
        out = lin(x).sum(1)  # a sum over the batch
    assert trace is not None and not trace.proves(out, 1) and trace.failed == "sum"


def test_an_input_without_the_batch_ends_the_proof() -> None:
    x, table = torch.randn(5, 3), torch.randn(4, 3)  # the table is not batched
    with BatchTrace.of((x, table), {}, 0) as trace:
        out = torch.tanh(x) + table.sum(0)
    assert trace is not None and not trace.proves(out, 0)
    with BatchTrace.of((table, x), {}, 0) as trace:  # first, the table sets the size: 4
        out = table * 2 + x.mean(0)  # x's samples mixed: x is not proven to be the batch
    assert trace is not None and not trace.proves(out, 0)


def test_no_trace_under_another_mode_or_without_a_batch() -> None:
    x = torch.randn(3, 4)
    with BatchTrace.of((x,), {}, None) as trace:
        assert trace is None
    with torch.overrides.TorchFunctionMode(), BatchTrace.of((x,), {}, 0) as trace:
        assert trace is None


INDEXES = [
    1,
    slice(None),
    slice(1, 3),
    (Ellipsis, 0),
    (Ellipsis, slice(0, 2)),
    (None, Ellipsis),
    (slice(None), None, 2, Ellipsis, 0),
    (0, slice(None), None),
    (slice(None), slice(None), slice(None), slice(None), None),
]


def _where_torch_puts(out: Tensor) -> list[int]:
    """The dims of ``out`` along which its values (sample numbers) vary, and only along them."""
    found = []
    for d in range(out.dim()):
        others = [e for e in range(out.dim()) if e != d]
        hi = out.amax(dim=others) if others else out
        lo = out.amin(dim=others) if others else out
        if torch.equal(hi, lo) and bool((hi != hi[0]).any()):
            found.append(d)
    return found


@pytest.mark.parametrize(("index", "b"), list(itertools.product(INDEXES, range(4))))
def test_basic_indexing_moves_the_batch_where_torch_does(index: object, b: int) -> None:
    shape = [2, 3, 4, 5]
    view = [1] * 4
    view[b] = shape[b]
    marked = torch.arange(shape[b]).reshape(view).expand(*shape)  # each element names its sample
    got = _index_bdim(index, b, 4)
    out = marked[index]  # type: ignore[index]
    where = _where_torch_puts(out)
    selected = (isinstance(index, int) and b == 0) or (
        isinstance(index, tuple) and any(type(i) is int for i in index[:1]) and b == 0
    )
    if got is None:
        assert selected or not where, (index, b)
    else:
        assert (not selected and [got] == where) or out.shape[got] < 2, (index, b, got, where)
