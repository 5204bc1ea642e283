"""``tj.jac`` on the case registry: every mode x chunk size agrees with the float64 oracle."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from graph_cases import BATCHED, CASES, EDGE_CASES, Case
from torch import Tensor

import torchjac as tj

MODES = ["auto", "rev", "fwd"]
ALL_CASES = CASES + EDGE_CASES
ALL_BATCHED = BATCHED + [c for c in EDGE_CASES if c.batch_dim is not None]
CHUNKS = [None, 1, 2, 10_000]


def assert_matches(result: Any, expected: Any, inputs: Any, rtol: float = 1e-10) -> None:
    """Same container as ``inputs`` (Tensor / tuple / dict with the same key order), same values."""
    if isinstance(inputs, Tensor):
        assert isinstance(result, Tensor)
        pairs = [(result, expected)]
    elif isinstance(inputs, dict):
        assert isinstance(result, dict)
        assert list(result) == list(inputs)
        pairs = [(result[k], expected[k]) for k in inputs]
    else:
        assert isinstance(result, tuple)
        assert len(result) == len(expected)
        pairs = list(zip(result, expected))
    for got, want in pairs:
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=rtol)


def tolerance(inputs: Any) -> float:
    tensors = inputs.values() if isinstance(inputs, dict) else inputs
    tensors = [tensors] if isinstance(tensors, Tensor) else tensors
    return 1e-6 if any(t.dtype == torch.float32 for t in tensors) else 1e-10


@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_matches_oracle(
    case: Case, mode: str, chunk_size: int | None, gen: torch.Generator
) -> None:
    outputs, inputs, expected = case.build(gen)
    result = tj.jac(outputs, inputs, mode=mode, chunk_size=chunk_size, **case.kwargs)
    assert_matches(result, expected, inputs, tolerance(inputs))


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_result_dtype_and_device_follow_inputs(case: Case, gen: torch.Generator) -> None:
    outputs, inputs, _ = case.build(gen)
    result = tj.jac(outputs, inputs, **case.kwargs)
    flat = list(result.values()) if isinstance(result, dict) else result
    flat = [flat] if isinstance(flat, Tensor) else flat
    ins = list(inputs.values()) if isinstance(inputs, dict) else inputs
    ins = [ins] if isinstance(ins, Tensor) else ins
    outs = [outputs] if isinstance(outputs, Tensor) else outputs
    want = torch.float32 if all(t.dtype == torch.float32 for t in [*outs, *ins]) else torch.float64
    for r in flat:
        assert r.dtype == want
        assert r.device == ins[0].device


def _rest(t: Tensor, bd: int) -> list[int]:
    """``t.shape`` without the batch dimension (works for an empty batch too)."""
    shape = list(t.shape)
    del shape[bd]
    return shape


def per_sample_loop(outputs: Any, inputs: Any, bd: int) -> tuple[Tensor, ...]:
    """Oracle for ``batch_dim``: one ``autograd.grad`` per (sample, output element)."""
    single = isinstance(outputs, Tensor)
    outs = [outputs] if single else list(outputs)
    ins = list(inputs.values()) if isinstance(inputs, dict) else inputs
    ins = [ins] if isinstance(ins, Tensor) else list(ins)
    bsz = outs[0].shape[bd]
    rows = sum(math.prod(_rest(y, bd)) for y in outs)
    res = [torch.zeros(bsz, rows, math.prod(_rest(x, bd)), dtype=torch.float64) for x in ins]
    for i in range(bsz):
        r = 0
        for y in outs:
            yi = y.select(bd, i).reshape(-1)
            for e in range(yi.numel()):
                grads = torch.autograd.grad(yi[e], ins, retain_graph=True, allow_unused=True)
                for j, gx in enumerate(grads):
                    if gx is not None:
                        res[j][i, r] = gx.select(bd, i).reshape(-1)
                r += 1
    row_shape = _rest(outs[0], bd) if single else [rows]
    return tuple(res[j].reshape(bsz, *row_shape, *_rest(x, bd)) for j, x in enumerate(ins))


@pytest.mark.parametrize("chunk_size", CHUNKS, ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ALL_BATCHED, ids=lambda c: c.id)
def test_batch_dim_matches_per_sample_loop(
    case: Case, mode: str, chunk_size: int | None, gen: torch.Generator
) -> None:
    outputs, inputs, _ = case.build(gen)
    assert case.batch_dim is not None
    expected = per_sample_loop(outputs, inputs, case.batch_dim)
    result = tj.jac(
        outputs, inputs, batch_dim=case.batch_dim, mode=mode, chunk_size=chunk_size, **case.kwargs
    )
    got = (result,) if isinstance(result, Tensor) else tuple(result)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", ALL_BATCHED, ids=lambda c: c.id)
def test_batch_dim_is_the_diagonal_of_the_full_jacobian(case: Case, gen: torch.Generator) -> None:
    outputs, inputs, expected = case.build(gen)
    bd = case.batch_dim
    assert bd is not None
    outs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    ins = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    full = (expected,) if isinstance(expected, Tensor) else expected
    per = tj.jac(outputs, inputs, batch_dim=bd)
    per = (per,) if isinstance(per, Tensor) else per
    for x, jf, jp in zip(ins, full, per):
        n_row_dims = outs[0].dim() if isinstance(outputs, Tensor) else 1
        if not isinstance(outputs, Tensor):  # rows concatenated: split them per output
            jf = torch.cat(
                [
                    _diag(part.reshape(*y.shape, *x.shape), y.dim(), bd).reshape(
                        x.shape[bd], math.prod(_rest(y, bd)), *_rest(x, bd)
                    )
                    for y, part in zip(outs, jf.split([y.numel() for y in outs]))
                ],
                dim=1,
            )
        else:
            jf = _diag(jf, n_row_dims, bd)
        torch.testing.assert_close(jp, jf, rtol=1e-10, atol=1e-10)


def _diag(full: Tensor, n_row_dims: int, bd: int) -> Tensor:
    """``out.shape + in.shape`` -> ``[B] + out_rest + in_rest`` (the same sample on both sides)."""
    row_b = bd % n_row_dims
    col_b = n_row_dims + bd % (full.dim() - n_row_dims)
    d = torch.diagonal(full, dim1=row_b, dim2=col_b)  # the batch goes last
    return d.movedim(-1, 0)


def test_inputs_may_be_any_iterable_such_as_model_parameters(gen: torch.Generator) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh()).double()
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = model(x)
    got = tj.jac(y, model.parameters(), retain_graph=True)  # a generator, consumed once
    assert isinstance(got, tuple) and len(got) == 2
    want = tj.jac(y, list(model.parameters()))
    for g, w, p in zip(got, want, model.parameters()):
        assert g.shape == (4, 2, *p.shape)
        torch.testing.assert_close(g, w)
