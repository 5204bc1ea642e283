"""Invariants fuzz of the function and module front doors (issue 15): random models and calls.

Every example draws a model (``fuzz_cases``), an input and the call's options, then calls the
front door twice (``fuzz_harness.checked_calls``): each call must leave every parameter, buffer,
input, ``.grad``, ``requires_grad`` flag, train/eval flag, hook, the RNG state and grad mode
bitwise as before and return nothing that shares storage with them; the two results must be
bitwise equal and match a float64 ``torch.func`` oracle. A call the library must refuse (samples
coupled by BatchNorm in train mode with ``batch_dim``) must raise, and change nothing either.
Each runs with the fast paths on and off. ``make fuzz`` runs the long profile.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from fuzz_cases import (
    BATCHES,
    CHUNKS,
    FLOAT_FAMILIES,
    MAX_ENTRIES,
    MAX_PAIRS,
    MEMORY,
    MODES,
    Case,
    cases,
    coupled,
)
from fuzz_harness import (
    FAST,
    FUZZ,
    REFUSED,
    assert_differentiable,
    assert_matches,
    checked_calls,
    draw_fast,
)
from fuzz_models import as_function, as_module, record_masks
from fuzz_oracles import (
    couples,
    diag_and_trace,
    input_derivatives,
    kernel,
    oracle_model,
    param_jacobians,
    size,
    with_params,
    x64,
)
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor, nn

import torchjac as tj

# `make test` runs the short derandomized profile (TORCHJAC_FUZZ_PROFILE=ci, the default), `make
# fuzz` the long one (`-m fuzz` selects these tests)
pytestmark = pytest.mark.fuzz

FUNCS = ("jacobian", "hessian", "hessian_diagonal", "laplacian")
ALL_FAMILIES = (*FLOAT_FAMILIES, "embed")


def _masks(model: torch.nn.Module, *args: Tensor) -> list[Tensor]:
    """The dropout masks of ``model(*args)`` from the RNG state now (which is kept)."""
    state = torch.get_rng_state()
    masks = record_masks(model, *(a.detach() for a in args))
    torch.set_rng_state(state)
    return masks


def _pack(container: str, x: Tensor, f: Any) -> tuple[Any, Any]:
    if container == "tuple":
        return f, (x,)
    if container == "dict":
        return (lambda d: f(d["x"])), {"x": x}
    return f, x


def _unpack(container: str, t: Tensor, nested: bool = False) -> Any:
    if container == "tuple":
        return ((t,),) if nested else (t,)
    if container == "dict":
        return {"x": {"x": t}} if nested else {"x": t}
    return t


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("name", FUNCS)
@FUZZ
@given(data=st.data())
def test_function_front_doors(name: str, fast: str, data: st.DataObject) -> None:
    fast = draw_fast(data, fast)
    bd = data.draw(st.sampled_from([0, None]), label="batch_dim")
    first = name == "jacobian"
    batches = [b for b in BATCHES if b is not None] if bd == 0 else BATCHES[: None if first else 4]
    case: Case = data.draw(cases(FLOAT_FAMILIES, tuple(batches)), label="case")
    mode = data.draw(st.sampled_from(MODES), label="mode")
    chunk = data.draw(st.sampled_from(CHUNKS), label="chunk_size")
    memory = data.draw(st.sampled_from(MEMORY), label="max_memory") if chunk is None else None
    create_graph = data.draw(st.booleans(), label="create_graph")
    container = data.draw(st.sampled_from(["tensor", "tuple", "dict"]), label="container")
    grad_enabled = data.draw(st.booleans(), label="grad_enabled")
    x_flags = data.draw(st.sampled_from(["plain", "requires_grad", "with .grad"]), label="x")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        model, x = case.build()
        if x_flags != "plain":
            x.requires_grad_(True)
        if x_flags == "with .grad":
            x.grad = torch.full_like(x, 0.5)
        func, inputs = _pack(container, x, as_function(case.arch, model))
        options = dict(batch_dim=bd, mode=mode, chunk_size=chunk, max_memory=memory)
        options["create_graph"] = create_graph

        def make() -> Any:
            return (lambda: getattr(tj, name)(func, inputs, **options)), model, {"x": x}

        masks = _masks(model, x)
        m64 = oracle_model(model, masks)
        n_out, n_in = size(m64, x, bd is not None)
        assume(n_out * n_in <= (MAX_ENTRIES if first else MAX_PAIRS))
        bn = bd is not None and coupled(model)  # BatchNorm in train mode: coupled...
        if bn and couples(as_function(case.arch, m64), x):
            checked_calls(make, grad_enabled, fast, error=(tj.BatchCouplingError, name))
            return
        # ... unless no output depends on another sample (e.g. dead ReLUs before it): may refuse
        may = (tj.BatchCouplingError, name) if bn else None
        got = checked_calls(make, grad_enabled, fast, may_refuse=may)
        if got is REFUSED:
            return
    whole = bool(masks) or coupled(model)  # per-sample blocks of the whole batch's derivative

    def want_of(override: dict[str, Tensor]) -> Any:
        """The oracle, with parameters (and ``"x"``) replaced by ``override``."""
        xx = override.get("x", x64(x))
        f = with_params(m64, {k: v for k, v in override.items() if k != "x"})
        d = input_derivatives(f, xx, 1 if first else 2, bd is not None, whole)
        if first:
            return _unpack(container, d)
        x_rest = x.shape[1:] if bd is not None else x.shape
        diag, trace = diag_and_trace(d, d.dim() - 2 * len(x_rest), x_rest)
        return {
            "hessian": _unpack(container, d, nested=True),
            "hessian_diagonal": _unpack(container, diag),
            "laplacian": trace,
        }[name]

    assert_matches(got, want_of({}), case.dtype)
    if create_graph:
        leaves = {n: p for n, p in model.named_parameters() if p.requires_grad}
        leaves.update({"x": x} if x.requires_grad else {})
        assert_differentiable(got, want_of, leaves, case.dtype)


def _params(data: st.DataObject, module: torch.nn.Module) -> tuple[Any, list[str]]:
    """``params`` as a user passes it (None, names or Parameter objects) and the names."""
    named = list(module.named_parameters())
    kind = data.draw(st.sampled_from(["default", "names", "objects"]), label="params")
    if kind == "default":
        return None, [n for n, p in named if p.requires_grad]
    pick = data.draw(st.lists(st.sampled_from([n for n, _ in named]), min_size=1, unique=True))
    names = [n for n, _ in named if n in pick]
    return (pick if kind == "names" else [dict(named)[n] for n in pick]), names


@pytest.mark.parametrize("fast", FAST)
@FUZZ
@given(data=st.data())
def test_param_jacobian(fast: str, data: st.DataObject) -> None:
    fast = draw_fast(data, fast)
    bd = data.draw(st.sampled_from([0, None]), label="batch_dim")
    batches = tuple(b for b in BATCHES if b is not None) if bd == 0 else BATCHES
    case: Case = data.draw(cases(ALL_FAMILIES, batches), label="case")
    chunk = data.draw(st.sampled_from(CHUNKS), label="chunk_size")
    memory = data.draw(st.sampled_from(MEMORY), label="max_memory") if chunk is None else None
    grad_enabled = data.draw(st.booleans(), label="grad_enabled")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        model, x = case.build()
        module = as_module(case.arch, model)
        params, names = _params(data, module)
        options = dict(params=params, batch_dim=bd, chunk_size=chunk, max_memory=memory)

        def make() -> Any:
            return (lambda: tj.param_jacobian(module, x, **options)), module, {"x": x}

        if bd is not None and coupled(model):
            error = (tj.BatchCouplingError, "param_jacobian")
            checked_calls(make, grad_enabled, fast, error=error)
            return
        masks = _masks(model, x)
        assume(_entries(case, model, module, names, x, masks) <= MAX_ENTRIES)
        may = _random(bd, x, masks, "param_jacobian")
        got = checked_calls(make, grad_enabled, fast, may_refuse=may)
        if got is REFUSED:
            return
    want = param_jacobians(as_module(case.arch, oracle_model(model, masks)), names, x)
    assert_matches(got, want, case.dtype)


@pytest.mark.parametrize("fast", FAST)
@FUZZ
@given(data=st.data())
def test_ntk(fast: str, data: st.DataObject) -> None:
    fast = draw_fast(data, fast)
    case: Case = data.draw(cases(ALL_FAMILIES), label="case")
    n2 = data.draw(st.sampled_from([None, 1, 3]), label="x2 samples") if case.batch else None
    chunk = data.draw(st.sampled_from(CHUNKS), label="chunk_size")
    memory = data.draw(st.sampled_from(MEMORY), label="max_memory") if chunk is None else None
    grad_enabled = data.draw(st.booleans(), label="grad_enabled")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        model, x1 = case.build()
        x2 = None if n2 is None else _other_batch(case, n2)
        module = as_module(case.arch, model)
        params, names = _params(data, module)
        options = dict(params=params, chunk_size=chunk, max_memory=memory)
        owned = {"x1": x1} if x2 is None else {"x1": x1, "x2": x2}

        def make() -> Any:
            return (lambda: tj.ntk(module, x1, x2, **options)), module, owned

        if coupled(model):
            checked_calls(make, grad_enabled, fast, error=(tj.BatchCouplingError, "ntk"))
            return
        m1 = _masks(model, x1)
        assume(_entries(case, model, module, names, x1, m1) <= MAX_ENTRIES)
        m2 = m1 if x2 is None else _masks(model, x2)
        refusal = _unbatched_refusal(case, model, x1, m1)
        if refusal is not None:
            checked_calls(make, grad_enabled, fast, error=refusal)
            return
        got = checked_calls(make, grad_enabled, fast, may_refuse=_random(0, x1, m1, "ntk"))
        if got is REFUSED:
            return
    j1 = param_jacobians(as_module(case.arch, oracle_model(model, m1)), names, x1)
    j2 = (
        j1
        if x2 is None
        else param_jacobians(as_module(case.arch, oracle_model(model, m2)), names, x2)
    )
    shapes = {n: p.shape for n, p in module.named_parameters()}
    assert_matches(got, kernel(j1, j2, shapes), case.dtype)


def _random(bd: int | None, x: Tensor, masks: list[Tensor], name: str) -> tuple[type, str] | None:
    """The module front doors with ``batch_dim`` evaluate samples alone: a model in train mode
    with active dropout draws other masks then, which they refuse (documented in the error)."""
    if bd is None or not masks or x.dim() == 0 or x.shape[0] < 2:
        return None
    return tj.BatchCouplingError, f"{name}: .*dropout in train mode"


def _entries(
    case: Case,
    model: nn.Module,
    module: nn.Module,
    names: list[str],
    x: Tensor,
    masks: list[Tensor],
) -> int:
    """Output elements times parameter elements: the size of the parameter Jacobian."""
    n_out, _ = size(as_module(case.arch, oracle_model(model, masks)), x, False)
    return n_out * sum(p.numel() for n, p in module.named_parameters() if n in names)


def _other_batch(case: Case, n: int) -> Tensor:
    g = torch.Generator().manual_seed(case.seed + 2)
    shape = (n, *case.arch.sample_shape)
    if case.arch.vocab:
        return torch.randint(case.arch.vocab, shape, generator=g)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(case.dtype)


def _unbatched_refusal(
    case: Case, model: torch.nn.Module, x: Tensor, masks: list[Tensor]
) -> tuple[type, str] | None:
    """``ntk`` takes dim 0 of an unbatched input as its samples: a refusal when the output's dim 0
    differs (ValueError) or when samples so taken are coupled (a nonzero cross block of the
    input Jacobian: BatchCouplingError); ``None`` when the call must succeed."""
    if case.batch is not None:
        return None
    f64 = as_function(case.arch, oracle_model(model, masks))
    y = f64(x64(x))
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        return ValueError, "ntk"
    if case.arch.vocab or x.shape[0] == 1:
        return None
    return (tj.BatchCouplingError, "ntk") if couples(f64, x) else None
