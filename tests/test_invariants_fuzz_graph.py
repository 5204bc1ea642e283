"""Invariants fuzz of ``jac`` and ``gramian`` (issue 15): tensors a random model computed.

Each example runs the user's forward ``y = model(x)`` (from one RNG state, so dropout draws the
same masks each time), takes ``y`` (or ``[y, (y**2).sum(-1)]``) and differentiates it with
respect to ``x``, the parameters, or both, through ``fuzz_harness.checked_calls``: the model,
``x``, ``y`` and ``jac_outputs`` (with every ``.grad`` and flag), the RNG state and grad mode
stay bitwise as they were, the result shares no storage with them, two calls agree bitwise, and
the result equals the float64 ``torch.func`` oracle.
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
from fuzz_models import as_module, record_masks
from fuzz_oracles import couples, graph_jacobians, oracle_model, size, x64
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import Tensor

import torchjac as tj

# `make test` runs the short derandomized profile (TORCHJAC_FUZZ_PROFILE=ci, the default), `make
# fuzz` the long one (`-m fuzz` selects these tests)
pytestmark = pytest.mark.fuzz

ALL_FAMILIES = (*FLOAT_FAMILIES, "embed")


@pytest.mark.parametrize("fast", FAST)
@pytest.mark.parametrize("name", ["jac", "gramian"])
@FUZZ
@given(data=st.data())
def test_graph_front_doors(name: str, fast: str, data: st.DataObject) -> None:
    fast = draw_fast(data, fast)
    wrt = data.draw(st.sampled_from(["x", "params", "both"]), label="inputs")
    bd = data.draw(st.sampled_from([0, None]), label="batch_dim") if wrt == "x" else None
    batches = tuple(b for b in BATCHES if b is not None) if bd == 0 else BATCHES
    families = ALL_FAMILIES if wrt == "params" else FLOAT_FAMILIES
    case: Case = data.draw(cases(families, batches), label="case")
    seq = data.draw(st.booleans(), label="outputs as [y, (y**2).sum(-1)]")
    rows = st.sampled_from([None, 1, 3])
    k = data.draw(rows, label="jac_outputs rows") if name == "jac" else None
    container = data.draw(st.sampled_from(["tensor", "tuple", "dict"]), label="container")
    options: dict[str, Any] = dict(batch_dim=bd, mode=data.draw(st.sampled_from(MODES)))
    options["chunk_size"] = chunk = data.draw(st.sampled_from(CHUNKS), label="chunk_size")
    options["max_memory"] = data.draw(st.sampled_from(MEMORY)) if chunk is None else None
    options["create_graph"] = create_graph = data.draw(st.booleans(), label="create_graph")
    # retain_graph=False frees the forward graph a differentiable result still needs
    retain = [None, True] if create_graph else [None, True, False]
    options["retain_graph"] = data.draw(st.sampled_from(retain), label="retain_graph")
    grad_enabled = data.draw(st.booleans(), label="grad_enabled")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        model, x = case.build()
        module = as_module(case.arch, model)
        if wrt != "params":
            x.requires_grad_(True)
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        state = torch.get_rng_state()
        masks = record_masks(model, x.detach())
        m64 = as_module(case.arch, oracle_model(model, masks))
        n_out, n_x = size(m64, x, bd is not None)
        n_p = sum(params[n].numel() for n in names)
        n_in = {"x": n_x, "params": n_p, "both": n_x + n_p}[wrt]
        assume(n_out * n_in <= MAX_ENTRIES and n_out <= MAX_PAIRS)  # gramian: rows x rows
        a = _jac_outputs(m64, x, seq, k, case)

        def make() -> Any:
            torch.set_rng_state(state)  # the user's forward, the same draw each time
            with torch.enable_grad():
                y = module(x)
            outs: Any = [y, y.square().sum(-1)] if seq else y
            owned = {"x": x, "y": y, **{f"jac_outputs[{i}]": t for i, t in enumerate(a or [])}}
            ins = _inputs(wrt, container, x, {n: params[n] for n in names})
            extra = () if name == "gramian" else ((a if seq else a[0]) if a else None,)
            return (lambda: getattr(tj, name)(outs, ins, *extra, **options)), module, owned

        bn = bd is not None and coupled(model)  # BatchNorm in train mode: coupled...
        if bn and couples(m64, x):
            checked_calls(make, grad_enabled, fast, error=(tj.BatchCouplingError, name))
            return
        # ... unless no output depends on another sample (e.g. dead ReLUs before it): may refuse
        may = (tj.BatchCouplingError, name) if bn else None
        # NOTE [exact norms]: the user's graph runs torch's fused norms, whose derivatives of the
        # result torch gets wrong; create_graph=True must say so
        fused = create_graph and _fused_norm_on_graph(make()[2]["y"])
        warns = f"{name}: create_graph=True.*fused" if fused else None
        got = checked_calls(make, grad_enabled, fast, may_refuse=may, warns=warns)
        if got is REFUSED:
            return

    def want_of(override: dict[str, Tensor]) -> Any:
        return _oracle(name, m64, x, names, wrt, container, seq, a, bd, override)

    assert_matches(got, want_of({}), case.dtype)
    if options["create_graph"] and not fused:  # fused: torch's derivatives, the warning checked
        leaves = {"x": x} if x.requires_grad else {}
        leaves.update({n: params[n] for n in names})
        assert_differentiable(got, want_of, leaves, case.dtype)


def _jac_outputs(
    m64: torch.nn.Module, x: Tensor, seq: bool, k: int | None, case: Case
) -> list[Tensor] | None:
    """``jac_outputs``: ``[k] + y_i.shape`` for each output, the model's dtype."""
    if k is None:
        return None
    with torch.no_grad():
        y = m64(x.detach().double() if x.is_floating_point() else x)
    shapes = [y.shape, y.shape[:-1]] if seq else [y.shape]
    g = torch.Generator().manual_seed(case.seed + 3)
    return [torch.randn(k, *s, generator=g, dtype=torch.float64).to(case.dtype) for s in shapes]


def _list(outs: Any) -> list[Tensor]:
    return list(outs) if isinstance(outs, list) else [outs]


def _inputs(wrt: str, container: str, x: Tensor, params: dict[str, Tensor]) -> Any:
    if wrt == "x":
        return {"tensor": x, "tuple": (x,), "dict": {"x": x}}[container]
    if wrt == "params":
        return params if container == "dict" else tuple(params.values())
    return {"x": x, **params}


def _oracle(
    name: str,
    m64: torch.nn.Module,
    x: Tensor,
    names: list[str],
    wrt: str,
    container: str,
    seq: bool,
    a: list[Tensor] | None,
    bd: int | None,
    override: dict[str, Tensor],
) -> Any:
    """The float64 result from the full Jacobians of ``y`` (and ``(y**2).sum(-1)``), with
    parameters and ``x`` replaced by ``override`` (by name)."""
    ps = names if wrt != "x" else []
    y, jy = graph_jacobians(m64, x64(x), ps, wrt != "params", override)
    keys = ([] if wrt == "params" else ["x"]) + ([] if wrt == "x" else names)
    outs = [(y, jy)]
    if seq:
        z = y.square().sum(-1)
        jz = {
            key: (2 * y.unsqueeze(-1) * j.reshape(*y.shape, -1))
            .sum(-2)
            .reshape(*z.shape, *j.shape[y.dim() :])
            for key, j in jy.items()
        }
        outs.append((z, jz))
    a64 = None if a is None else [t.double() for t in a]
    rows = {key: _rows(outs, key, a64, bd) for key in keys}  # [k or m, n] or [B, k or m, n]
    if name == "gramian":
        g = sum(r @ r.transpose(-1, -2) for r in rows.values())
        assert isinstance(g, Tensor)
        if seq:
            return g
        lead = () if bd is None else (y.shape[0],)
        o = y.shape if bd is None else y.shape[1:]
        return g.reshape(*lead, *o, *o)
    res = {}
    for key, r in rows.items():
        in_shape = jy[key].shape[y.dim() :]
        if bd is None:
            out = (r.shape[0],) if a is not None or seq else tuple(y.shape)
            res[key] = r.reshape(*out, *in_shape)
        else:
            out = (r.shape[1],) if a is not None or seq else tuple(y.shape[1:])
            res[key] = r.reshape(y.shape[0], *out, *in_shape[1:])
    if wrt == "x":
        return {"tensor": res["x"], "tuple": (res["x"],), "dict": res}[container]
    if wrt == "params" and container != "dict":
        return tuple(res.values())
    return res


def _rows(
    outs: list[tuple[Tensor, dict[str, Tensor]]], key: str, a: list[Tensor] | None, bd: int | None
) -> Tensor:
    if bd is None:
        r = torch.cat([j[key].reshape(o.numel(), -1) for o, j in outs])
        return r if a is None else torch.cat([t.reshape(t.shape[0], -1) for t in a], 1) @ r
    b = outs[0][0].shape[0]
    ar = torch.arange(b)
    per = torch.cat([j[key].reshape(b, o.numel() // b, b, -1)[ar, :, ar, :] for o, j in outs], 1)
    if a is None:
        return per
    am = torch.cat([t.movedim(1, 0).reshape(b, t.shape[0], -1) for t in a], 2)  # [B, k, m]
    return am @ per


def _fused_norm_on_graph(y: Tensor) -> bool:
    """Whether the user's forward put torch's fused layer_norm, or batch_norm with batch
    statistics, on the graph of ``y`` (its backward nodes, read by name)."""
    stack, seen, found = [y.grad_fn], set(), False
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kind = type(node).__name__
        found |= "LayerNormBackward" in kind
        found |= "BatchNormBackward" in kind and bool(getattr(node, "_saved_training", True))
        stack.extend(n for n, _ in node.next_functions)
    return found
