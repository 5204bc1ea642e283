"""The public names, signatures, named exceptions and docstrings against DESIGN.md "Public API"."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest

import torchjac as tj

P = inspect.Parameter


POK, KO = P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY


VARARGS, VARKW = P.VAR_POSITIONAL, P.VAR_KEYWORD


REQ = P.empty


PUBLIC = (
    "BatchCouplingError",
    "FallbackWarning",
    "JacobianOperator",
    "__version__",
    "gramian",
    "hessian",
    "hessian_diagonal",
    "jac",
    "jacobian",
    "laplacian",
    "ntk",
    "param_jacobian",
    "sparse_jacobian",
    "sparsity_pattern",
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
    ("process_group", KO, None),
    ("gather", KO, "all"),
)


PARAM_JACOBIAN = (
    ("model", POK, REQ),
    ("args", VARARGS, REQ),
    ("params", KO, None),
    ("batch_dim", KO, None),
    ("chunk_size", KO, None),
    ("max_memory", KO, None),
    ("process_group", KO, None),
    ("gather", KO, "all"),
    ("kwargs", VARKW, REQ),
)


# DESIGN.md's, then ``batch_dim`` (issue 20: per-sample blocks).
SPARSE_JACOBIAN = (
    ("func", POK, REQ),
    ("x", POK, REQ),
    ("pattern", KO, None),
    ("mode", KO, "auto"),
    ("chunk_size", KO, None),
    ("max_memory", KO, None),
    ("batch_dim", KO, None),
)


EXACT = {
    "sparse_jacobian": SPARSE_JACOBIAN,
    "sparsity_pattern": (("func", POK, REQ), ("x", POK, REQ)),
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
