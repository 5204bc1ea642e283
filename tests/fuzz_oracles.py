"""float64 ``torch.func`` oracles for the invariants fuzz, on a float64 copy of the user's model.

``oracle_model`` copies the model to float64 with the dropout masks of one realisation fixed in
place (``fuzz_models.fix_masks``) and, for BatchNorm in train mode, without running statistics
(batch statistics either way; nothing to update). Per-sample derivatives come from ``vmap`` over
one sample at a time, or, where masks fix a whole batch, from the diagonal blocks of the full
derivative.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from fuzz_models import fix_masks, replace
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

F64 = torch.float64


class _Norm(nn.Module):
    """LayerNorm or BatchNorm from primitive ops: torch's fused kernels give wrong derivatives
    of order 3 and up (their double backward treats the saved statistics as constants; pytorch
    issues 175754 and 186256), which ``create_graph`` checks of Hessians need."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.layer = isinstance(m, nn.LayerNorm)
        self.eps = m.eps
        self.weight, self.bias = m.weight, m.bias
        self.batch = not self.layer and (m.training or m.running_mean is None)
        self.stats = None if self.layer or self.batch else (m.running_mean, m.running_var)
        self.dims = len(m.normalized_shape) if self.layer else 0

    def forward(self, h: Tensor) -> Tensor:
        if self.layer:
            dims = tuple(range(h.dim() - self.dims, h.dim()))
            mean = h.mean(dims, keepdim=True)
            var = (h - mean).square().mean(dims, keepdim=True)
            return (h - mean) * (var + self.eps).rsqrt() * self.weight + self.bias
        shape = (1, -1) + (1,) * (h.dim() - 2)  # channels at dim 1
        if self.batch:
            dims = (0, *range(2, h.dim()))
            mean = h.mean(dims, keepdim=True)
            var = (h - mean).square().mean(dims, keepdim=True)
        else:
            assert self.stats is not None
            mean, var = self.stats[0].reshape(shape), self.stats[1].reshape(shape)
        out = (h - mean) * (var + self.eps).rsqrt()
        return out * self.weight.reshape(shape) + self.bias.reshape(shape)


@contextmanager
def quiet() -> Iterator[None]:
    """torch.func warns where it lacks a batching rule (e.g. ``mish_backward``): not a defect."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield


def oracle_model(model: nn.Module, masks: list[Tensor]) -> nn.Module:
    """A float64 copy of ``model`` that computes the realisation the ``masks`` fix, its
    normalisations written out (``_Norm``)."""
    m64 = fix_masks(copy.deepcopy(model), [m.to(F64) for m in masks]).to(F64)
    norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
    replace(m64, lambda m: _Norm(m) if isinstance(m, norms) else None)
    for p in m64.parameters():
        p.requires_grad_(False)
    return m64


def x64(x: Tensor) -> Tensor:
    """The user's input for an oracle: detached, float64 (indices as they are)."""
    return x.detach().to(F64) if x.is_floating_point() else x.detach()


@quiet()
def input_derivatives(
    f: Callable[[Tensor], Tensor], x: Tensor, order: int, per_sample: bool, fixed_batch: bool
) -> Tensor:
    """``order`` 1: ``[*out, *x]`` (per sample ``[B, *out_rest, *x_rest]``); 2: the Hessian
    ``[*out, *x, *x]`` (per sample ``[B, *out_rest, *x_rest, *x_rest]``). ``fixed_batch``: ``f``
    only works on the whole batch (fixed masks): per-sample blocks from the full derivative.
    ``x`` is used as given (float64; under ``torch.func.grad`` it may be a traced value)."""

    def d(g: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        return jacrev(g) if order == 1 else jacrev(jacrev(g))

    if not per_sample:
        return d(f)(x)
    if not fixed_batch:
        return vmap(d(lambda xi: f(xi.unsqueeze(0)).squeeze(0)))(x)
    full = d(f)(x)
    b, rest = x.shape[0], x.shape[1:]
    out_rest = full.shape[1 : full.dim() - order * x.dim()]
    o, i = out_rest.numel(), rest.numel()
    ar = torch.arange(b)
    if order == 1:
        blocks = full.reshape(b, o, b, i)[ar, :, ar, :]
        return blocks.reshape(b, *out_rest, *rest)
    blocks = full.reshape(b, o, b, i, b, i)[ar, :, ar, :, ar, :]
    return blocks.reshape(b, *out_rest, *rest, *rest)


def size(module: Callable[[Tensor], Tensor], x: Tensor, per_sample: bool) -> tuple[int, int]:
    """Output and input elements of ``module(x)`` (per sample: of one sample)."""
    with torch.no_grad():
        y = module(x64(x))
    if per_sample:
        return y[0].numel(), x[0].numel()
    return y.numel(), x.numel()


@quiet()
def couples(f: Callable[[Tensor], Tensor], x: Tensor) -> bool:
    """Whether an output sample of ``f`` (batch at dim 0) depends on another input sample: a
    nonzero off-diagonal block of the float64 Jacobian."""
    j = input_derivatives(f, x64(x), 1, False, True)
    b = x.shape[0]
    j = j.reshape(b, -1, b, x[0].numel())
    return bool((j * (1 - torch.eye(b, dtype=j.dtype))[:, None, :, None]).ne(0).any())


def diag_and_trace(h: Tensor, lead: int, x_rest: torch.Size) -> tuple[Tensor, Tensor]:
    """The Hessian's diagonal ``[*lead_out, *x_rest]`` and trace ``[*lead_out]`` over inputs;
    ``lead`` dims of ``h`` precede the two input blocks."""
    shape = h.shape[:lead]
    flat = h.reshape(*shape, x_rest.numel(), x_rest.numel())
    diag = flat.diagonal(dim1=-2, dim2=-1)
    return diag.reshape(*shape, *x_rest), diag.sum(-1)


@quiet()
def param_jacobians(module: nn.Module, names: list[str], *args: Tensor) -> dict[str, Tensor]:
    """``{name: out.shape + p.shape}`` of ``module(*args)`` for the parameters ``names``."""
    fixed = {n: t.detach() for n, t in (*module.named_parameters(), *module.named_buffers())}
    sel = {n: fixed[n] for n in names}
    args64 = tuple(x64(a) for a in args)

    def f(ps: dict[str, Tensor]) -> Tensor:
        return functional_call(module, {**fixed, **ps}, args64)

    return jacrev(f)(sel)


def kernel(j1: dict[str, Tensor], j2: dict[str, Tensor], shapes: dict[str, torch.Size]) -> Tensor:
    """``K = J1 J2ᵀ`` summed over parameters: ``[*out1, *out2]`` from ``out.shape + p.shape``."""
    total: Tensor | None = None
    for name, a in j1.items():
        b, pd = j2[name], len(shapes[name])
        oa, ob = a.shape[: a.dim() - pd], b.shape[: b.dim() - pd]
        k = (a.reshape(oa.numel(), -1) @ b.reshape(ob.numel(), -1).T).reshape(*oa, *ob)
        total = k if total is None else total + k
    assert total is not None
    return total


@quiet()
def graph_jacobians(
    module: nn.Module,
    x: Tensor,
    names: list[str],
    with_x: bool,
    override: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``y = module(x)`` and the full Jacobians ``y.shape + t.shape`` for ``x`` (key ``"x"``,
    when ``with_x``) and the parameters ``names``; ``override`` replaces parameters (by name)
    and ``x`` (key ``"x"``), for derivatives of the oracle itself."""
    fixed = {n: t.detach() for n, t in (*module.named_parameters(), *module.named_buffers())}
    fixed.update({k: v for k, v in (override or {}).items() if k != "x"})
    x64 = (override or {}).get("x", x)
    sel = {n: fixed[n] for n in names}
    if with_x:
        sel["x"] = x64

    def f(d: dict[str, Tensor]) -> Tensor:
        ps = {k: v for k, v in d.items() if k != "x"}
        return functional_call(module, {**fixed, **ps}, (d.get("x", x64),))

    return f(sel), jacrev(f)(sel)


def with_params(module: nn.Module, override: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """``module`` as a function of its input, with some parameters replaced."""
    fixed = {n: t.detach() for n, t in (*module.named_parameters(), *module.named_buffers())}
    state = {**fixed, **override}
    return lambda x: functional_call(module, state, (x,))
