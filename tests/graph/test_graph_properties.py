"""Property tests of ``tj.jac`` on random shapes: every plan gives the oracle's Jacobian."""

from __future__ import annotations

import math

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.func import jacrev

import torchjac as tj

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)
plans = st.tuples(st.sampled_from(["auto", "rev", "fwd"]), st.sampled_from([None, 1, 2, 5]))
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _mixer(in_shapes: list[tuple[int, ...]], out_shapes: list[tuple[int, ...]], seed: int):
    """A smooth map of all inputs to all outputs, with every output touching every input."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(math.prod(s) for s in in_shapes)
    m = sum(math.prod(s) for s in out_shapes)
    mat = torch.randn(m, n, generator=gen, dtype=torch.float64)

    def f(*xs: Tensor) -> tuple[Tensor, ...]:
        v = torch.cat([x.reshape(-1) for x in xs])
        z = torch.tanh(mat @ v) * (1 + (v**2).sum())
        parts = z.split([math.prod(s) for s in out_shapes])
        return tuple(p.reshape(list(s)) for p, s in zip(parts, out_shapes))

    return f


@SETTINGS
@given(
    in_shapes=st.lists(shapes, min_size=1, max_size=3),
    out_shapes=st.lists(shapes, min_size=1, max_size=3),
    single=st.booleans(),
    plan=plans,
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_jacrev(in_shapes, out_shapes, single, plan, seed) -> None:
    if single:
        out_shapes = out_shapes[:1]
    f = _mixer(in_shapes, out_shapes, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in in_shapes]
    ys = f(*xs)
    mode, chunk_size = plan
    got = tj.jac(ys[0] if single else list(ys), xs, mode=mode, chunk_size=chunk_size)
    jacs = jacrev(f, argnums=tuple(range(len(xs))))(*[x.detach() for x in xs])
    for j, x in enumerate(xs):
        if single:
            want = jacs[0][j]
        else:
            want = torch.cat([jacs[i][j].reshape(y.numel(), *x.shape) for i, y in enumerate(ys)])
        assert got[j].shape == want.shape
        torch.testing.assert_close(got[j], want, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(
    batch=st.integers(1, 4),
    in_rest=shapes,
    out_rest=shapes,
    batch_dim=st.sampled_from([0, 1, -1, -2]),
    k=st.one_of(st.none(), st.integers(1, 3)),
    plan=plans,
    seed=st.integers(0, 2**16),
)
def test_random_per_sample_shapes(batch, in_rest, out_rest, batch_dim, k, plan, seed) -> None:
    """``batch_dim`` (optionally with ``jac_outputs``) equals the per-sample Jacobians."""
    assume(all(-len(r) - 1 <= batch_dim <= len(r) for r in (in_rest, out_rest)))
    pos_in, pos_out = batch_dim % (len(in_rest) + 1), batch_dim % (len(out_rest) + 1)
    f = _mixer([in_rest], [out_rest], seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(batch, *in_rest, generator=gen, dtype=torch.float64)
    x = x0.movedim(0, pos_in).contiguous().requires_grad_()  # the batch at `batch_dim`
    y = torch.stack([f(x.select(pos_in, b))[0] for b in range(batch)], dim=pos_out)
    a = None if k is None else torch.randn(k, *y.shape, generator=gen, dtype=torch.float64)
    mode, chunk_size = plan
    got = tj.jac(y, x, a, batch_dim=batch_dim, mode=mode, chunk_size=chunk_size)
    per = [jacrev(lambda z: f(z)[0])(x0[b]) for b in range(batch)]
    if a is None:
        want = torch.stack(per)
    else:
        m, n = math.prod(out_rest), math.prod(in_rest)
        a_per = a.movedim(1 + pos_out, 1)  # [k, B, *out_rest]
        want = torch.stack(
            [
                (a_per[:, b].reshape(k, m) @ per[b].reshape(m, n)).reshape(k, *in_rest)
                for b in range(batch)
            ]
        )
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
