"""``tj.sparsity_pattern``: every nonzero of the Jacobian, at every point, from the ops run."""

from __future__ import annotations

import contextlib

import pytest
import torch
from sparse_cases import CASES, DTYPE, SparseCase, StraightThrough, dirichlet_1d
from torch.autograd.functional import jacobian
from torch.utils.checkpoint import checkpoint

import torchjac as tj
from torchjac._engine.sparse import sparsity, sparsity_movement, sparsity_rules
from torchjac._engine.sparse.index_sets import Sets
from torchjac._engine.sparse.sparse_plan import pattern_csr


def expect(warns: str | None) -> contextlib.AbstractContextManager[object]:
    """``pytest.warns`` of a ``FallbackWarning`` matching ``warns``; nothing when ``None``."""
    if warns is None:
        return contextlib.nullcontext()
    return pytest.warns(tj.FallbackWarning, match=warns)


def dense_jacobian(case: SparseCase, x: torch.Tensor) -> torch.Tensor:
    """The float64 oracle: a loop of backward passes (``torch.func`` has no sparse products)."""
    y = case.func(x)
    return jacobian(case.func, x).reshape(y.numel(), x.numel())


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_pattern_holds_every_nonzero(case: SparseCase, gen: torch.Generator) -> None:
    x = torch.randn(case.shape, generator=gen, dtype=DTYPE)
    with expect(case.warns):
        pattern = tj.sparsity_pattern(case.func, x)
    assert pattern.layout == torch.sparse_csr and pattern.dtype == torch.bool
    dense = pattern.to_dense()
    for trial in range(3):  # the pattern of one call holds at other points too
        point = x if trial == 0 else torch.randn(case.shape, generator=gen, dtype=DTYPE) * 2
        nonzero = dense_jacobian(case, point) != 0
        assert dense.shape == nonzero.shape
        missed = nonzero & ~dense
        assert not missed.any(), f"missed entries at {missed.nonzero()[:5].tolist()}"
        if case.exact and trial == 0:
            assert torch.equal(dense, nonzero)


def test_pattern_leaves_input_and_rng_alone(gen: torch.Generator) -> None:
    x = torch.randn(6, generator=gen, dtype=DTYPE)
    before, state = x.clone(), torch.get_rng_state()

    def writes(u: torch.Tensor) -> torch.Tensor:
        u.mul_(2.0)
        return u + torch.randn(6, dtype=u.dtype)

    pattern = tj.sparsity_pattern(writes, x)
    assert torch.equal(x, before) and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(pattern.to_dense(), torch.eye(6, dtype=torch.bool))


def test_an_op_without_a_rule_is_dense_and_reported() -> None:
    def f(u: torch.Tensor) -> torch.Tensor:
        m = u[:4].view(2, 2)
        return torch.cat([torch.linalg.det(m).view(1), u[4:] * 2])

    with pytest.warns(tj.FallbackWarning, match="superset.*linalg_det"):
        pattern = tj.sparsity_pattern(f, torch.randn(6, dtype=DTYPE))
    expected = torch.zeros(3, 6, dtype=torch.bool)
    expected[0, :4] = True
    expected[1, 4] = expected[2, 5] = True
    assert torch.equal(pattern.to_dense(), expected)


def test_an_op_without_a_rule_reading_inputs_of_different_sizes() -> None:
    """The dense rule's union of the inputs' sets: inputs of 4 and 2 elements raised (the
    union of index sets of different row counts), as in ``solve(A(x), b(x))``."""
    eye = torch.eye(2, dtype=DTYPE)

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.linalg.solve(u[:4].view(2, 2) + 3 * eye, u[4:6]), u[6:] * 2])

    with pytest.warns(tj.FallbackWarning, match="superset.*linalg_solve"):
        pattern = tj.sparsity_pattern(f, torch.randn(8, dtype=DTYPE))
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[:2, :6] = True
    expected[2, 6] = expected[3, 7] = True
    assert torch.equal(pattern.to_dense(), expected)


@pytest.mark.parametrize(
    "test",
    [
        lambda u: u.sum() > 0,
        lambda u: torch.allclose(u, u.roll(1)),  # aten.allclose: a bool, no tensor, was unseen
        lambda u: torch.equal(u, u.roll(1)),
    ],
    ids=["bool", "allclose", "equal"],
)
def test_a_branch_on_values_is_reported(test) -> None:  # type: ignore[no-untyped-def]
    def f(u: torch.Tensor) -> torch.Tensor:
        return u * 2 if test(u) else u.roll(1)

    with pytest.warns(tj.FallbackWarning, match="branch"):
        tj.sparsity_pattern(f, torch.ones(3, dtype=DTYPE))


def test_an_elementwise_op_on_the_padding_alone_stays_a_constant() -> None:
    """Its union is not checked for emptiness (NOTE [index sets]): a branch on it is still
    not one on ``x``, and the empty operands add no entry."""

    def f(u: torch.Tensor) -> torch.Tensor:
        p = torch.nn.functional.pad(u, (1, 1))
        border = p[:1] * 2 + p[-1:]  # the padding only: no dependence on u
        if border.item() != 0.0:  # not a branch on a value of u
            return u
        return u * 3 + (border + p[1:2]) * p[2:3]

    x = torch.randn(4, dtype=DTYPE)
    pattern = tj.sparsity_pattern(f, x)  # warnings are errors: none is issued
    expected = torch.eye(4, dtype=torch.bool)
    expected[:, :2] = True
    assert torch.equal(pattern.to_dense(), expected)
    lazy = Sets.lazy_union([Sets.empty(4, 4), Sets.identity(4).gather(torch.full((4,), -1))], 4, 4)
    assert lazy._live is None and not lazy.live and lazy.nnz == 0


def test_index_sets_take_relabel_union() -> None:
    s = Sets(3, 4, torch.tensor([0, 0, 2]), torch.tensor([1, 3, 2]))
    t = s.take(torch.tensor([2, 0, 0, 1]))
    assert t.row.tolist() == [0, 1, 1, 2, 2] and t.col.tolist() == [2, 1, 3, 1, 3]
    r = t.relabel(torch.tensor([0, 0, 1, 1]), 2)
    assert r.row.tolist() == [0, 0, 0, 1, 1] and r.col.tolist() == [1, 2, 3, 1, 3]
    u = Sets.union([r, Sets.identity(4).take(torch.tensor([3, 0]))], 2, 4)
    assert torch.equal(pattern_csr(u).to_dense(), torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]]).bool())


@pytest.mark.parametrize(
    "func",
    [
        lambda x: torch.zeros(2, 3, dtype=x.dtype) @ x,
        lambda x: x @ torch.zeros(3, 2, dtype=x.dtype) + x[:2] ** 2,
        lambda x: torch.addmm(x[:2].view(2, 1), torch.zeros(2, 3, dtype=x.dtype), x.view(3, 1)),
    ],
    ids=["mv", "mm-plus", "addmm"],
)
def test_a_constant_operand_without_nonzeros(func) -> None:  # type: ignore[no-untyped-def]
    """A product with an all-zero constant adds no pairs (an empty gather, which raised)."""
    x = torch.randn(3, dtype=DTYPE)
    want = jacobian(func, x).reshape(-1, 3)
    assert not ((want != 0) & ~tj.sparsity_pattern(func, x).to_dense()).any()
    torch.testing.assert_close(tj.sparse_jacobian(func, x).to_dense(), want)


def test_index_sets_padded_rows_lazy_unions_and_views() -> None:
    eye = Sets.identity(6)
    shifted = eye.gather(torch.tensor([1, 2, 3, 4, 5, -1]))  # one gather, -1: none
    assert shifted._ell is not None and shifted._row is None
    both = Sets.union([eye, shifted, eye], 6, 6)  # lazy; ``eye`` twice is one operand
    assert both._parts is not None
    assert both.row.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert both.col.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    view = both.strided((2, 2), (3, 1), 1)  # rows 1, 2, 4, 5 of a [2, 3] view
    assert view is not None and view.row.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert view.col.tolist() == [1, 2, 2, 3, 4, 5, 5]
    uneven = Sets.union([eye, Sets(6, 6, torch.zeros(6, dtype=torch.long), torch.arange(6))], 6, 6)
    assert uneven.ell() is None and uneven.nnz == 11  # one full row: pairs, not padded rows
    assert uneven.gather(torch.tensor([[0, -1], [-1, -1]])).row.tolist() == [0] * 6


@pytest.mark.parametrize(
    ("func", "x", "error", "match"),
    [
        (None, torch.ones(2), TypeError, "sparsity_pattern: `func` must be callable"),
        (torch.sin, [1.0], TypeError, "`x` must be one torch.Tensor, got list"),
        (torch.sin, torch.ones(2, dtype=torch.long), TypeError, "real floating dtype"),
        (lambda u: (u, u), torch.ones(2), TypeError, "func must return one Tensor"),
        (lambda u: u.long(), torch.ones(2), TypeError, "real floating dtype"),
    ],
)
def test_bad_arguments(func, x, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        tj.sparsity_pattern(func, x)


def test_an_index_read_as_a_python_int_is_reported() -> None:
    with pytest.warns(tj.FallbackWarning, match="_local_scalar_dense"):
        tj.sparsity_pattern(lambda u: u[u.argmax()] * u, torch.randn(4, dtype=DTYPE))


def test_without_storage_weak_references(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback for a torch without ``StorageWeakRef``: storages kept alive instead."""
    monkeypatch.setattr(sparsity, "StorageWeakRef", None)
    for case in CASES[:6]:
        x = torch.randn(case.shape, dtype=DTYPE)
        found = tj.sparsity_pattern(case.func, x).to_dense()
        assert torch.equal(found, dense_jacobian(case, x) != 0)


@pytest.mark.parametrize("tag", [True, False])
def test_reductions_with_and_without_torchs_reduction_tag(
    tag: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Older torch versions lack the ``reduction`` tag: the names cover them."""
    if not tag:
        monkeypatch.setattr(sparsity_rules, "_REDUCTION", None)
    sparsity_rules.choose_rule.cache_clear()

    def f(u: torch.Tensor) -> torch.Tensor:
        m = u.view(2, 3)
        parts = [torch.maximum(u, u.roll(1)), m.max(1).values, m.median(1).values, m.amin(0)]
        return torch.cat([*parts, u.max().view(1), u.median().view(1), u.logsumexp(0).view(1)])

    try:
        x = torch.randn(6, dtype=DTYPE)
        pattern = tj.sparsity_pattern(f, x).to_dense()
        dense = jacobian(f, x) != 0
        assert not (dense & ~pattern).any()
        assert int(pattern.sum()) == 12 + 6 + 6 + 6 + 18
    finally:
        sparsity_rules.choose_rule.cache_clear()


def test_kept_code_maps_follow_the_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """NOTE [movement codes]: a kept map is taken only for the same op, shapes and arguments."""
    x = torch.randn(4, 5, dtype=DTYPE)
    funcs = [
        lambda u: torch.nn.functional.pad(u, (1, 1, 1, 1))[1:, :-2],
        lambda u: torch.nn.functional.pad(u, (2, 0, 0, 2))[1:, :-2],
        lambda u: torch.nn.functional.pad(u, (2, 0, 0, 2), value=3.0)[1:, :-2],  # a superset
        lambda u: torch.cat([torch.roll(u, 1, 0), u.flip(1)]),
        lambda u: torch.cat([torch.roll(u, 2, 0), u.flip(0)]),
    ]
    monkeypatch.setattr(sparsity_movement, "CACHED_CODES", -1)  # none kept
    fresh = [tj.sparsity_pattern(func, x).to_dense() for func in funcs]
    monkeypatch.setattr(sparsity_movement, "CACHED_CODES", 2**16)
    monkeypatch.setattr(sparsity_movement, "_code_maps", {})
    for _ in range(2):  # made, then kept
        for func, want in zip(funcs, fresh):
            got = tj.sparsity_pattern(func, x).to_dense()
            assert torch.equal(got, want)
            assert not ((jacobian(func, x).reshape(-1, x.numel()) != 0) & ~got).any()
    assert len(sparsity_movement._code_maps) >= len(funcs)


def test_a_long_chain_of_elementwise_ops_is_no_deep_recursion() -> None:
    """Their lazy unions nest as deep as the chain is long (NOTE [index sets]): asking the
    last whether it is live (here the reduction does) walks them without recursion."""

    def f(u: torch.Tensor) -> torch.Tensor:
        y = u
        for _ in range(800):  # 1,600 nested unions, past Python's recursion limit
            y = y * u + u
        return y.sum(0, keepdim=True)

    x = torch.full((3,), 1e-3, dtype=DTYPE)
    assert torch.equal(tj.sparsity_pattern(f, x).to_dense(), torch.ones(1, 3, dtype=torch.bool))


@pytest.mark.parametrize(
    "func",
    [
        lambda u: u.view(3, 3).to_sparse().to_dense() * 2,
        lambda u: torch.sparse.mm(u.view(3, 3).to_sparse(), torch.ones(3, 2, dtype=DTYPE)),
        lambda u: u.view(3, 3).to_sparse_csr().values().sin(),
        lambda u: torch.sparse_coo_tensor(
            torch.tensor([[0, 2]]), u[:2], (3,), check_invariants=True
        ).to_dense(),
        lambda u: torch.sparse.sum(u.view(3, 3).to_sparse(), 1).to_dense(),
    ],
    ids=["to_dense", "sparse_mm", "csr_values", "coo_tensor", "sparse_sum"],
)
def test_a_tensor_of_a_sparse_layout_carries_its_sets(func) -> None:  # type: ignore[no-untyped-def]
    """A sparse tensor made from ``x`` has no storage of its elements: it keeps the union of
    what made it, reported, where its dependence was dropped (an empty pattern, silently)."""
    x = torch.randn(9, dtype=DTYPE)
    with pytest.warns(tj.FallbackWarning, match="superset.*sparse|superset.*coo"):
        pattern = tj.sparsity_pattern(func, x)
    nonzero = jacobian(func, x).reshape(pattern.shape) != 0
    assert nonzero.any() and not (nonzero & ~pattern.to_dense()).any()
    with pytest.warns(tj.FallbackWarning, match="superset"):
        J = tj.sparse_jacobian(func, x, mode="rev")
    torch.testing.assert_close(J.to_dense(), jacobian(func, x).reshape(J.shape))


def test_the_gradient_of_a_sum_over_slices_has_the_hessian_pattern() -> None:
    """``torch.func.grad`` inside ``func`` (a sparse Hessian): the backward of slicing,
    ``select`` and ``diagonal`` moves elements into zeros, as padding does; each was dense."""

    def energy(u: torch.Tensor) -> torch.Tensor:
        m = u.view(3, 3)
        return ((u[1:] - u[:-1]) ** 2 * u[1:]).sum() + u[2] ** 3 + m.diagonal().prod()

    x = torch.randn(9, dtype=DTYPE)
    pattern = tj.sparsity_pattern(torch.func.grad(energy), x)  # no FallbackWarning
    hessian = torch.func.hessian(energy)(x) != 0
    assert torch.equal(pattern.to_dense(), hessian)


def test_reentrant_checkpointing_keeps_the_pattern_of_its_ops() -> None:
    """NOTE [custom functions in sparsity]: torch's reentrant checkpoint is an autograd Function
    whose backward is its forward's derivative: its pattern is the plain call's, no warning."""
    x = torch.randn(7, dtype=DTYPE)
    plain = tj.sparsity_pattern(dirichlet_1d, x).to_dense()
    got = tj.sparsity_pattern(lambda u: checkpoint(dirichlet_1d, u, use_reentrant=True), x)
    assert torch.equal(got.to_dense(), plain)


class _Blind(torch.autograd.Function):
    """A forward that never reads its input: its derivative may involve all of ``x``."""

    @staticmethod
    def forward(ctx, u):  # type: ignore[no-untyped-def]
        return torch.ones(2, dtype=u.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g.sum() * torch.ones(3, dtype=g.dtype)


def test_a_custom_function_reads_its_inputs_as_they_came() -> None:
    """An input's sets are those it had when the Function was called (here the slice ``u[:3]``
    of ``x``); an input its forward never read counts as all of ``x``; a Function of constants
    forces nothing."""
    x = torch.randn(5, dtype=DTYPE)

    def f(u: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(5, dtype=u.dtype)
        return torch.cat([StraightThrough.apply(u[:3]) + StraightThrough.apply(ones)[:3], u[3:]])

    with pytest.warns(tj.FallbackWarning, match=r"superset.*StraightThrough \(a custom"):
        got = tj.sparsity_pattern(f, x).to_dense()
    want = torch.zeros(5, 5, dtype=torch.bool)
    want[:3, :3], want[3, 3], want[4, 4] = True, True, True
    assert torch.equal(got, want)
    with pytest.warns(tj.FallbackWarning, match=r"_Blind"):
        blind = tj.sparsity_pattern(lambda u: _Blind.apply(u[1:4]) * 2, x).to_dense()
    assert blind.all()


def test_a_function_autograd_cannot_run_is_traced_without_it() -> None:
    """The trace runs with autograd on (NOTE [custom functions in sparsity]); a function that
    cannot (``.numpy()`` of ``x``, an ``out=`` op) has no AD derivative, and is traced as
    before, without it."""
    x = torch.randn(4, dtype=DTYPE)

    def f(u: torch.Tensor) -> torch.Tensor:
        buf = torch.empty(4, dtype=u.dtype)
        torch.add(u.roll(1), float(u.numpy()[0]), out=buf)
        return buf * u

    eye = torch.eye(4, dtype=torch.bool)
    assert torch.equal(tj.sparsity_pattern(f, x).to_dense(), eye | eye.roll(-1, 1))
