"""Bad arguments and coupled batches fail early, naming the function and the argument."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conventions_cases import ALL, FUNCTIONAL, _net, _poly
from torch import Tensor, nn

import torchjac as tj


def _valid(name: str) -> tuple[tuple[Any, ...], dict[str, Any], Callable[[], int]]:
    """(args, kwargs, work counter) for a valid call of ``name``."""
    x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
    if name in ("jac", "gramian"):
        xr = x.clone().requires_grad_(True)
        return (_poly(xr), xr), {}, lambda: 0
    if name in FUNCTIONAL:
        counter = [0]

        def f(x: Tensor) -> Tensor:
            counter[0] += 1
            return _poly(x)

        return (f, x), {}, lambda: counter[0]
    net = _net()
    return (net, x), {}, lambda: net.calls


OPTIONS = {
    "mode": ("jac", "gramian", *FUNCTIONAL),
    "chunk_size": ALL,
    "max_memory": ALL,
    "batch_dim": ALL,
    "create_graph": ("jac", "gramian", *FUNCTIONAL),
    "has_aux": FUNCTIONAL,
}


BAD = [
    ("mode", "sideways", ValueError),
    ("mode", None, ValueError),
    ("chunk_size", 0, ValueError),
    ("chunk_size", -2, ValueError),
    ("chunk_size", 1.5, TypeError),
    ("chunk_size", True, TypeError),
    ("max_memory", "lots", ValueError),
    ("max_memory", "12 parsecs", ValueError),
    ("max_memory", -1, ValueError),
    ("max_memory", 0, ValueError),
    ("max_memory", [1], TypeError),
    ("batch_dim", 7, ValueError),
    ("batch_dim", "0", TypeError),
    ("create_graph", "no", TypeError),
    ("has_aux", "yes", TypeError),
]


def _case(name: str, arg: str, value: Any, exc: type[Exception]) -> Any:
    return pytest.param(name, arg, value, exc, id=f"{name}-{arg}={value!r}")


CASES = [_case(name, arg, value, exc) for arg, value, exc in BAD for name in OPTIONS[arg]]


def _names_both(message: str, fn: str, arg: str) -> None:
    assert re.search(rf"\b{fn}\b", message), f"message does not name {fn}: {message}"
    assert re.search(rf"\b{arg}\b", message), f"message does not name {arg}: {message}"


@pytest.mark.parametrize(("name", "arg", "value", "exc"), CASES)
def test_bad_option(name: str, arg: str, value: Any, exc: type[Exception]) -> None:
    args, kwargs, work = _valid(name)
    with pytest.raises(exc) as info:
        getattr(tj, name)(*args, **kwargs, **{arg: value})
    message = str(info.value)
    _names_both(message, name, arg)
    received = (repr(value), str(value), type(value).__name__)
    assert any(r in message for r in received), f"message does not say what was received: {message}"
    if not (name == "param_jacobian" and arg == "batch_dim"):  # needs the output's shape
        assert work() == 0, "work was done before the argument was checked"


def _bad_positional() -> list[Any]:
    x = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    y = x * 2
    net = _net()
    return [
        pytest.param("jac", (3.0, x), "outputs", id="jac-outputs=float"),
        pytest.param("jac", (y, [1.0]), "inputs", id="jac-inputs=[float]"),
        pytest.param("jac", (y, "x"), "inputs", id="jac-inputs=str"),
        pytest.param("jac", (y, x, "v"), "jac_outputs", id="jac-jac_outputs=str"),
        pytest.param("gramian", ([y, 1], x), "outputs", id="gramian-outputs=[T, int]"),
        pytest.param("gramian", (y, 2.0), "inputs", id="gramian-inputs=float"),
        *[
            pytest.param(fn, (_poly, [[1.0, 2.0]]), "inputs", id=f"{fn}-inputs=list")
            for fn in FUNCTIONAL
        ],
        *[pytest.param(fn, ("f", x), "func", id=f"{fn}-func=str") for fn in FUNCTIONAL],
        pytest.param("param_jacobian", (_poly, x), "model", id="param_jacobian-model=fn"),
        pytest.param("ntk", (_poly, x), "model", id="ntk-model=fn"),
        pytest.param("ntk", (net, [[1.0, 2.0, 3.0]]), "x1", id="ntk-x1=list"),
        pytest.param("ntk", (net, x.detach(), 3), "x2", id="ntk-x2=int"),
    ]


@pytest.mark.parametrize(("name", "args", "arg"), _bad_positional())
def test_bad_positional(name: str, args: tuple[Any, ...], arg: str) -> None:
    with pytest.raises(TypeError) as info:
        getattr(tj, name)(*args)
    _names_both(str(info.value), name, arg)


@pytest.mark.parametrize("name", ["param_jacobian", "ntk"])
@pytest.mark.parametrize("params", [["nope.weight"], [nn.Parameter(torch.ones(2))]])
def test_unknown_params(name: str, params: list[Any]) -> None:
    net = _net()
    x = torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError) as info:
        getattr(tj, name)(net, x, params=params, batch_dim=0)
    _names_both(str(info.value), name, "params")
    assert net.calls == 0


def _one_way(x: Tensor) -> Tensor:
    return torch.cat([x[:1] + x[1:2], x[1:]]).sin()


class _OneWay(nn.Module):
    """Output sample 0 reads the layer's activations of sample 1 (so its parameter rows do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin(x)
        return torch.cat([h[:1] * h[1:2], h[1:]])


@pytest.mark.parametrize(
    ("name", "mode"),
    [pytest.param(n, m, id=f"{n}-{m}") for n in FUNCTIONAL for m in ("auto", "rev", "fwd")]
    + [pytest.param(n, "", id=n) for n in ("jac", "gramian", "param_jacobian", "ntk")],
)
def test_one_way_coupling_is_detected(name: str, mode: str) -> None:
    x = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(4, 3)
    fn = getattr(tj, name)
    with pytest.raises(tj.BatchCouplingError, match=rf"\b{name}\b"):
        if name in FUNCTIONAL:
            fn(_one_way, x, batch_dim=0, mode=mode)
        elif name in ("jac", "gramian"):
            xr = x.requires_grad_(True)
            fn(_one_way(xr), xr, batch_dim=0)
        else:
            fn(_OneWay().double(), x, batch_dim=0)
