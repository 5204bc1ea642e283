"""Registry of small float64 models with their inputs, reusable by every module-level test.

Each ``ModelCase`` builds, from a seeded generator, a model (float64, parameters initialised from
the generator) and the arguments a user would pass: ``model(*args, **kwargs)``. ``batch_dim`` is
the batch dimension when samples are independent (``None`` when they are coupled, e.g.
BatchNorm in train mode). The oracles recompute the Jacobian with ``torch.func`` on detached
copies of the parameters, independent of torchjac.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

DTYPE = torch.float64
Built = tuple[nn.Module, tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class ModelCase:
    id: str
    build: Callable[[torch.Generator], Built]
    batch_dim: int | None = 0


def _init(model: nn.Module, g: torch.Generator) -> nn.Module:
    """float64, every parameter and float buffer redrawn from ``g`` (deterministic)."""
    model = model.to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DTYPE) / math.sqrt(max(p.numel(), 1)))
        for name, b in model.named_buffers():
            if b.is_floating_point():
                v = torch.rand(b.shape, generator=g, dtype=DTYPE)
                b.copy_(v + 0.5 if "var" in name else v - 0.5)
    return model


def _x(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=DTYPE)


def _mlp(g: torch.Generator) -> Built:
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    return _init(model, g), (_x(g, 6, 4),), {}


def _cnn(g: torch.Generator) -> Built:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2, dilation=1),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )
    return _init(model, g), (_x(g, 3, 2, 8, 8),), {}


class ConvVariants(nn.Module):
    """Conv1d with 'same' padding, dilation and groups; Conv2d with 'valid' and no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2)
        self.c2 = nn.Conv2d(6, 2, (2, 3), padding="valid", bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c1(x))  # [N, 6, L]
        return self.c2(h.unsqueeze(2).expand(-1, -1, 3, -1)).flatten(1)


class LayerNormTwice(nn.Module):
    """One LayerNorm (and one Linear) used twice, on a [N, T, d] sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.mid = nn.Linear(4, 4)
        self.rms = nn.RMSNorm(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.inp(x))
        h = self.norm(torch.tanh(self.mid(h)))
        h = self.rms(self.mid(h))
        return self.out(h)


class TiedEmbedding(nn.Module):
    """Embedding and output weights tied, plus a direct use of the tied weight."""

    def __init__(self, direct: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight
        self.direct = direct

    def forward(self, idx: Tensor) -> Tensor:
        h = torch.tanh(self.hidden(self.emb(idx)))
        logits = self.out(h)
        if self.direct:  # a use no hook sees: the general path must take this parameter
            logits = logits + 0.5 * h @ self.emb.weight.T
        return logits


def _tied(direct: bool) -> Callable[[torch.Generator], Built]:
    def build(g: torch.Generator) -> Built:
        idx = torch.randint(0, 7, (5, 3), generator=g)
        idx[0, 0] = 0  # the padding index gets no gradient
        return _init(TiedEmbedding(direct), g), (idx,), {}

    return build


def _frozen(g: torch.Generator) -> Built:
    model = _init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), g)
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    return model, (_x(g, 4, 3),), {}


class BareParameter(nn.Module):
    """Parameters used directly in ``forward``, besides a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.shift = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.lin(x)) * self.scale + self.shift


def _batchnorm(train: bool) -> Callable[[torch.Generator], Built]:
    def build(g: torch.Generator) -> Built:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)
        )
        model = _init(model, g).train(train)
        return model, (_x(g, 4, 2, 4, 4),), {}

    return build


class MultiInput(nn.Module):
    """Two tensor inputs, a keyword tensor and a keyword number."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.c = nn.Linear(4, 2)

    def forward(self, x: Tensor, y: Tensor, *, mask: Tensor, scale: float = 1.0) -> Tensor:
        return self.c(torch.tanh(self.a(x) + self.b(y)) * mask) * scale


def _multi(g: torch.Generator) -> Built:
    mask = (torch.rand(5, 4, generator=g) > 0.3).to(DTYPE)
    return _init(MultiInput(), g), (_x(g, 5, 3), _x(g, 5, 2)), {"mask": mask, "scale": 2.0}


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.out(h).mean(1)


def _attention(g: torch.Generator) -> Built:
    return _init(Attention(), g).eval(), (_x(g, 3, 5, 4),), {}


def _dropout_eval(g: torch.Generator) -> Built:
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.GELU(), nn.Linear(5, 2))
    return _init(model, g).eval(), (_x(g, 4, 3),), {}


def _sequence_first(g: torch.Generator) -> Built:
    """Batch at dim 1 ([T, N, d]), outputs [T, N, 2]."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))
    return _init(model, g), (_x(g, 2, 5, 3),), {}


def _single_sample(g: torch.Generator) -> Built:
    return _init(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), g), (_x(g, 1, 3),), {}


CASES: tuple[ModelCase, ...] = (
    ModelCase("mlp", _mlp),
    ModelCase("cnn", _cnn),
    ModelCase("conv_variants", lambda g: (_init(ConvVariants(), g), (_x(g, 3, 4, 7),), {})),
    ModelCase("layernorm_twice", lambda g: (_init(LayerNormTwice(), g), (_x(g, 4, 3, 3),), {})),
    ModelCase("tied_embedding", _tied(direct=False)),
    ModelCase("tied_embedding_direct_use", _tied(direct=True)),
    ModelCase("frozen", _frozen),
    ModelCase("bare_parameter", lambda g: (_init(BareParameter(), g), (_x(g, 4, 3),), {})),
    ModelCase("batchnorm_eval", _batchnorm(train=False)),
    ModelCase("batchnorm_train", _batchnorm(train=True), batch_dim=None),
    ModelCase("multi_input_kwargs", _multi),
    ModelCase("attention", _attention),
    ModelCase("dropout_eval", _dropout_eval),
    ModelCase("sequence_first", _sequence_first, batch_dim=1),
    ModelCase("single_sample", _single_sample),
)
PER_SAMPLE = tuple(c for c in CASES if c.batch_dim is not None)


def requested(model: nn.Module) -> dict[str, Tensor]:
    """The parameters ``param_jacobian`` differentiates by default, detached."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def full_oracle(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Tensor]:
    """``out.shape + p.shape`` by ``jacrev(functional_call)`` over the whole output."""
    params = requested(model)

    def f(p: dict[str, Tensor]) -> Tensor:
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # BatchNorm updates them
        return functional_call(model, {**buffers, **p}, args, kwargs)

    return jacrev(f)(params)


def per_sample_oracle(
    model: nn.Module, args: tuple, kwargs: dict, batch_dim: int
) -> dict[str, Tensor]:
    """``[N, *out_rest, *p]`` by ``vmap(jacrev(functional_call))`` over samples (batch of one)."""
    params = requested(model)
    n = args[0].shape[batch_dim]
    dims = tuple(
        batch_dim
        if isinstance(a, Tensor) and a.dim() > batch_dim and a.shape[batch_dim] == n
        else None
        for a in args
    )
    kw_t = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
    kw_o = {k: v for k, v in kwargs.items() if not isinstance(v, Tensor)}

    def f(p: dict[str, Tensor], a: tuple, kw: dict) -> Tensor:
        a1 = tuple(t if d is None else t.unsqueeze(d) for t, d in zip(a, dims))
        kw1 = {k: v.unsqueeze(batch_dim) for k, v in kw.items()}
        return functional_call(model, p, a1, {**kw1, **kw_o}).squeeze(batch_dim)

    return vmap(jacrev(f), in_dims=(None, dims, batch_dim))(params, args, kw_t)


def double_loop(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Tensor]:
    """Seed 003's oracle: one ``autograd.grad`` per output element, looped."""
    params = {n: p.detach().clone().requires_grad_(True) for n, p in requested(model).items()}
    out = functional_call(model, params, args, kwargs)
    res = {n: torch.zeros(out.shape + p.shape, dtype=out.dtype) for n, p in params.items()}
    flat = out.reshape(-1)
    for i in range(flat.numel()):
        grads = torch.autograd.grad(
            flat[i], list(params.values()), retain_graph=True, allow_unused=True
        )
        for (n, _), gr in zip(params.items(), grads):
            if gr is not None:
                res[n].view(flat.numel(), *gr.shape)[i] = gr
    return res
