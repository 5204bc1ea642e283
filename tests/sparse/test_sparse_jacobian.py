"""``tj.sparse_jacobian``: equal to the dense Jacobian, in every mode, chunked or not."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from sparse_cases import (
    CASES,
    DTYPE,
    SparseCase,
    bratu_roll,
    checkpointed,
    dirichlet_1d,
    sparse_matrix,
    stencil_3d,
)
from test_sparse_pattern import dense_jacobian, expect
from torch.autograd.functional import jacobian

import torchjac as tj
from torchjac._engine.core.fast import fast_paths
from torchjac._engine.sparse import colouring, sparse_plan
from torchjac._engine.sparse.colouring import colour_columns, lattice_colouring, valid


def csr(dense: torch.Tensor) -> torch.Tensor:
    """``dense.to_sparse_csr()`` without torch's "beta" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return dense.to_sparse_csr()


@functools.cache
def _checkpoint_without_jvp() -> bool:
    """Whether this torch's checkpoint is a Function without a forward derivative (torch 2.4)."""
    x = torch.zeros(6, dtype=DTYPE)
    try:
        torch.func.jvp(checkpointed, (x,), (x,))
    except NotImplementedError:
        return True
    return False


def _warning(case: SparseCase, mode: str) -> str | None:
    if case.func is sparse_matrix:  # torch.func has no sparse jvp, vmap no sparse expand
        return "reverse mode|loop"
    if case.name == "batch_norm_train" and mode == "fwd":  # num_batches_tracked += 1 under jvp
        return "reverse mode"
    if case.func is checkpointed and mode == "fwd" and _checkpoint_without_jvp():
        return "reverse mode"
    return case.warns


def _pairs(P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, column) pairs of a CSR pattern's entries."""
    crow = P.crow_indices()
    return torch.repeat_interleave(torch.arange(P.shape[0]), crow[1:] - crow[:-1]), P.col_indices()


@functools.cache
def _point_and_oracle(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A point of the case and its dense Jacobian, computed once for the three modes."""
    (case,) = [c for c in CASES if c.name == name]
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    return x, dense_jacobian(case, x)


@pytest.mark.parametrize("mode", ["auto", "fwd", "rev"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_equals_the_dense_jacobian(case: SparseCase, mode: str) -> None:
    x, want = _point_and_oracle(case.name)
    with expect(_warning(case, mode)):
        J = tj.sparse_jacobian(case.func, x.clone(), mode=mode)
    assert J.layout == torch.sparse_csr and J.dtype == DTYPE
    torch.testing.assert_close(J.to_dense(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 2, None])
@pytest.mark.parametrize("fast", [True, False])
def test_chunks_and_fast_paths_agree(chunk_size: int | None, fast: bool) -> None:
    x = torch.randn(6, 5, dtype=DTYPE)
    want = dense_jacobian(CASES[2], x)
    with fast_paths(fast):
        for mode in ("fwd", "rev"):
            J = tj.sparse_jacobian(bratu_roll, x, mode=mode, chunk_size=chunk_size)
            torch.testing.assert_close(J.to_dense(), want, rtol=1e-12, atol=1e-12)


def test_a_stencil_needs_few_probes_at_any_size() -> None:
    for n in (8, 32):
        P = tj.sparsity_pattern(bratu_roll, torch.zeros(n, n, dtype=DTYPE))
        crow, col = P.crow_indices(), P.col_indices()
        count = colour_columns(crow, col, n * n).count
        assert 5 <= count <= 9  # greedy on the 13-point distance-2 neighbourhood


def test_colouring_is_distance_two(gen: torch.Generator) -> None:
    mask = torch.rand(30, 40, generator=gen) < 0.1
    P = csr(mask)
    c = colour_columns(P.crow_indices(), P.col_indices(), 40).colour
    same = c.view(-1, 1) == c.view(1, -1)
    share = (mask.T.double() @ mask.double()) > 0
    assert not (same & share & ~torch.eye(40, dtype=torch.bool)).any()


def test_a_pattern_is_reused_with_its_colouring(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(5, 6, dtype=DTYPE)
    P = tj.sparsity_pattern(bratu_roll, x)
    calls = []
    real = colouring.colour_columns

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args)

    monkeypatch.setattr("torchjac._engine.sparse.sparse_plan.colour_columns", spy)
    for _step in range(3):
        x = x + 0.1
        J = tj.sparse_jacobian(bratu_roll, x, pattern=P, mode="fwd")
        torch.testing.assert_close(J.to_dense(), dense_jacobian(CASES[2], x))
    assert len(calls) == 1


def test_a_detected_pattern_found_again_reuses_its_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse_plan, "_detected", [])
    calls = []
    real = sparse_plan.lattice_colouring

    def spy(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(sparse_plan, "lattice_colouring", spy)
    x = torch.randn(5, 6, dtype=DTYPE)
    for step in range(3):
        J = tj.sparse_jacobian(bratu_roll, x + step)
        torch.testing.assert_close(J.to_dense(), dense_jacobian(CASES[2], x + step))
        if step == 0:
            first = len(calls)
    assert first and len(calls) == first  # coloured once
    # the same sizes, another pattern: a plan of its own, never the kept one
    for shift in (1, 2):
        func = functools.partial(lambda u, s: u * torch.roll(u, s, 0), s=shift)
        J = tj.sparse_jacobian(func, x)
        want = torch.func.jacfwd(func)(x).reshape(30, 30)
        torch.testing.assert_close(J.to_dense(), want, rtol=1e-12, atol=1e-12)
    assert len(calls) > first


def test_kept_detected_plans_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse_plan, "_detected", [])
    x = torch.randn(40, dtype=DTYPE)
    for shift in range(1, 2 * sparse_plan.DETECTED_PLANS):
        tj.sparse_jacobian(lambda u, s=shift: u * torch.roll(u, s), x)
    assert len(sparse_plan._detected) == sparse_plan.DETECTED_PLANS
    monkeypatch.setattr(sparse_plan, "DETECTED_SLOTS", 10)  # larger than this: not kept
    monkeypatch.setattr(sparse_plan, "_detected", [])
    tj.sparse_jacobian(lambda u: u * torch.roll(u, 1), x)
    assert not sparse_plan._detected


def test_a_pattern_changed_in_place_gets_a_new_plan() -> None:
    x = torch.randn(6, dtype=DTYPE)
    P = csr(torch.ones(6, 6, dtype=torch.bool))
    J = tj.sparse_jacobian(dirichlet_1d, x, pattern=P)
    torch.testing.assert_close(J.to_dense(), dense_jacobian(CASES[1], x))
    P.values()[1] = False  # (0, 1) dropped: a nonzero outside the pattern now
    with pytest.raises(ValueError, match="nonzeros outside the sparsity pattern"):
        tj.sparse_jacobian(dirichlet_1d, x, pattern=P)


def test_a_pattern_missing_a_nonzero_raises() -> None:
    x = torch.randn(6, dtype=DTYPE)
    diagonal = csr(torch.eye(6, dtype=torch.bool))
    for mode in ("fwd", "rev"):
        with pytest.raises(ValueError, match="nonzeros outside the sparsity pattern"):
            tj.sparse_jacobian(dirichlet_1d, x, pattern=diagonal, mode=mode)


def test_input_and_rng_left_alone() -> None:
    x = torch.randn(7, dtype=DTYPE)
    before, state = x.clone(), torch.get_rng_state()
    J = tj.sparse_jacobian(lambda u: torch.roll(u, 1) * u, x)
    assert torch.equal(x, before) and torch.equal(torch.get_rng_state(), state)
    assert J.values().data_ptr() != x.data_ptr()


def test_float32_and_an_empty_pattern() -> None:
    x = torch.randn(5)
    J = tj.sparse_jacobian(lambda u: u.sin() * torch.roll(u, 1), x)
    assert J.dtype == torch.float32
    torch.testing.assert_close(
        J.to_dense(), torch.func.jacrev(lambda u: u.sin() * torch.roll(u, 1))(x)
    )
    zero = tj.sparse_jacobian(lambda u: torch.ones(3), x)
    assert zero.shape == (3, 5) and zero.values().numel() == 0


@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
@pytest.mark.parametrize(("x_dtype", "y_dtype"), [(DTYPE, torch.float32), (torch.float32, DTYPE)])
def test_the_result_has_x_dtype_in_every_mode(mode: str, x_dtype, y_dtype) -> None:  # type: ignore[no-untyped-def]
    """As the dense ``tj.jacobian``: forward probes gave the output's dtype (float32 for a
    float64 ``x`` whose ``func`` returns float32), reverse ones ``x``'s."""
    x = torch.randn(5, dtype=x_dtype)

    def f(u: torch.Tensor) -> torch.Tensor:
        return (u.sin() * torch.roll(u, 1)).to(y_dtype)

    J = tj.sparse_jacobian(f, x, mode=mode)
    assert J.dtype == x_dtype
    want = tj.jacobian(f, x, mode=mode)
    torch.testing.assert_close(J.to_dense(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "sideways"}, ValueError, "sparse_jacobian: `mode` must be one of"),
        ({"chunk_size": 0}, ValueError, "`chunk_size` must be >= 1"),
        ({"pattern": torch.ones(3, 3, dtype=torch.bool)}, TypeError, "to_sparse_csr"),
        ({"pattern": (3, 4, torch.float32)}, ValueError, r"boolean with shape \[m, 3\]"),
        ({"pattern": (2, 3, torch.bool)}, ValueError, "has 2 rows"),
        ({"max_memory": "lots"}, ValueError, "max_memory"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:  # type: ignore[no-untyped-def]
    if isinstance(kwargs.get("pattern"), tuple):
        m, n, dtype = kwargs["pattern"]
        kwargs = {"pattern": csr(torch.ones(m, n, dtype=dtype))}
    with pytest.raises(error, match=match):
        tj.sparse_jacobian(torch.sin, torch.ones(3), **kwargs)


@pytest.mark.parametrize(
    ("func", "shape", "count"), [(bratu_roll, (10, 10), 5), (stencil_3d, (7, 7, 7), 7)]
)
def test_a_lattice_colours_grid_stencils_optimally(func, shape, count) -> None:  # type: ignore[no-untyped-def]
    rows, cols = _pairs(tj.sparsity_pattern(func, torch.zeros(shape, dtype=DTYPE)))
    longest = int(torch.bincount(rows).max())
    found = lattice_colouring(rows, cols, shape, longest)
    assert found is not None and found.count == count
    assert valid(rows, cols, found.colour, count)
    assert lattice_colouring(cols, rows, shape, longest) is not None  # rows, from the same pairs
    with fast_paths(False):
        assert lattice_colouring(rows, cols, shape, longest) is None


def test_a_lattice_declines_what_it_cannot_colour(gen: torch.Generator) -> None:
    mask = torch.rand(40, 36, generator=gen) < 0.15
    rows, cols = _pairs(csr(mask))
    found = lattice_colouring(rows, cols, (6, 6), int(torch.bincount(rows).max()))
    assert found is None or valid(rows, cols, found.colour, found.count)


@pytest.mark.parametrize(
    ("func", "x", "dense"),
    [
        (lambda u: torch.stack([u, u**2]), torch.tensor(1.5, dtype=DTYPE), [[1.0], [3.0]]),
        (lambda u: u.sum(), torch.ones(3, dtype=DTYPE), [[1.0, 1.0, 1.0]]),
        (lambda u: u[:0], torch.ones(3, dtype=DTYPE), torch.zeros(0, 3).tolist()),
        (lambda u: u * 2, torch.zeros(0, dtype=DTYPE), []),
    ],
    ids=["0-d input", "0-d output", "empty output", "empty input"],
)
@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_zero_dimensional_and_empty(func, x, dense, mode) -> None:  # type: ignore[no-untyped-def]
    J = tj.sparse_jacobian(func, x, mode=mode)
    assert J.to_dense().tolist() == dense


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_an_input_requiring_grad_keeps_no_grad_and_the_result_no_graph(mode: str) -> None:
    x = torch.randn(5, dtype=DTYPE, requires_grad=True)
    with torch.inference_mode():
        frozen = torch.randn(5, dtype=DTYPE)  # an inference tensor is copied, not refused
    for point in (x, frozen):
        J = tj.sparse_jacobian(lambda u: torch.roll(u, 1) * u, point, mode=mode)
        assert not J.requires_grad and x.grad is None
        u = point.detach()
        want = torch.diag(torch.roll(u, 1)) + torch.roll(torch.eye(5), 1, 0) * u.view(-1, 1)
        torch.testing.assert_close(J.to_dense(), want.to(DTYPE))


@pytest.mark.parametrize("func", [tj.sparse_jacobian, tj.sparsity_pattern])
def test_torch_beta_warning_stays_hidden_when_torch_warns_always(func) -> None:  # type: ignore[no-untyped-def]
    """``torch.set_warn_always(True)`` makes torch's once-only beta warning show every time:
    a result's CSR construction still hides it (warnings are errors here)."""
    x = torch.randn(5, dtype=DTYPE)
    f = lambda u: torch.roll(u, 1) * u  # noqa: E731
    func(f, x)  # the first call, under torch's default
    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            func(f, x)
    finally:
        torch.set_warn_always(was)


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("given", [False, True])
def test_a_func_writing_into_its_argument_leaves_x_alone(chunk_size, given) -> None:  # type: ignore[no-untyped-def]
    """Forward probes give ``func`` a copy of its (dual) input: ``x`` is not written, and
    each probe sees ``x``, not the point the previous probe left."""

    def writes(u: torch.Tensor) -> torch.Tensor:
        u[1:] += u[:-1].clone() ** 2
        u.mul_(2)
        return u

    def pure(u: torch.Tensor) -> torch.Tensor:
        return torch.cat([u[:1], u[1:] + u[:-1] ** 2]) * 2

    x = torch.randn(6, dtype=DTYPE)
    before = x.clone()
    pattern = tj.sparsity_pattern(pure, x) if given else None
    J = tj.sparse_jacobian(writes, x, mode="fwd", pattern=pattern, chunk_size=chunk_size)
    assert torch.equal(x, before)
    torch.testing.assert_close(J.to_dense(), torch.func.jacfwd(pure)(x))


@pytest.mark.parametrize("mode", ["fwd", "rev"])
def test_a_pattern_with_an_entry_twice_counts_it_once(mode: str) -> None:
    """A CSR built unchecked may hold an entry twice (or out of order): each entry of the
    result is still the Jacobian's, once."""
    crow, col = torch.tensor([0, 2, 4, 5]), torch.tensor([0, 0, 2, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's beta warning
        ones = torch.ones(5, dtype=torch.bool)
        pattern = torch.sparse_csr_tensor(crow, col, ones, (3, 3), check_invariants=False)
    x = torch.randn(3, dtype=DTYPE)

    def f(u: torch.Tensor) -> torch.Tensor:
        return u * 2 + torch.cat([u[:1] * 0, u[2:] * u[1:2], u[2:] * 0])

    J = tj.sparse_jacobian(f, x, pattern=pattern, mode=mode)
    torch.testing.assert_close(J.to_dense(), torch.func.jacfwd(f)(x))
    assert J.values().numel() == 4


@pytest.mark.parametrize("grad", [False, True])
def test_reverse_probes_of_a_given_pattern_call_func_on_a_copy(grad: bool) -> None:
    """With ``pattern`` given, the reverse probes' one call of ``func`` gets a copy of ``x``
    too: a ``func`` writing into its argument raised on a leaf, and wrote into an ``x``
    computed with grad (``x`` left at 1.5 x, the Jacobian's entries 1.0 for 1.5)."""

    def writes(u: torch.Tensor) -> torch.Tensor:
        u.mul_(1.5)
        return u * torch.roll(u, 1)

    def pure(u: torch.Tensor) -> torch.Tensor:
        return (1.5 * u) * torch.roll(1.5 * u, 1)

    w = torch.randn(6, dtype=DTYPE, requires_grad=grad)
    x = w * 2 if grad else w
    before = x.detach().clone()
    pattern = tj.sparsity_pattern(pure, before)
    for given in (None, pattern):
        J = tj.sparse_jacobian(writes, x, mode="rev", pattern=given)
        assert torch.equal(x.detach(), before)
        torch.testing.assert_close(J.to_dense(), torch.func.jacfwd(pure)(before))


@pytest.mark.parametrize("mode", ["fwd", "rev", "auto"])
def test_a_pattern_with_int32_indices(mode: str) -> None:
    """A CSR with int32 indices (as built from SciPy's ``indptr`` and ``indices``) is a
    pattern like any other: forward colouring raised (``index_add_`` of int32 into int64)."""
    x = torch.randn(6, dtype=DTYPE)

    def f(u: torch.Tensor) -> torch.Tensor:
        return u.sin() * torch.roll(u, 1) + u[[0]]

    p = tj.sparsity_pattern(f, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's beta warning
        crow, col = p.crow_indices().int(), p.col_indices().int()
        pattern = torch.sparse_csr_tensor(crow, col, p.values(), p.shape)
    J = tj.sparse_jacobian(f, x, pattern=pattern, mode=mode)
    torch.testing.assert_close(J.to_dense(), torch.func.jacfwd(f)(x))


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_reverse_probes_in_chunks_pass_cotangents_of_their_own(chunk_size: int) -> None:
    """Torch's backward of ``as_strided_scatter`` reads a cotangent with a storage offset
    wrongly: chunks of the seed block (views at an offset) gave a wrong Jacobian, silently
    (the check probe, one more such view, agreed with it)."""

    def f(u: torch.Tensor) -> torch.Tensor:
        z = torch.zeros(10, dtype=u.dtype)
        return torch.as_strided_scatter(z, u[:4] * u[4:8].sum(), (4,), (2,), 1)  # 4 colours

    x = torch.randn(8, dtype=DTYPE)
    J = tj.sparse_jacobian(f, x, mode="rev", chunk_size=chunk_size)
    torch.testing.assert_close(J.to_dense(), jacobian(f, x))  # vmap has no as_strided_scatter


def test_auto_falls_back_to_forward_when_reverse_mode_ad_fails() -> None:
    """A ``func`` writing in place a value saved for backward: reverse-mode AD raises, forward
    mode follows it. ``"auto"`` took reverse (fewer colours on ties) and raised, where the
    dense ``tj.jacobian`` (columns) returned the Jacobian."""

    def f(u: torch.Tensor) -> torch.Tensor:
        t = (u * 2).reshape(2, 6)
        t[..., 1:] += t[..., :-1] * t[..., 1:]
        return t

    x = torch.randn(12, dtype=DTYPE)
    with pytest.warns(tj.FallbackWarning, match="computed columns in forward mode"):
        J = tj.sparse_jacobian(f, x)
    torch.testing.assert_close(J.to_dense(), torch.func.jacfwd(f)(x).reshape(12, 12))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        tj.sparse_jacobian(f, x, mode="rev")


def _write_into_a_chunk(u: torch.Tensor) -> torch.Tensor:
    """Writes into one of ``chunk``'s views: autograd refuses (a view of a multi-output view
    op written in place), forward-mode AD follows it."""
    y = u.clone()
    c = y.chunk(3, dim=-1)
    c[-1].copy_(c[0][..., : c[-1].shape[-1]] * 2)
    return y


@pytest.mark.parametrize("summed", [False, True], ids=["fwd_fewer", "rev_fewer"])
def test_auto_detects_a_pattern_when_autograd_cannot_run_func(summed: bool) -> None:
    """Detection traced ``func`` with autograd on for ``"auto"``'s reverse probes and raised
    (``Output 2 of Split is a view ... modified inplace``), though forward mode follows it;
    now the trace runs without autograd, and ``"auto"`` takes columns whichever side had
    fewer colours (a summed row makes rows the fewer)."""

    def f(u: torch.Tensor) -> torch.Tensor:
        y = _write_into_a_chunk(u)
        return torch.cat([y, y.sum(-1, keepdim=True)], -1) if summed else y

    x = torch.randn(7, dtype=DTYPE)
    expected = torch.func.jacfwd(f)(x)
    with warnings.catch_warnings():  # the fallback warns when reverse had fewer colours
        warnings.simplefilter("ignore", tj.FallbackWarning)
        J = tj.sparse_jacobian(f, x)
        again = tj.sparse_jacobian(f, x, pattern=tj.sparsity_pattern(f, x))
    for got in (J, again, tj.sparse_jacobian(f, x, mode="fwd")):
        torch.testing.assert_close(got.to_dense(), expected)
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
        tj.sparse_jacobian(f, x, mode="rev")
    xs = torch.randn(3, 7, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tj.FallbackWarning)
        blocks = tj.sparse_jacobian(f, xs, batch_dim=0)
    for i in range(3):
        torch.testing.assert_close(blocks[i].to_dense(), torch.func.jacfwd(f)(xs[i]))
