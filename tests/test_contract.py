"""The public API against its contract (DESIGN.md "Public API" and STYLE.md), name by name.

Signatures (names, order, kinds, defaults), ``__all__``, the two named exceptions, docstrings
with a runnable example, and one tiny float64 problem per function checking the layout rule
(rows, then columns) and the result container against ``torch.func`` oracles.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import randn
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacfwd, jacrev, vmap

import torchjac as tj

P = inspect.Parameter
POK, KO = P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY
VARARGS, VARKW = P.VAR_POSITIONAL, P.VAR_KEYWORD
REQ = P.empty

PUBLIC = (
    "BatchCouplingError",
    "FallbackWarning",
    "__version__",
    "gramian",
    "hessian",
    "hessian_diagonal",
    "jac",
    "jacobian",
    "laplacian",
    "ntk",
    "param_jacobian",
)
FUNCTIONS = tuple(n for n in PUBLIC if n[0].islower() and not n.startswith("_"))

# (name, kind, default) exactly as DESIGN.md states them.
JAC = (
    ("outputs", POK, REQ),
    ("inputs", POK, REQ),
    ("jac_outputs", POK, None),
    ("batch_dim", KO, None),
    ("mode", KO, "auto"),
    ("chunk_size", KO, None),
    ("max_memory", KO, None),
    ("retain_graph", KO, None),
    ("create_graph", KO, False),
    ("allow_unused", KO, False),
)
FUNCTIONAL = (
    ("func", POK, REQ),
    ("inputs", POK, REQ),
    ("batch_dim", KO, None),
    ("mode", KO, "auto"),
    ("has_aux", KO, False),
    ("chunk_size", KO, None),
    ("max_memory", KO, None),
    ("create_graph", KO, False),
)
PARAM_JACOBIAN = (
    ("model", POK, REQ),
    ("args", VARARGS, REQ),
    ("params", KO, None),
    ("batch_dim", KO, None),
    ("chunk_size", KO, None),
    ("max_memory", KO, None),
    ("kwargs", VARKW, REQ),
)
EXACT = {
    "jac": JAC,
    "jacobian": FUNCTIONAL,
    "hessian": FUNCTIONAL,
    "hessian_diagonal": FUNCTIONAL,
    "laplacian": FUNCTIONAL,
    "param_jacobian": PARAM_JACOBIAN,
}
# DESIGN.md gives a prefix and "...": the rest must be keyword-only options of the sibling.
PREFIXED = {
    "gramian": (
        (("outputs", POK, REQ), ("inputs", POK, REQ), ("batch_dim", KO, None)),
        {n: d for n, k, d in JAC if k is KO},
    ),
    "ntk": (
        (
            ("model", POK, REQ),
            ("x1", POK, REQ),
            ("x2", POK, None),
            ("params", KO, None),
            ("batch_dim", KO, 0),
        ),
        {n: d for n, k, d in PARAM_JACOBIAN if k is KO},
    ),
}


def _described(fn: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def _same(a: Any, b: Any) -> bool:
    # `False == 0` in Python: compare the type too, so a default of 0 is not taken for False.
    return type(a) is type(b) and a == b


# ---------------------------------------------------------------------------------------------
# Names, signatures, docstrings


def test_all_is_exactly_the_public_names() -> None:
    assert sorted(tj.__all__) == sorted(PUBLIC)
    assert len(tj.__all__) == len(set(tj.__all__))
    for name in PUBLIC:
        assert hasattr(tj, name), name


def test_no_other_public_callables_leak() -> None:
    leaked = [
        n
        for n, v in vars(tj).items()
        if not n.startswith("_") and n not in PUBLIC and not inspect.ismodule(v)
    ]
    assert leaked == []


def test_version() -> None:
    assert isinstance(tj.__version__, str)
    parts = tj.__version__.split(".")
    assert len(parts) >= 2 and all(p.isdigit() for p in parts[:2])
    assert tj.__version__ == importlib.metadata.version("torchjac")


def test_named_exceptions() -> None:
    assert issubclass(tj.BatchCouplingError, ValueError)
    assert issubclass(tj.FallbackWarning, UserWarning)
    assert tj.BatchCouplingError.__module__.startswith("torchjac")
    assert tj.FallbackWarning.__module__.startswith("torchjac")
    with pytest.raises(ValueError, match="coupled"):
        raise tj.BatchCouplingError("coupled")


@pytest.mark.parametrize("name", sorted(EXACT))
def test_signature_exact(name: str) -> None:
    got = _described(getattr(tj, name))
    want = list(EXACT[name])
    assert [g[:2] for g in got] == [w[:2] for w in want], name
    for (pname, _, gd), (_, _, wd) in zip(got, want):
        assert _same(gd, wd) or gd is wd, f"{name}({pname}=...) default {gd!r} != {wd!r}"


@pytest.mark.parametrize("name", sorted(PREFIXED))
def test_signature_prefix_then_keyword_options(name: str) -> None:
    got = _described(getattr(tj, name))
    prefix, options = PREFIXED[name]
    got_prefix = [g for g in got if g[0] in {p[0] for p in prefix}]
    assert [g[:2] for g in got_prefix] == [p[:2] for p in prefix]
    # the positional parameters are exactly the contract's, in order
    assert [g[:2] for g in got if g[1] is not KO] == [p[:2] for p in prefix if p[1] is not KO]
    for (pname, _, gd), (_, _, wd) in zip(got_prefix, prefix):
        assert _same(gd, wd) or gd is wd, f"{name}({pname}=...) default {gd!r} != {wd!r}"
    rest = [g for g in got if g[0] not in {p[0] for p in prefix}]
    for pname, kind, default in rest:
        assert kind is KO, f"{name}: option `{pname}` must be keyword-only"
        assert pname in options, f"{name}: option `{pname}` is not in the contract"
        assert _same(default, options[pname]) or default is options[pname], pname


def test_ntk_gramian_take_the_documented_options() -> None:
    assert {"mode", "chunk_size", "max_memory", "retain_graph", "create_graph"} <= set(
        inspect.signature(tj.gramian).parameters
    )
    assert {"chunk_size", "max_memory"} <= set(inspect.signature(tj.ntk).parameters)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_docstring_with_runnable_example(name: str) -> None:
    doc = inspect.getdoc(getattr(tj, name))
    assert doc, name
    assert "Example" in doc, name
    assert ">>>" in doc, name
    # The example calls the function itself.
    assert f"tj.{name}(" in doc, name
    examples = inspect.getdoc(getattr(tj, name))
    parsed = __import__("doctest").DocTestParser().get_examples(examples)
    assert parsed and any(e.want.strip() for e in parsed), f"{name}: example shows no output"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_docstring_states_math_shapes_and_every_argument(name: str) -> None:
    fn = getattr(tj, name)
    doc = inspect.getdoc(fn) or ""
    assert ":math:" in doc, f"{name}: no math"
    assert "shape" in doc.lower(), f"{name}: no shapes"
    # every argument is documented here, or in a sibling the docstring points to
    pointed = [getattr(tj, m) for m in re.findall(r":func:`(?:torchjac\.)?(\w+)`", doc)]
    docs = [doc] + [inspect.getdoc(f) or "" for f in pointed if callable(f)]
    for arg in inspect.signature(fn).parameters:
        assert any(f"``{arg}``" in d or f"{arg}:" in d or f"*{arg}" in d for d in docs), (
            f"{name}: `{arg}` is documented nowhere"
        )


@pytest.mark.parametrize("name", ["BatchCouplingError", "FallbackWarning"])
def test_exception_docstrings(name: str) -> None:
    assert inspect.getdoc(getattr(tj, name))


# ---------------------------------------------------------------------------------------------
# jac: layout, sequences, jac_outputs, batch_dim, containers


def _f(x: Tensor, w: Tensor) -> Tensor:
    """[2, 3] output of x [4] and w [2, 2]."""
    a = torch.outer(w.sin().sum(1), x[:3]) + x.sum() * w.sum()
    return a * x[3]


def test_jac_one_output_rows_then_columns(gen: torch.Generator) -> None:
    x, w = randn(4, gen=gen, grad=True), randn(2, 2, gen=gen, grad=True)
    y = _f(x, w)
    jx, jw = tj.jac(y, (x, w), retain_graph=True)
    ox, ow = jacrev(_f, argnums=(0, 1))(x.detach(), w.detach())
    assert jx.shape == (2, 3, 4) and jw.shape == (2, 3, 2, 2)
    torch.testing.assert_close(jx, ox)
    torch.testing.assert_close(jw, ow)
    for mode in ("rev", "fwd"):
        torch.testing.assert_close(tj.jac(y, x, mode=mode, retain_graph=True), ox)


def test_jac_sequence_of_outputs_concatenates_rows(gen: torch.Generator) -> None:
    x = randn(3, gen=gen, grad=True)
    y1, y2, y3 = x[:2] * 2, torch.outer(x, x)[:2, :1] ** 2, (x**3).sum()
    got = tj.jac([y1, y2, y3], x)
    assert isinstance(got, Tensor) and got.shape == (5, 3)

    def cat(x: Tensor) -> Tensor:
        return torch.cat(
            [(x[:2] * 2), (torch.outer(x, x)[:2, :1] ** 2).reshape(-1), (x**3).sum().reshape(1)]
        )

    torch.testing.assert_close(got, jacrev(cat)(x.detach()))


def test_jac_jac_outputs_left_multiplies(gen: torch.Generator) -> None:
    x, w = randn(4, gen=gen, grad=True), randn(2, 2, gen=gen, grad=True)
    y = _f(x, w)
    v = randn(5, 2, 3, gen=gen)
    got = tj.jac(y, x, v, retain_graph=True)
    full = jacrev(_f)(x.detach(), w.detach())
    assert got.shape == (5, 4)
    torch.testing.assert_close(got, torch.einsum("kab,abi->ki", v, full))
    # sequence of outputs: one [k] + y_i.shape factor each, rows summed
    y2 = x.prod().reshape(())
    v2 = randn(5, gen=gen)
    got2 = tj.jac([y, y2], x, [v, v2])
    want2 = torch.einsum("kab,abi->ki", v, full) + v2[:, None] * jacrev(torch.prod)(x.detach())
    torch.testing.assert_close(got2, want2)


@pytest.mark.parametrize("batch_dim", [0, 1, -1])
def test_jac_batch_dim_is_batch_first(gen: torch.Generator, batch_dim: int) -> None:
    # x [4, B=3] at dim 1, y [2, B, 5] at dim 1 (batch_dim=-1 uses x [B, 4] and y [5, B]).
    b = 3
    if batch_dim == 1:
        x = randn(4, b, gen=gen, grad=True)
        a = randn(2, 5, 4, gen=gen)

        def f(x: Tensor) -> Tensor:
            return torch.einsum("cdi,ib->cbd", a, x.tanh())

    elif batch_dim == 0:
        x = randn(b, 4, gen=gen, grad=True)
        a = randn(2, 5, 4, gen=gen)

        def f(x: Tensor) -> Tensor:
            return torch.einsum("cdi,bi->bcd", a, x.tanh())

    else:
        x = randn(4, b, gen=gen, grad=True)
        a = randn(5, 4, gen=gen)

        def f(x: Tensor) -> Tensor:
            return a @ x.tanh()  # [5, B]

    y = f(x)
    got = tj.jac(y, x, batch_dim=batch_dim)
    full = jacrev(f)(x.detach())  # y.shape + x.shape
    yd, xd = batch_dim % y.dim(), batch_dim % x.dim()
    # take the diagonal over the two batch dims, batch first
    moved = full.movedim((yd, y.dim() + xd), (0, 1))
    want = torch.diagonal(moved, dim1=0, dim2=1).movedim(-1, 0)
    out_rest = [s for i, s in enumerate(y.shape) if i != yd]
    in_rest = [s for i, s in enumerate(x.shape) if i != xd]
    assert got.shape == tuple([b, *out_rest, *in_rest])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["tensor", "list", "tuple", "dict", "generator"])
def test_jac_container_follows_inputs(gen: torch.Generator, kind: str) -> None:
    a, c = randn(3, gen=gen, grad=True), randn(2, gen=gen, grad=True)
    y = torch.cat([a.sin(), c.cos() * a[0]])
    inputs: Any
    if kind == "tensor":
        got = tj.jac(y, a)
        assert isinstance(got, Tensor) and got.shape == (5, 3)
        return
    if kind == "dict":
        inputs = {"z": c, "a": a}  # not alphabetical: order of the mapping
        got = tj.jac(y, inputs)
        assert type(got) is dict and list(got) == ["z", "a"]
        assert got["z"].shape == (5, 2) and got["a"].shape == (5, 3)
        return
    inputs = {"list": [a, c], "tuple": (a, c), "generator": (t for t in (a, c))}[kind]
    got = tj.jac(y, inputs)
    assert type(got) is tuple and len(got) == 2
    assert got[0].shape == (5, 3) and got[1].shape == (5, 2)


def test_jac_allow_unused(gen: torch.Generator) -> None:
    a, c = randn(3, gen=gen, grad=True), randn(2, gen=gen, grad=True)
    with pytest.raises(ValueError, match=r"jac\b.*inputs\[1\]"):
        tj.jac(a * 2, [a, c], retain_graph=True)
    ja, jc = tj.jac(a * 2, [a, c], allow_unused=True)
    torch.testing.assert_close(ja, 2 * torch.eye(3, dtype=a.dtype))
    assert jc.shape == (3, 2) and not jc.any()


def test_jac_create_graph_differentiable(gen: torch.Generator) -> None:
    x = randn(3, gen=gen, grad=True)
    j = tj.jac(x**3, x, create_graph=True)
    assert j.requires_grad
    (g,) = torch.autograd.grad(j.sum(), x)
    torch.testing.assert_close(g, 6 * x.detach())


# ---------------------------------------------------------------------------------------------
# jacobian, hessian, hessian_diagonal, laplacian


def _g(x: Tensor, w: Tensor) -> Tensor:
    """[2] output of x [3] and w [2, 2]: smooth, every second derivative nonzero."""
    return torch.stack(
        [(x.sin() * w[0, 0]).sum() + (x**2).prod() * w[1].sum(), (x * w.sum()).exp().sum()]
    )


def test_jacobian_containers_and_values(gen: torch.Generator) -> None:
    x, w = randn(3, gen=gen), randn(2, 2, gen=gen)
    ox, ow = jacrev(_g, argnums=(0, 1))(x, w)
    single = tj.jacobian(lambda t: _g(t, w), x)
    assert isinstance(single, Tensor) and single.shape == (2, 3)
    torch.testing.assert_close(single, ox)
    for inputs in ((x, w), [x, w]):
        got = tj.jacobian(_g, inputs)
        assert type(got) is tuple and len(got) == 2
        assert got[0].shape == (2, 3) and got[1].shape == (2, 2, 2)
        torch.testing.assert_close(got[0], ox)
        torch.testing.assert_close(got[1], ow)
    got = tj.jacobian(lambda d: _g(d["x"], d["w"]), {"w": w, "x": x})
    assert type(got) is dict and list(got) == ["w", "x"]
    torch.testing.assert_close(got["x"], ox)
    torch.testing.assert_close(got["w"], ow)


def test_jacobian_sequence_outputs_and_aux(gen: torch.Generator) -> None:
    x = randn(3, gen=gen)

    def f(x: Tensor) -> tuple[list[Tensor], str]:
        return [x.sin(), (x**2).sum(), torch.outer(x, x)[:1]], "aux"

    jac, aux = tj.jacobian(f, x, has_aux=True)
    assert aux == "aux"
    assert jac.shape == (3 + 1 + 3, 3)

    def flat(x: Tensor) -> Tensor:
        return torch.cat([t.reshape(-1) for t in f(x)[0]])

    torch.testing.assert_close(jac, jacrev(flat)(x))


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_jacobian_batch_dim(gen: torch.Generator, mode: str) -> None:
    x, a = randn(4, 3, gen=gen), randn(2, 5, 3, gen=gen)

    def f(x: Tensor) -> Tensor:
        return torch.einsum("cdi,bi->bcd", a, x.tanh()) * x[:, :1, None]  # [B, 2, 5]

    got = tj.jacobian(f, x, batch_dim=0, mode=mode)
    assert got.shape == (4, 2, 5, 3)
    torch.testing.assert_close(got, vmap(jacrev(lambda s: f(s[None])[0]))(x))


def _h(x: Tensor) -> Tensor:
    """[2, 2] output of x [3]."""
    s = x.sin()
    return torch.stack([s * x[0] ** 2, (x**3).sum() * s.cos()])[:, :2]


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_hessian_layout(gen: torch.Generator, mode: str) -> None:
    x = randn(3, gen=gen)
    got = tj.hessian(_h, x, mode=mode)
    assert got.shape == (2, 2, 3, 3)
    torch.testing.assert_close(got, hessian(_h)(x))


def test_hessian_several_inputs_nested_containers(gen: torch.Generator) -> None:
    x, w = randn(3, gen=gen), randn(2, 2, gen=gen)
    want = hessian(_g, argnums=(0, 1))(x, w)
    got = tj.hessian(_g, (x, w))
    assert type(got) is tuple and all(type(r) is tuple and len(r) == 2 for r in got)
    assert got[0][1].shape == (2, 3, 2, 2) and got[1][0].shape == (2, 2, 2, 3)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(got[i][j], want[i][j])
    got_d = tj.hessian(lambda d: _g(d["x"], d["w"]), {"x": x, "w": w})
    assert type(got_d) is dict and list(got_d) == ["x", "w"]
    assert type(got_d["x"]) is dict and list(got_d["x"]) == ["x", "w"]
    torch.testing.assert_close(got_d["w"]["x"], want[1][0])


def test_hessian_batch_dim(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen)
    got = tj.hessian(lambda x: _hb(x), x, batch_dim=0)
    assert got.shape == (4, 2, 3, 3)
    torch.testing.assert_close(got, vmap(hessian(lambda s: _hb(s[None])[0]))(x))


def _hb(x: Tensor) -> Tensor:
    """Batched [B, 2] output of x [B, 3]."""
    return torch.stack([(x.sin() * x[:, :1] ** 2).sum(1), (x**3).sum(1) * x[:, 1].cos()], 1)


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_hessian_diagonal_layout(gen: torch.Generator, mode: str) -> None:
    x = randn(3, gen=gen)
    got = tj.hessian_diagonal(_h, x, mode=mode)
    assert got.shape == (2, 2, 3)
    torch.testing.assert_close(got, torch.diagonal(hessian(_h)(x), dim1=-2, dim2=-1))


def test_hessian_diagonal_containers_and_batch(gen: torch.Generator) -> None:
    x, w = randn(3, gen=gen), randn(2, 2, gen=gen)
    want = hessian(_g, argnums=(0, 1))(x, w)
    got = tj.hessian_diagonal(_g, (x, w))
    assert type(got) is tuple and got[0].shape == (2, 3) and got[1].shape == (2, 2, 2)
    torch.testing.assert_close(got[0], torch.diagonal(want[0][0], dim1=-2, dim2=-1))
    torch.testing.assert_close(
        got[1], torch.diagonal(want[1][1].reshape(2, 4, 4), dim1=-2, dim2=-1).reshape(2, 2, 2)
    )
    got_d = tj.hessian_diagonal(lambda d: _g(d["x"], d["w"]), {"w": w, "x": x})
    assert type(got_d) is dict and list(got_d) == ["w", "x"]
    xb = randn(4, 3, gen=gen)
    gb = tj.hessian_diagonal(_hb, xb, batch_dim=0)
    assert gb.shape == (4, 2, 3)
    hb = vmap(hessian(lambda s: _hb(s[None])[0]))(xb)
    torch.testing.assert_close(gb, torch.diagonal(hb, dim1=-2, dim2=-1))


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_laplacian_layout(gen: torch.Generator, mode: str) -> None:
    x = randn(3, gen=gen)
    got = tj.laplacian(_h, x, mode=mode)
    assert got.shape == (2, 2)
    torch.testing.assert_close(got, torch.diagonal(hessian(_h)(x), dim1=-2, dim2=-1).sum(-1))


def test_laplacian_sums_over_all_inputs_and_batch(gen: torch.Generator) -> None:
    x, w = randn(3, gen=gen), randn(2, 2, gen=gen)
    want = hessian(_g, argnums=(0, 1))(x, w)
    lap = torch.diagonal(want[0][0], dim1=-2, dim2=-1).sum(-1) + torch.diagonal(
        want[1][1].reshape(2, 4, 4), dim1=-2, dim2=-1
    ).sum(-1)
    got = tj.laplacian(_g, (x, w))
    assert isinstance(got, Tensor) and got.shape == (2,)
    torch.testing.assert_close(got, lap)
    xb = randn(4, 3, gen=gen)
    gb = tj.laplacian(_hb, xb, batch_dim=0)
    assert gb.shape == (4, 2)
    hb = vmap(hessian(lambda s: _hb(s[None])[0]))(xb)
    torch.testing.assert_close(gb, torch.diagonal(hb, dim1=-2, dim2=-1).sum(-1))


# ---------------------------------------------------------------------------------------------
# param_jacobian, ntk, gramian


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


def test_gramian_rows_plus_rows(gen: torch.Generator) -> None:
    x, w = randn(4, gen=gen, grad=True), randn(2, 2, gen=gen, grad=True)
    y = _f(x, w)
    got = tj.gramian(y, (x, w), retain_graph=True)
    ox, ow = jacrev(_f, argnums=(0, 1))(x.detach(), w.detach())
    jfull = torch.cat([ox.reshape(6, -1), ow.reshape(6, -1)], 1)
    assert got.shape == (2, 3, 2, 3)
    torch.testing.assert_close(got, (jfull @ jfull.T).reshape(2, 3, 2, 3))
    dict_got = tj.gramian(y, {"w": w, "x": x}, retain_graph=True)
    assert isinstance(dict_got, Tensor)  # summed over inputs: one Tensor
    torch.testing.assert_close(dict_got, got)
    seq = tj.gramian([y, x.sum()], x)
    jx = torch.cat([ox.reshape(6, 4), torch.ones(1, 4, dtype=x.dtype)])
    assert seq.shape == (7, 7)
    torch.testing.assert_close(seq, jx @ jx.T)


def test_gramian_batch_dim(gen: torch.Generator) -> None:
    x = randn(4, 3, gen=gen, grad=True)
    a = randn(2, 5, 3, gen=gen)
    y = torch.einsum("cdi,bi->bcd", a, x.tanh())  # [B, 2, 5]
    got = tj.gramian(y, x, batch_dim=0)
    assert got.shape == (4, 2, 5, 2, 5)
    j = vmap(jacrev(lambda s: torch.einsum("cdi,i->cd", a, s.tanh())))(x.detach())
    torch.testing.assert_close(got, torch.einsum("bcdi,befi->bcdef", j, j))


def test_fwd_jacobian_matches_jacfwd(gen: torch.Generator) -> None:
    x = randn(3, gen=gen)
    torch.testing.assert_close(tj.jacobian(_h, x, mode="fwd"), jacfwd(_h)(x))


# ---------------------------------------------------------------------------------------------
# Edge layouts: 0-d tensors, sequences of outputs per sample, retained graphs, params choices


def test_zero_dim_inputs_and_outputs() -> None:
    x = torch.tensor(0.7, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    j = tj.jac(xr.sin(), xr)
    assert j.shape == () and torch.allclose(j, x.cos())
    assert tj.jacobian(torch.sin, x).shape == ()
    for name in ("hessian", "hessian_diagonal", "laplacian"):
        got = getattr(tj, name)(torch.sin, x)
        assert got.shape == (), name
        torch.testing.assert_close(got, -x.sin())
    # a 0-d output of a vector input: rows are empty, columns the input's
    v = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    assert tj.hessian(lambda v: (v**3).sum(), v).shape == (3, 3)
    assert tj.hessian_diagonal(lambda v: (v**3).sum(), v).shape == (3,)
    assert tj.laplacian(lambda v: (v**3).sum(), v).shape == ()


def _two_outputs(x: Tensor) -> list[Tensor]:
    return [x.sin() * x[..., :1], (x**2).sum(-1)]


def _cat_sample(s: Tensor) -> Tensor:
    return torch.cat([t.reshape(-1) for t in _two_outputs(s)])


@pytest.mark.parametrize("name", ["jac", "jacobian", "hessian", "hessian_diagonal", "laplacian"])
def test_sequence_outputs_with_batch_dim(gen: torch.Generator, name: str) -> None:
    x = randn(4, 3, gen=gen)
    if name == "jac":
        xr = x.clone().requires_grad_(True)
        got = tj.jac(_two_outputs(xr), xr, batch_dim=0)
    else:
        got = getattr(tj, name)(_two_outputs, x, batch_dim=0)
    jac = vmap(jacrev(_cat_sample))(x)  # [B, m=4, 3]
    hes = vmap(hessian(_cat_sample))(x)  # [B, 4, 3, 3]
    want = {
        "jac": jac,
        "jacobian": jac,
        "hessian": hes,
        "hessian_diagonal": hes.diagonal(dim1=-2, dim2=-1),
        "laplacian": hes.diagonal(dim1=-2, dim2=-1).sum(-1),
    }[name]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["jac", "gramian"])
def test_retain_graph_keeps_the_graph(gen: torch.Generator, name: str) -> None:
    x = randn(3, gen=gen, grad=True)
    y = x.sin() * x.sum()
    getattr(tj, name)(y, x, retain_graph=True)
    (g,) = torch.autograd.grad(y.sum(), x)  # the graph is still there
    torch.testing.assert_close(g, jacrev(lambda x: (x.sin() * x.sum()).sum())(x.detach()))


@pytest.mark.parametrize("name", ["jacobian", "hessian", "hessian_diagonal", "laplacian"])
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_functional_create_graph_reaches_closed_over_params(
    gen: torch.Generator, name: str, mode: str
) -> None:
    w = randn(3, 3, gen=gen, grad=True)
    x = randn(5, 3, gen=gen)

    def reduce(w: Tensor) -> Tensor:
        def g(s: Tensor) -> Tensor:
            return torch.tanh(s @ w)

        if name == "jacobian":
            return vmap(jacrev(g))(x).pow(2).sum()
        h = vmap(hessian(g))(x)
        d = h.diagonal(dim1=-2, dim2=-1)
        return {"hessian": h, "hessian_diagonal": d, "laplacian": d.sum(-1)}[name].pow(2).sum()

    got = getattr(tj, name)(
        lambda x: torch.tanh(x @ w), x, batch_dim=0, mode=mode, create_graph=True
    )
    assert got.requires_grad
    (g,) = torch.autograd.grad(got.pow(2).sum(), w)
    torch.testing.assert_close(g, torch.func.grad(reduce)(w.detach()))


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


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_gramian_sequence_per_sample(gen: torch.Generator, mode: str) -> None:
    x = randn(4, 3, gen=gen, grad=True)
    w = randn(3, 3, gen=gen)
    got = tj.gramian([torch.tanh(x @ w), (x**2).sum(-1)], x, batch_dim=0, mode=mode)

    def per(s: Tensor) -> Tensor:
        return torch.cat([torch.tanh(s @ w), (s**2).sum().reshape(1)])

    j = vmap(jacrev(per))(x.detach())  # [B, m=4, 3]
    assert got.shape == (4, 4, 4)
    torch.testing.assert_close(got, j @ j.transpose(1, 2))


@pytest.mark.parametrize("name", ["jacobian", "hessian", "hessian_diagonal", "laplacian"])
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_has_aux_returns_result_and_aux(name: str, batch_dim: int | None) -> None:
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)

    def f(x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y = (x**3).sum(-1) * x[:, 0]
        return y, {"y": y.detach()}

    got = getattr(tj, name)(f, x, has_aux=True, batch_dim=batch_dim)
    assert type(got) is tuple and len(got) == 2
    result, aux = got
    assert type(aux) is dict and list(aux) == ["y"]
    torch.testing.assert_close(aux["y"], f(x)[0])
    torch.testing.assert_close(result, getattr(tj, name)(lambda x: f(x)[0], x, batch_dim=batch_dim))
