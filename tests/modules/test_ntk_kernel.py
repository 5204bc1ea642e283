"""``tj.ntk`` against ``J₁ J₂ᵀ`` of per-sample ``vmap(jacrev(functional_call))`` Jacobians."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from ntk_cases import CASES, DT, Branchy, Case, _build, reference
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import torchjac as tj


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_explicit_kernel(case: Case, chunk_size: int | None, gen: torch.Generator) -> None:
    model, x1, x2, names = _build(case, gen)
    kw: dict[str, Any] = {
        "batch_dim": case.batch_dim,
        "chunk_size": chunk_size,
        "params": case.params,
    }
    got = tj.ntk(model, x1, x2, **kw)
    want = reference(model, x1, x2, names, case.batch_dim)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("same", [False, True], ids=["x1_x2", "x1_x1"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tiny_memory_budget_builds_blocks(case: Case, same: bool, gen: torch.Generator) -> None:
    """A 2 KB budget: per-sample Jacobians are formed in probe chunks (NOTE [blocked kernel])."""
    model, x1, x2, names = _build(case, gen)
    other = None if same else x2
    got = tj.ntk(model, x1, other, batch_dim=case.batch_dim, params=case.params, max_memory=2000)
    want = reference(model, x1, x1 if same else x2, names, case.batch_dim)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_self_kernel_is_symmetric_psd(case: Case, gen: torch.Generator) -> None:
    model, x1, _, names = _build(case, gen)
    got = tj.ntk(model, x1, batch_dim=case.batch_dim, params=case.params)
    torch.testing.assert_close(
        got, reference(model, x1, x1, names, case.batch_dim), rtol=1e-10, atol=1e-10
    )
    side = round(got.numel() ** 0.5)
    mat = got.reshape(side, side)
    assert torch.equal(mat, mat.T)
    assert torch.linalg.eigvalsh(mat).min() > -1e-10 * mat.diagonal().abs().max()


def test_general_path_falls_back_to_a_loop(gen: torch.Generator) -> None:
    """Data-dependent control flow cannot run under vmap: a loop, with one FallbackWarning."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), Branchy(4), nn.Linear(4, 3)).to(DT)
    x1, x2 = torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(3, 3, generator=gen, dtype=DT)
    with pytest.warns(tj.FallbackWarning, match="ntk: vectorised probing failed"):
        got = tj.ntk(model, x1, x2)
    params = [p for _, p in model.named_parameters()]

    def rows(x: Tensor) -> Tensor:  # autograd double loop over samples and outputs
        out = []
        for xi in x:
            y = model(xi.unsqueeze(0))[0]
            for c in range(y.numel()):
                g = torch.autograd.grad(y[c], params, retain_graph=True)
                out.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(out)

    want = (rows(x1) @ rows(x2).T).reshape(4, 3, 3, 3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert all(p.grad is None for p in params)


def test_params_given_as_parameter_objects(gen: torch.Generator) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    got = tj.ntk(model, x, params=[model[2].weight])
    torch.testing.assert_close(got, reference(model, x, x, ["2.weight"]), rtol=1e-10, atol=1e-10)


class TwoInputs(nn.Module):
    """``model(x, z)``: a Linear of each input, gated, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.fx, self.fz = nn.Linear(3, 4, dtype=DT), nn.Linear(2, 4, dtype=DT)
        self.head = nn.Linear(4, 2, dtype=DT)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fx(x)) * torch.sigmoid(self.fz(z)))


class TwoInputsBare(TwoInputs):
    """The same with ``z`` through a bare parameter: the general path gets both inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.linspace(-1.0, 1.0, 8, dtype=DT).reshape(2, 4))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fx(x)) * torch.sigmoid(self.fz(z) + z @ self.mix))


@pytest.mark.parametrize("cls", [TwoInputs, TwoInputsBare])
def test_model_of_several_inputs(cls: type[nn.Module], gen: torch.Generator) -> None:
    torch.manual_seed(1)
    model = cls()
    x1, z1 = torch.randn(4, 3, generator=gen, dtype=DT), torch.randn(4, 2, generator=gen, dtype=DT)
    x2, z2 = torch.randn(3, 3, generator=gen, dtype=DT), torch.randn(3, 2, generator=gen, dtype=DT)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p: dict[str, Tensor], x: Tensor, z: Tensor) -> Tensor:
        return functional_call(model, p, (x.unsqueeze(0), z.unsqueeze(0))).squeeze(0)

    j1 = vmap(jacrev(f), in_dims=(None, 0, 0))(params, x1, z1)
    j2 = vmap(jacrev(f), in_dims=(None, 0, 0))(params, x2, z2)
    want = sum(torch.einsum("iap,jbp->iajb", j1[n].flatten(2), j2[n].flatten(2)) for n in params)
    got = tj.ntk(model, (x1, z1), (x2, z2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    frozen_fx = tj.ntk(model, [x1, z1], params=["fz.weight", "fz.bias", "head.weight"])
    want_11 = sum(
        torch.einsum("iap,jbp->iajb", j1[n].flatten(2), j1[n].flatten(2))
        for n in ("fz.weight", "fz.bias", "head.weight")
    )
    torch.testing.assert_close(frozen_fx, want_11, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [1, 5, 7, 16])
def test_symmetrize_by_blocks_is_bitwise_the_mean_with_the_transpose(n: int) -> None:
    from torchjac._engine.core.blocked import symmetrize_

    k = torch.randn(n, n, dtype=torch.float32)
    want = (k + k.T) / 2
    assert torch.equal(symmetrize_(k.clone(), block=3), want)
    assert torch.equal(symmetrize_(k.clone()), want)


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (5, 7), (8, 3)])
def test_copy_transposed_by_blocks(rows: int, cols: int) -> None:
    from torchjac._engine.core.blocked import copy_transposed_

    src = torch.randn(rows, cols, dtype=torch.float64)
    dst = torch.zeros(cols + 2, rows + 1, dtype=torch.float64)
    copy_transposed_(dst[1 : cols + 1, :rows], src, block=2)
    want = torch.zeros_like(dst)
    want[1 : cols + 1, :rows] = src.T
    assert torch.equal(dst, want)


@pytest.mark.parametrize("shape", [(3, 5), (256, 256), (300, 257), (257, 1000), (1, 300)])
def test_self_gram_is_the_product_with_the_transpose(shape: tuple[int, int]) -> None:
    from torchjac._engine.core.blocked import self_gram

    j = torch.randn(shape, dtype=torch.float64)
    got = self_gram(j)
    torch.testing.assert_close(got, j @ j.T)
    if min(shape) >= 256:  # by block rows: the blocks below the diagonal ones are mirrored
        block = torch.arange(shape[0]) // -(-shape[0] // 4)
        apart = block[:, None] != block[None, :]
        assert torch.equal(got[apart], got.T[apart])
