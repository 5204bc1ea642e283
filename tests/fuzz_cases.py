"""Hypothesis strategies for the invariants fuzz: a ``Case`` (model, input, flags) per example.

Families: ``mlp`` (Linear, activations, LayerNorm, Dropout, BatchNorm1d, an Embedding looked up
at fixed indices), ``conv1d``/``conv2d`` (convolutions, BatchNorm, then maybe Flatten and
Linear) on float inputs, and ``embed`` (an Embedding first, on indices: the module front doors
and ``jac``/``gramian`` of the parameters only). Widths and input features are drawn from
{1, 2, 3, ...} so width-1 layers and ``in_features == 1`` are frequent; the batch from
{1, 2, 3, 12} (12: more samples than the coupling check covers pairwise) or unbatched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fuzz_models import ACTS, FNS, Arch
from hypothesis import strategies as st
from torch import Tensor, nn

# first the plainest choices (hypothesis shrinks towards them): the activations the fast paths
# know, a plain Sequential
ACT_NAMES = list(ACTS) + list(FNS)
STYLES = ("seq", "seq", "nested", "func", "lambda_seq", "lambda_func")
FLOAT_FAMILIES = ("mlp", "mlp", "conv1d", "conv2d")
BATCHES = (None, 1, 2, 3, 12)
MODES = ("auto", "rev", "fwd")
CHUNKS = (None, 1, 2, 3)
MEMORY = (None, 16384)  # with chunk_size=None: the default budget, or one that forces chunks
# probes a call may need at most (a loop of chunk_size=1 over more takes seconds per example)
MAX_PAIRS = 200  # second order: output elements x input elements (per sample with batch_dim)
MAX_ENTRIES = 3000  # first order: output elements x input (or parameter) elements


_SPECIAL = (nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Case:
    """One model and input; ``build`` makes them afresh from ``seed``."""

    arch: Arch
    batch: int | None  # None: an unbatched input
    dtype: torch.dtype
    seed: int
    training: bool  # model.train() (else eval)
    flip: int  # flip the train/eval flag of this dropout/BatchNorm (-1: none)
    grads: bool  # give every other parameter a .grad
    frozen: bool  # the first parameter does not require grad

    def build(self) -> tuple[nn.Module, Tensor]:
        """The raw model (before a lambda wraps it) and the input."""
        model = self.arch.build(self.seed, self.dtype).train(self.training)
        special = [m for m in model.modules() if isinstance(m, _SPECIAL)]
        if 0 <= self.flip < len(special):
            special[self.flip].train(not special[self.flip].training)
        params = list(model.parameters())
        g = torch.Generator().manual_seed(self.seed + 1)
        if self.grads:
            for p in params[::2]:
                p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if self.frozen and len(params) > 1:
            params[0].requires_grad_(False)
        lead = () if self.batch is None else (self.batch,)
        shape = (*lead, *self.arch.sample_shape)
        if self.arch.vocab:
            x = torch.randint(self.arch.vocab, shape, generator=g)
        else:
            x = torch.randn(shape, generator=g, dtype=torch.float64).to(self.dtype)
        return model, x


def coupled(model: nn.Module) -> bool:
    """A BatchNorm in train mode normalises with batch statistics: samples are coupled."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )


@st.composite
def _extras(draw: st.DrawFn, width: int, nd: int, bn: bool) -> list[tuple]:
    """What may follow a Linear (``nd == 0``) or a convolution over ``nd`` dims."""
    out: list[tuple] = []
    if draw(st.integers(0, 3)):
        out.append(("act", draw(st.sampled_from(ACT_NAMES))))
    r = draw(st.integers(0, 5))
    if r == 1 and nd == 0 and width > 1:  # LayerNorm(1) is constant: its derivatives of order
        out.append(("layernorm", width))  # 2 and up are rounding noise times eps ** -k / 2
    elif r == 2:
        out.append(("dropout", draw(st.sampled_from([0.0, 0.5]))))
    elif r == 3 and bn:
        out.append(("batchnorm", width, max(nd, 1)))
    return out


_WIDTH = st.sampled_from([1, 1, 2, 3, 4])


@st.composite
def _mlp(draw: st.DrawFn, d0: int, bn: bool, last: int | None = None) -> list[tuple]:
    layers: list[tuple] = []
    d, n = d0, draw(st.integers(1, 3))
    for i in range(n):
        w = draw(_WIDTH) if last is None or i < n - 1 else last
        layers.append(("linear", d, w, draw(st.booleans())))
        if i < n - 1 or draw(st.booleans()):
            layers += draw(_extras(w, 0, bn))
        d = w
    return layers


@st.composite
def archs(draw: st.DrawFn, family: str, bn: bool) -> Arch:
    """An architecture of ``family``; BatchNorm only when ``bn`` (a batch of 2 or more)."""
    style = draw(st.sampled_from(STYLES))
    if family == "mlp":
        d0 = draw(st.sampled_from([1, 1, 2, 3, 5]))
        head = [("scale_embed", 3, d0)] if draw(st.integers(0, 4)) == 4 else []
        return Arch((*head, *draw(_mlp(d0, bn))), (d0,), style=style)
    if family == "embed":
        vocab, t, e = draw(st.sampled_from([2, 3, 5])), draw(st.integers(1, 3)), draw(_WIDTH)
        layers = [("embedding", vocab, e), *draw(_extras(e, 1, False)), *draw(_mlp(e, False))]
        return Arch(tuple(layers), (t,), vocab=vocab, style=style)
    nd = 1 if family == "conv1d" else 2
    c = draw(st.sampled_from([1, 1, 2, 3]))
    spatial = [draw(st.integers(3, 5 if nd == 1 else 4)) for _ in range(nd)]
    sample = (c, *spatial)
    layers = []
    for _ in range(draw(st.integers(1, 2))):
        co, k = draw(st.sampled_from([1, 2, 3])), draw(st.integers(1, 3))
        stride, pad = draw(st.sampled_from([1, 2])), draw(st.sampled_from([0, 1]))
        if min(spatial) + 2 * pad < k:
            k = min(spatial) + 2 * pad
        layers.append((f"conv{nd}d", c, co, k, stride, pad, draw(st.booleans())))
        spatial = [(s + 2 * pad - k) // stride + 1 for s in spatial]
        c = co
        layers += draw(_extras(c, nd, bn))
    if draw(st.booleans()):
        flat = c * int(torch.tensor(spatial).prod())
        layers += [("flatten", -1 - nd), *draw(_mlp(flat, bn))]
    return Arch(tuple(layers), sample, style=style)


@st.composite
def cases(
    draw: st.DrawFn,
    families: tuple[str, ...],
    batches: tuple[int | None, ...] = BATCHES,
) -> Case:
    batch = draw(st.sampled_from(batches))
    family = draw(st.sampled_from(families))
    arch = draw(archs(family, bn=batch is not None and batch >= 2))
    return Case(
        arch=arch,
        batch=batch,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**16)),
        training=draw(st.booleans()),
        flip=draw(st.integers(0, 2)) - 1,
        grads=draw(st.booleans()),
        frozen=draw(st.integers(0, 3)) == 3,
    )


def sample_rest(x: Tensor, batched: bool) -> torch.Size:
    return x.shape[1:] if batched else x.shape
