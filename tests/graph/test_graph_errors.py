"""``tj.jac``: bad arguments fail before any work, naming ``jac`` and the argument; nothing the
user owns is changed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import randn
from torch import Tensor

import torchjac as tj


@pytest.fixture
def problem(gen: torch.Generator) -> tuple[Tensor, Tensor]:
    x = randn(4, 3, gen=gen, grad=True)
    return torch.tanh(x) * 2, x  # tanh saves its result: a freed graph cannot be reused


def _graph_intact(y: Tensor, x: Tensor) -> None:
    """The failed call did no work: the graph is still there and ``.grad`` untouched."""
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    torch.testing.assert_close(g, 2 * (1 - torch.tanh(x.detach()) ** 2))
    assert x.grad is None


BAD_ARGS: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("mode_unknown", {"mode": "reverse"}, ValueError, r"jac: `mode` .*'reverse'"),
    ("mode_none", {"mode": None}, ValueError, r"jac: `mode` .*None"),
    ("chunk_size_zero", {"chunk_size": 0}, ValueError, r"jac: `chunk_size` must be >= 1.*got 0"),
    ("chunk_size_negative", {"chunk_size": -2}, ValueError, r"jac: `chunk_size`.*-2"),
    ("chunk_size_float", {"chunk_size": 2.0}, TypeError, r"jac: `chunk_size`.*float"),
    ("chunk_size_bool", {"chunk_size": True}, TypeError, r"jac: `chunk_size`.*bool"),
    ("chunk_size_str", {"chunk_size": "4"}, TypeError, r"jac: `chunk_size`.*str"),
    ("batch_dim_too_large", {"batch_dim": 2}, ValueError, r"jac: `batch_dim=2` is out of range"),
    ("batch_dim_too_small", {"batch_dim": -3}, ValueError, r"jac: `batch_dim=-3` .*out of range"),
    ("batch_dim_str", {"batch_dim": "0"}, TypeError, r"jac: `batch_dim`.*str"),
    ("batch_dim_bool", {"batch_dim": False}, TypeError, r"jac: `batch_dim`.*bool"),
    ("max_memory_word", {"max_memory": "lots"}, ValueError, r"jac: `max_memory`.*'lots'"),
    ("max_memory_unit", {"max_memory": "12XB"}, ValueError, r"jac: `max_memory`.*'12XB'"),
    ("max_memory_empty", {"max_memory": ""}, ValueError, r"jac: `max_memory`"),
    ("max_memory_negative", {"max_memory": -5}, ValueError, r"jac: `max_memory`.*-5"),
    ("max_memory_zero", {"max_memory": 0}, ValueError, r"jac: `max_memory`.*positive"),
    ("max_memory_zero_str", {"max_memory": "0GB"}, ValueError, r"jac: `max_memory`.*'0GB'"),
    ("max_memory_negative_str", {"max_memory": "-1MiB"}, ValueError, r"jac: `max_memory`"),
    ("max_memory_nan", {"max_memory": float("nan")}, ValueError, r"jac: `max_memory`.*finite"),
    ("max_memory_tiny_float", {"max_memory": 0.5}, ValueError, r"jac: `max_memory`.*positive"),
    ("max_memory_list", {"max_memory": [1]}, TypeError, r"jac: `max_memory`.*list"),
    ("max_memory_bool", {"max_memory": True}, TypeError, r"jac: `max_memory`"),
]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"), [b[1:] for b in BAD_ARGS], ids=[b[0] for b in BAD_ARGS]
)
def test_bad_option(problem, kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    y, x = problem
    with pytest.raises(exc, match=match):
        tj.jac(y, x, **kwargs)
    _graph_intact(y, x)


def test_outputs_not_tensors(problem) -> None:
    y, x = problem
    with pytest.raises(TypeError, match=r"jac: `outputs` must be a Tensor.*got str"):
        tj.jac("y", x)
    with pytest.raises(TypeError, match=r"jac: `outputs\[1\]` must be a torch.Tensor, got int"):
        tj.jac([y, 3], x)
    with pytest.raises(TypeError, match=r"jac: `outputs`.*dict"):
        tj.jac({"y": y}, x)
    with pytest.raises(ValueError, match=r"jac: `outputs` is empty"):
        tj.jac([], x)
    _graph_intact(y, x)


def test_inputs_not_tensors(problem) -> None:
    y, x = problem
    with pytest.raises(TypeError, match=r"jac: `inputs` must be a Tensor.*got int"):
        tj.jac(y, 3)
    with pytest.raises(TypeError, match=r"jac: `inputs\[1\]` must be a torch.Tensor, got str"):
        tj.jac(y, [x, "x"])
    with pytest.raises(TypeError, match=r"jac: `inputs\['b'\]` must be a torch.Tensor"):
        tj.jac(y, {"a": x, "b": None})
    with pytest.raises(TypeError, match=r"jac: the keys of `inputs` must be str, got int"):
        tj.jac(y, {0: x})
    _graph_intact(y, x)


def test_output_not_on_a_graph(gen) -> None:
    x = randn(3, gen=gen, grad=True)
    with pytest.raises(ValueError, match=r"jac: outputs is not on the autograd graph"):
        tj.jac(randn(3, gen=gen), x)
    with torch.no_grad():
        y = x * 2
    with pytest.raises(ValueError, match=r"jac: outputs\[1\] is not on the autograd graph"):
        tj.jac([x.sin(), y], x)


def test_input_not_requiring_grad(problem, gen) -> None:
    y, x = problem
    with pytest.raises(ValueError, match=r"jac: inputs\[1\] does not require grad"):
        tj.jac(y, [x, randn(3, gen=gen)])
    with pytest.raises(ValueError, match=r"jac: inputs\['w'\] does not require grad"):
        tj.jac(y, {"x": x, "w": x.detach()})
    _graph_intact(y, x)


def test_not_real_floating(gen) -> None:
    z = torch.randn(3, dtype=torch.complex128, generator=gen, requires_grad=True)
    with pytest.raises(TypeError, match=r"jac: .*real floating dtype.*complex128"):
        tj.jac(z * 2, z)


def test_unused_input_is_named(problem, gen) -> None:
    y, x = problem
    other = randn(2, gen=gen, grad=True)
    with pytest.raises(ValueError, match=r"jac: .*do not depend on inputs\[1\].*allow_unused"):
        tj.jac(y, [x, other])
    with pytest.raises(ValueError, match=r"jac: .*do not depend on inputs\['b'\]"):
        tj.jac(y, {"a": x, "b": other})
    _graph_intact(y, x)
    assert other.grad is None


def test_wrong_jac_outputs(problem, gen) -> None:
    y, x = problem  # y: [4, 3]
    with pytest.raises(
        ValueError, match=r"jac: `jac_outputs` must have shape \[k, 4, 3\].*\[2, 3, 3\]"
    ):
        tj.jac(y, x, randn(2, 3, 3, gen=gen))
    with pytest.raises(ValueError, match=r"jac: `jac_outputs`.*\[4, 3\]"):
        tj.jac(y, x, randn(4, 3, gen=gen))  # the k dimension is missing
    with pytest.raises(ValueError, match=r"jac: `jac_outputs` must have one Tensor per output"):
        tj.jac(y, x, [randn(2, 4, 3, gen=gen)] * 2)
    with pytest.raises(TypeError, match=r"jac: `jac_outputs`.*str"):
        tj.jac(y, x, "eye")
    with pytest.raises(TypeError, match=r"jac: `jac_outputs\[0\]` must be a Tensor"):
        tj.jac(y, x, [None])
    z = (x**2).sum()
    with pytest.raises(
        ValueError, match=r"jac: `jac_outputs` \[1\] must have shape \[k\].*\[3, 3\]"
    ):
        tj.jac([y, z], x, [randn(2, 4, 3, gen=gen), randn(3, 3, gen=gen)])
    with pytest.raises(
        ValueError,
        match=r"jac: every Tensor of `jac_outputs` must have the same number of rows k .*"
        r"jac_outputs\[0\] has k=2 \(shape \[2, 4, 3\]\) and "
        r"jac_outputs\[1\] has k=3 \(shape \[3\]\)",
    ):
        tj.jac([y, z], x, [randn(2, 4, 3, gen=gen), randn(3, gen=gen)])  # k differs
    _graph_intact(y, x)


def test_mismatched_batch_sizes(problem, gen) -> None:
    y, x = problem
    x2 = randn(5, 3, gen=gen, grad=True)
    with pytest.raises(ValueError, match=r"jac: mismatched batch sizes at `batch_dim=0`.*4.*5"):
        tj.jac([y, x2.sin()], [x, x2], batch_dim=0)
    with pytest.raises(ValueError, match=r"jac: mismatched batch sizes at `batch_dim=-1`"):
        tj.jac(y, x.sum(-1, keepdim=True).requires_grad_(), batch_dim=-1, allow_unused=True)
    _graph_intact(y, x)


@pytest.mark.parametrize("flag", ["retain_graph", "create_graph", "allow_unused"])
def test_flags_must_be_bools(problem, flag: str) -> None:
    y, x = problem
    with pytest.raises(TypeError, match=rf"jac: `{flag}`"):
        tj.jac(y, x, **{flag: "no"})


# --- nothing the user owns is changed -------------------------------------------------------


@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
def test_nothing_the_user_owns_is_mutated(mode: str, batch_dim: int | None, gen) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    frozen = randn(5, 3, gen=gen)  # a tensor that does not require grad
    x = randn(5, 3, gen=gen, grad=True)
    h = x * 1.5  # a non-leaf input
    y = model(h + frozen)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = [t.requires_grad for t in (x, h, frozen, *params.values())]
    rng = torch.get_rng_state()
    inputs = [h, x] if batch_dim is not None else [h, x, *params.values()]

    tj.jac(y, inputs, mode=mode, batch_dim=batch_dim, retain_graph=True)

    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.is_grad_enabled()
    assert [t.requires_grad for t in (x, h, frozen, *params.values())] == flags
    assert all(t.grad is None for t in (x, *params.values()))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


def test_grad_mode_is_kept_under_no_grad(problem) -> None:
    y, x = problem
    with torch.no_grad():
        got = tj.jac(y, x, batch_dim=0)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(got, torch.diag_embed(2 * (1 - torch.tanh(x.detach()) ** 2)))
