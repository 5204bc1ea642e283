"""Models for the invariants fuzz: an architecture is plain data (``Arch``), built three ways.

A layer is a tuple (``("linear", 3, 1, True)``, ``("act", "gelu_tanh")``, ...), so hypothesis
prints and shrinks it and ``Arch.code()`` writes the model as a user would. Styles:

- ``seq``: ``nn.Sequential`` of the layers (``nested``: two Sequentials in one);
- ``func``: a module class whose ``forward`` calls ``torch.nn.functional`` on the layers' tensors
  (the same operations without the module types the fast paths know);
- ``lambda``: either of them behind a lambda (a function for the function front doors, a module
  calling a lambda for the module ones).

Dropout masks for the oracles: ``record_masks`` runs a model once with every active dropout
drawing its mask from the current RNG exactly as ``F.dropout`` would (same shape and dtype, so
the same random numbers), and ``fix_masks`` puts those masks in place of the dropouts of a copy,
which is then deterministic (the oracle of one realisation).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the activation modules the fast paths know (taylor_activations.MODULES), then others
ACTS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "softplus": nn.Softplus,
    "softplus_b2_t1": lambda: nn.Softplus(beta=2.0, threshold=1.0),
    "elu": nn.ELU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "mish": nn.Mish,
}
# elementwise functions without a module (ACTIVATIONS of the Taylor mode): a small Fn module
FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "sin": torch.sin,
    "cos": torch.cos,
    "exp": lambda h: torch.exp(0.5 * h),
    "square": torch.square,
    "pow3": lambda h: h**3,
    "log": lambda h: torch.log(h * h + 1),
}


class Fn(nn.Module):
    """An elementwise function of ``FNS`` as a module."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, h: Tensor) -> Tensor:
        return FNS[self.name](h)


class ScaleEmbed(nn.Module):
    """``h * E[idx]``: an Embedding looked up at fixed indices scales the features."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 1)
        self.register_buffer("idx", torch.arange(d) % vocab)

    def forward(self, h: Tensor) -> Tensor:
        return h * F.embedding(self.idx, self.emb.weight).squeeze(-1)


def _layer(spec: tuple) -> nn.Module:
    kind, *a = spec
    if kind == "linear":
        return nn.Linear(a[0], a[1], bias=a[2])
    if kind in ("conv1d", "conv2d"):
        cls = nn.Conv1d if kind == "conv1d" else nn.Conv2d
        return cls(a[0], a[1], a[2], stride=a[3], padding=a[4], bias=a[5])
    if kind == "act":
        return ACTS[a[0]]() if a[0] in ACTS else Fn(a[0])
    if kind == "layernorm":
        return nn.LayerNorm(a[0])
    if kind == "dropout":
        return nn.Dropout(a[0])
    if kind == "batchnorm":
        return (nn.BatchNorm1d, nn.BatchNorm2d)[a[1] - 1](a[0])
    if kind == "flatten":
        return nn.Flatten(a[0])
    if kind == "embedding":
        return nn.Embedding(a[0], a[1])
    if kind == "scale_embed":
        return ScaleEmbed(a[0], a[1])
    raise ValueError(spec)


class FunctionalNet(nn.Module):
    """The layers' tensors, applied by ``torch.nn.functional`` in a hand-written ``forward``."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h: Tensor) -> Tensor:
        for m in self.layers:
            h = _functional(m, h)
        return h


def _functional(m: nn.Module, h: Tensor) -> Tensor:
    t = type(m)
    if t is nn.Linear:
        return F.linear(h, m.weight, m.bias)
    if t is nn.Conv1d:
        return F.conv1d(h, m.weight, m.bias, m.stride, m.padding)
    if t is nn.Conv2d:
        return F.conv2d(h, m.weight, m.bias, m.stride, m.padding)
    if t is nn.Tanh:
        return torch.tanh(h)
    if t is nn.Sigmoid:
        return torch.sigmoid(h)
    if t is nn.ReLU:
        return torch.relu(h)
    if t is nn.GELU:
        return F.gelu(h, approximate=m.approximate)
    if t is nn.Softplus:
        return F.softplus(h, m.beta, m.threshold)
    if t is nn.LayerNorm:
        return F.layer_norm(h, m.normalized_shape, m.weight, m.bias, m.eps)
    if t is nn.Dropout:
        return F.dropout(h, m.p, m.training)
    if t in (nn.BatchNorm1d, nn.BatchNorm2d):
        train = m.training or m.running_mean is None
        return F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, train, 0.1, m.eps)
    if t is nn.Flatten:
        return h.flatten(m.start_dim, m.end_dim)
    if t is nn.Embedding:
        return F.embedding(h, m.weight)
    return m(h)  # SiLU, ELU, ... through the module; Fn, ScaleEmbed, oracle masks


class Called(nn.Module):
    """A module whose ``forward`` is a lambda around ``inner``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.fn = lambda x: self.inner(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


@dataclass(frozen=True)
class Arch:
    """A model: its layers, its per-sample input shape, and how it is written."""

    layers: tuple[tuple, ...]
    sample_shape: tuple[int, ...]  # per-sample input shape
    vocab: int = 0  # > 0: the input is indices below it (an Embedding first)
    style: str = "seq"  # seq | nested | func | lambda_seq | lambda_func

    def build(self, seed: int, dtype: torch.dtype) -> nn.Module:
        """The model, its parameters and float buffers drawn from ``seed`` (global RNG kept)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            mods = [_layer(s) for s in self.layers]
            for m in mods:
                _redraw(m)
        if self.style in ("seq", "lambda_seq"):
            model: nn.Module = nn.Sequential(*mods)
        elif self.style == "nested":
            k = len(mods) // 2
            model = nn.Sequential(nn.Sequential(*mods[:k]), nn.Sequential(*mods[k:]))
        else:
            model = FunctionalNet(mods)
        return model.to(dtype)

    @property
    def is_lambda(self) -> bool:
        return self.style.startswith("lambda")

    def code(self) -> str:
        """Python that builds the architecture (the repro in a report)."""
        mods = ", ".join(_code(s) for s in self.layers)
        inner = {"func": "FunctionalNet([{}])", "lambda_func": "FunctionalNet([{}])"}.get(
            self.style, "nn.Sequential({})"
        )
        return f"{inner.format(mods)}  # style={self.style}, sample {list(self.sample_shape)}" + (
            f", indices < {self.vocab}" if self.vocab else ""
        )


def _code(spec: tuple) -> str:
    kind, *a = spec
    names = {
        "linear": "nn.Linear({}, {}, bias={})",
        "layernorm": "nn.LayerNorm({})",
        "dropout": "nn.Dropout({})",
        "flatten": "nn.Flatten({})",
        "embedding": "nn.Embedding({}, {})",
        "scale_embed": "ScaleEmbed({}, {})",
    }
    if kind in names:
        return names[kind].format(*a)
    if kind in ("conv1d", "conv2d"):
        args = f"{a[0]}, {a[1]}, {a[2]}, stride={a[3]}, padding={a[4]}, bias={a[5]}"
        return f"nn.{kind.capitalize()}({args})"
    if kind == "batchnorm":
        return f"nn.BatchNorm{a[1]}d({a[0]})"
    return f"ACTS[{a[0]!r}]()" if a[0] in ACTS else f"Fn({a[0]!r})"


def _redraw(m: nn.Module) -> None:
    """Non-trivial affine parameters and running statistics (defaults are ones and zeros)."""
    with torch.no_grad():
        if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
        if isinstance(m, ScaleEmbed):
            m.emb.weight.uniform_(0.5, 1.5)


def as_function(arch: Arch, model: nn.Module) -> Callable[[Tensor], Tensor]:
    """What a user passes to the function front doors."""
    return (lambda x: model(x)) if arch.is_lambda else model


def as_module(arch: Arch, model: nn.Module) -> nn.Module:
    """What a user passes to the module front doors (a lambda style behind ``Called``)."""
    return Called(model) if arch.is_lambda else model


# ----------------------------------------------------------------------- dropout masks (oracle)


class _Record(nn.Module):
    def __init__(self, p: float, store: list[Tensor]) -> None:
        super().__init__()
        self.p, self.store = p, store

    def forward(self, h: Tensor) -> Tensor:
        mask = F.dropout(torch.ones_like(h), self.p, True)  # the random numbers F.dropout draws
        self.store.append(mask)
        return h * mask


class _Fixed(nn.Module):
    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, h: Tensor) -> Tensor:
        return h * self.mask.to(h.dtype)


def active_dropouts(model: nn.Module) -> bool:
    return any(type(m) is nn.Dropout and m.training and m.p > 0 for m in model.modules())


def replace(root: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> None:
    """Replace, depth first, each submodule for which ``make`` returns a module."""
    for name, child in list(root.named_children()):
        new = make(child)
        if new is not None:
            setattr(root, name, new)
        else:
            replace(child, make)


def record_masks(model: nn.Module, *args: Any) -> list[Tensor]:
    """The masks the active dropouts draw when ``model(*args)`` runs now (RNG advanced)."""
    rec = copy.deepcopy(model)
    store: list[Tensor] = []

    def make(m: nn.Module) -> nn.Module | None:
        return _Record(m.p, store) if type(m) is nn.Dropout and m.training and m.p > 0 else None

    replace(rec, make)
    with torch.no_grad():
        rec(*args)
    return store


def fix_masks(model: nn.Module, masks: list[Tensor]) -> nn.Module:
    """``model`` (changed in place) with its active dropouts replaced by ``masks`` in order."""
    it = iter(masks)

    def make(m: nn.Module) -> nn.Module | None:
        return _Fixed(next(it)) if type(m) is nn.Dropout and m.training and m.p > 0 else None

    replace(model, make)
    return model
