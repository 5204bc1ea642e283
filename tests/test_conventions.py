"""Conventions every front door keeps (DESIGN.md): dtype and device follow the inputs, no global
state changes (even when a call raises), and bad arguments fail early with a message naming the
public function and the argument.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from graph_cases import ItemSin
from torch import Tensor, nn

import torchjac as tj

FUNCTIONAL = ("jacobian", "hessian", "hessian_diagonal", "laplacian")
ALL = ("jac", "gramian", *FUNCTIONAL, "param_jacobian", "ntk")


class _Net(nn.Module):
    """Linear -> BatchNorm -> tanh -> Linear, counting its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.lin2 = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin2(torch.tanh(self.bn(self.lin1(x))))


def _net(dtype: torch.dtype = torch.float64, train: bool = False) -> _Net:
    torch.manual_seed(3)
    net = _Net().to(dtype)
    with torch.no_grad():  # non-trivial running statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.train(train)


def _poly(x: Tensor) -> Tensor:
    return (x**3).sum(-1, keepdim=True) * x.sin()


def _call(name: str, dtype: torch.dtype, batch: int = 3, **options: Any) -> Any:
    """One small valid call of public function ``name`` on inputs of ``dtype``."""
    x = torch.linspace(-1.0, 1.0, batch * 3, dtype=dtype).reshape(batch, 3)
    if name in ("jac", "gramian"):
        xr = x.clone().requires_grad_(True)
        return getattr(tj, name)(_poly(xr), xr, **options)
    if name in FUNCTIONAL:
        return getattr(tj, name)(_poly, x, **options)
    return getattr(tj, name)(_net(dtype), x, **options)


# ---------------------------------------------------------------------------------------------
# dtype and device


def _tensors(result: Any) -> list[Tensor]:
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in _tensors(v)]
    return [t for v in result for t in _tensors(v)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch_dim", [None, 0], ids=["full", "batch"])
@pytest.mark.parametrize("name", ALL)
def test_dtype_and_device_follow_inputs(name: str, dtype: torch.dtype, batch_dim: Any) -> None:
    options = {"batch_dim": batch_dim} if batch_dim is not None or name != "ntk" else {}
    result = _call(name, dtype, **options)
    tensors = _tensors(result)
    assert tensors
    for t in tensors:
        assert t.dtype == dtype, (name, t.dtype)
        assert t.device == torch.device("cpu")
        assert not t.requires_grad  # create_graph=False: a plain result


# ---------------------------------------------------------------------------------------------
# No global state changes


def _module_state(model: nn.Module) -> dict[str, Any]:
    return {
        "training": [m.training for m in model.modules()],
        "params": [
            (n, p, type(p), p.requires_grad, p.detach().clone())
            for n, p in model.named_parameters()
        ],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
        "hooks": [
            len(m._forward_hooks)
            + len(m._forward_pre_hooks)
            + len(m._backward_hooks)
            + len(m._backward_pre_hooks)
            + len(m._state_dict_hooks)
            for m in model.modules()
        ],
    }


def _assert_same(before: Any, after: Any) -> None:
    if isinstance(before, Tensor):
        assert isinstance(after, Tensor)
        assert before.dtype == after.dtype and before.shape == after.shape
        assert torch.equal(before, after)
    elif isinstance(before, dict):
        assert before.keys() == after.keys()
        for k in before:
            _assert_same(before[k], after[k])
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after)
        for a, b in zip(before, after):
            _assert_same(a, b)
    elif isinstance(before, nn.Parameter | type):
        assert before is after
    else:
        assert before == after


@contextmanager
def _unchanged(tensors: tuple[Tensor, ...] = (), model: nn.Module | None = None) -> Iterator[None]:
    """Global grad mode, RNG state, the tensors' values / flags / .grad, the module's state."""
    grad_mode = torch.is_grad_enabled()
    rng = torch.random.get_rng_state()
    flags = [(t.requires_grad, t.is_leaf, t.grad, t.detach().clone()) for t in tensors]
    state = None if model is None else _module_state(model)
    try:
        yield
    finally:
        assert torch.is_grad_enabled() == grad_mode, "grad mode changed"
        assert torch.equal(torch.random.get_rng_state(), rng), "global RNG state changed"
        for t, (rg, leaf, grad, val) in zip(tensors, flags):
            assert t.requires_grad == rg and t.is_leaf == leaf, "requires_grad changed"
            assert t.grad is grad, ".grad of an input changed"
            assert torch.equal(t.detach(), val), "an input was mutated"
        if model is not None:
            _assert_same(state, _module_state(model))


def _graph_case(name: str, batch: int, coupled: bool) -> tuple[Callable[[], Any], tuple[Tensor]]:
    x = torch.linspace(-1.0, 1.0, batch * 3, dtype=torch.float64).reshape(batch, 3)
    x.requires_grad_(True)
    with torch.enable_grad():
        y = _poly(x - x.mean(0) if coupled else x)
    return (lambda: getattr(tj, name)(y, x, batch_dim=0)), (x,)


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("batch", [3, 12])  # 12 > 8: the coupling check samples pairs
@pytest.mark.parametrize("name", ["jac", "gramian"])
def test_graph_calls_keep_state(name: str, batch: int, grad_enabled: bool) -> None:
    call, tensors = _graph_case(name, batch, coupled=False)
    with torch.set_grad_enabled(grad_enabled), _unchanged(tensors):
        call()
    call, tensors = _graph_case(name, batch, coupled=True)
    with (
        torch.set_grad_enabled(grad_enabled),
        _unchanged(tensors),
        pytest.raises(tj.BatchCouplingError, match=name),
    ):
        call()


def _coupled(x: Tensor) -> Tensor:
    return (x - x.mean(0)).sin()


def _raising(x: Tensor) -> Tensor:
    raise RuntimeError("user code failed")


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("batch", [3, 12])
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_functional_calls_keep_state(name: str, batch: int, grad_enabled: bool) -> None:
    fn = getattr(tj, name)
    x = torch.linspace(-1.0, 1.0, batch * 3, dtype=torch.float64).reshape(batch, 3)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)  # closed over, needs grad
    with torch.set_grad_enabled(grad_enabled), _unchanged((x, w)):
        fn(lambda x: _poly(x * w), x, batch_dim=0)
        fn(lambda x: _poly(x * w), x)
    with (
        torch.set_grad_enabled(grad_enabled),
        _unchanged((x, w)),
        pytest.raises(tj.BatchCouplingError, match=name),
    ):
        fn(_coupled, x, batch_dim=0)
    with (
        torch.set_grad_enabled(grad_enabled),
        _unchanged((x, w)),
        pytest.raises(RuntimeError, match="user code failed"),
    ):
        fn(_raising, x)
    assert w.grad is None


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("batch", [3, 12])
@pytest.mark.parametrize("name", ["param_jacobian", "ntk"])
def test_module_calls_keep_state(name: str, batch: int, grad_enabled: bool) -> None:
    fn = getattr(tj, name)
    x = torch.linspace(-1.0, 1.0, batch * 3, dtype=torch.float64).reshape(batch, 3)
    net = _net()
    for p in net.parameters():  # existing .grad must stay as it is
        p.grad = torch.full_like(p, 0.25)
    net.lin1.bias.grad = None
    with torch.set_grad_enabled(grad_enabled), _unchanged((x,), net):
        fn(net, x, batch_dim=0)
        if name == "param_jacobian":
            fn(net, x)
    net.train()  # BatchNorm in train mode couples the samples
    with (
        torch.set_grad_enabled(grad_enabled),
        _unchanged((x,), net),
        pytest.raises(tj.BatchCouplingError, match=name),
    ):
        fn(net, x, batch_dim=0)


class _Fails(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("forward failed")


@pytest.mark.parametrize("name", ["param_jacobian", "ntk"])
def test_module_call_that_raises_keeps_state(name: str) -> None:
    net = _Fails()
    x = torch.ones(2, 3, dtype=torch.float64)
    with _unchanged((x,), net), pytest.raises(RuntimeError, match="forward failed"):
        getattr(tj, name)(net, x, batch_dim=0)


@pytest.mark.parametrize("name", ["param_jacobian", "ntk"])
def test_module_dropout_keeps_rng_and_training(name: str) -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().train()
    x = torch.ones(2, 3, dtype=torch.float64)
    with _unchanged((x,), net):
        getattr(tj, name)(net, x, batch_dim=0)


# ---------------------------------------------------------------------------------------------
# Bad arguments: TypeError / ValueError naming the function and the argument, before any work


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


# ---------------------------------------------------------------------------------------------
# batch_dim coupling: output sample 0 reads input sample 1 (one direction only)


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


# ---------------------------------------------------------------------------------------------
# Fallbacks: one FallbackWarning per call, naming the function; results still exact


class _NewExp(torch.autograd.Function):
    """exp with a backward but neither a jvp nor a vmap rule."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x.exp()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * x.exp()


class _OldExp(torch.autograd.Function):
    """exp in the classic style (``forward(ctx, x)``, no ``setup_context``): torch.func refuses it,
    nested ``torch.autograd.grad`` differentiates it twice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.exp()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return g * x.exp()


def _exp_oracle(name: str, x: Tensor) -> Tensor:
    def f(x: Tensor) -> Tensor:
        return x.exp().sum(-1) * x[..., 0]

    h = torch.func.vmap(torch.func.hessian(f))(x)
    return {
        "jacobian": torch.func.vmap(torch.func.jacrev(f))(x),
        "hessian": h,
        "hessian_diagonal": h.diagonal(dim1=-2, dim2=-1),
        "laplacian": h.diagonal(dim1=-2, dim2=-1).sum(-1),
    }[name]


def _run_custom(fn: type[torch.autograd.Function], name: str, mode: str) -> None:
    x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)

    def f(x: Tensor) -> Tensor:
        return fn.apply(x).sum(-1) * x[..., 0]

    with _unchanged((x,)):
        got = getattr(tj, name)(f, x, batch_dim=0, mode=mode)
    torch.testing.assert_close(got, _exp_oracle(name, x))


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_fallback_warns_at_most_once(name: str, mode: str) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _run_custom(_NewExp, name, mode)
    assert all(issubclass(w.category, tj.FallbackWarning) for w in record), record
    # reverse rows of `jacobian` need neither forward AD nor vmap over the function
    assert len(record) == (0 if (name, mode) == ("jacobian", "rev") else 1), record
    for w in record:
        assert re.match(rf"{name}\b", str(w.message)), str(w.message)


@pytest.mark.parametrize("mode", ["auto", "rev", "fwd"])
@pytest.mark.parametrize("name", FUNCTIONAL)
def test_classic_autograd_function_is_differentiated(name: str, mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tj.FallbackWarning)  # a fallback is allowed here
        _run_custom(_OldExp, name, mode)


# ---------------------------------------------------------------------------------------------
# Inference mode: a grad-mode setting like no_grad; torch.func accepts inference tensors


def _inference_call(name: str) -> Any:
    x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
    if name in ("jac", "gramian"):
        xr = x.clone().requires_grad_(True)
        y = _poly(xr)
        with torch.inference_mode():
            return getattr(tj, name)(y, xr, batch_dim=0)
    with torch.inference_mode():
        if name in FUNCTIONAL:
            return getattr(tj, name)(_poly, x, batch_dim=0)
        return getattr(tj, name)(_net(), x, batch_dim=0)


_NTK_INFERENCE = (
    "BUG: ntk under torch.inference_mode() raises RuntimeError ('element 0 of tensors does not "
    "require grad') although it works under no_grad and param_jacobian works in inference mode"
)


@pytest.mark.parametrize("name", ALL)
def test_works_under_inference_mode(name: str) -> None:
    got = _inference_call(name)
    with torch.no_grad():
        if name in ("jac", "gramian"):
            x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3).requires_grad_()
            with torch.enable_grad():
                y = _poly(x)
            want = getattr(tj, name)(y, x, batch_dim=0)
        elif name in FUNCTIONAL:
            want = getattr(tj, name)(
                _poly, torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3), batch_dim=0
            )
        else:
            x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
            want = getattr(tj, name)(_net(), x, batch_dim=0)
    for a, b in zip(_tensors(got), _tensors(want)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("name", "mode"),
    [pytest.param(n, m, id=f"{n}-{m}") for n in FUNCTIONAL for m in ("auto", "rev", "fwd")],
)
def test_inference_tensor_inputs(name: str, mode: str) -> None:
    with torch.inference_mode():
        x = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
    got = getattr(tj, name)(torch.sin, x, batch_dim=0, mode=mode)
    s, c = x.clone().sin(), x.clone().cos()
    eye = torch.eye(3, dtype=x.dtype)
    want = {
        "jacobian": c[:, :, None] * eye,
        "hessian": -s[:, :, None, None] * eye[:, :, None] * eye[:, None, :],
        "hessian_diagonal": -s[:, :, None] * eye,
        "laplacian": -s,
    }[name]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("params", [None, ["lin1.weight"]])
def test_full_jacobian_of_a_training_model_keeps_buffers_and_flags(params: Any) -> None:
    """Without batch_dim a BatchNorm in train mode is fine, but its running stats stay put."""
    net = _net(train=True)
    net.lin1.requires_grad_(False)
    x = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(4, 3)
    with _unchanged((x,), net):
        got = tj.param_jacobian(net, x, params=params)
    names = ["lin1.weight"] if params else [n for n, p in net.named_parameters() if p.requires_grad]
    assert list(got) == names


# ---------------------------------------------------------------------------------------------
# Results are exact: functions using torch.func inside, and linear-algebra ops

_W = torch.tensor([[0.3, -0.2, 0.5], [0.1, 0.4, -0.6], [-0.7, 0.2, 0.9]], dtype=torch.float64)
_X = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)


def _single(s: Tensor) -> Tensor:
    return torch.tanh(s @ _W) * s[0]


def _energy(s: Tensor) -> Tensor:
    return (torch.tanh(s @ _W) ** 2).sum()


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        pytest.param(
            n,
            m,
            id=f"{n}-{m}",
        )
        for n in FUNCTIONAL
        for m in ("auto", "rev", "fwd")
    ],
)
def test_user_function_vmapped_by_the_user(name: str, mode: str) -> None:
    h = torch.func.vmap(torch.func.hessian(_single))(_X)
    want = {
        "jacobian": torch.func.vmap(torch.func.jacrev(_single))(_X),
        "hessian": h,
        "hessian_diagonal": h.diagonal(dim1=-2, dim2=-1),
        "laplacian": h.diagonal(dim1=-2, dim2=-1).sum(-1),
    }[name]
    with warnings.catch_warnings():  # the Taylor mode cannot see through vmap: nested AD, warned
        warnings.simplefilter("ignore", tj.FallbackWarning)
        got = getattr(tj, name)(torch.func.vmap(_single), _X, batch_dim=0, mode=mode)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "mode",
    [pytest.param(m) for m in ("auto", "rev", "fwd")],
)
def test_jacobian_of_a_torch_func_gradient(mode: str) -> None:
    want = torch.func.jacrev(torch.func.grad(_energy))(_X[0])
    with warnings.catch_warnings():  # the Taylor mode cannot see through grad: nested AD, warned
        warnings.simplefilter("ignore", tj.FallbackWarning)
        got = tj.jacobian(torch.func.grad(_energy), _X[0], mode=mode)
    torch.testing.assert_close(got, want)


_LINALG = {
    "det": lambda s: torch.linalg.det(s.reshape(2, 2)),
    "logdet": lambda s: torch.logdet(
        s.reshape(2, 2) @ s.reshape(2, 2).T + torch.eye(2, dtype=s.dtype)
    ),
    "solve": lambda s: torch.linalg.solve(s.reshape(2, 2), torch.ones(2, dtype=s.dtype)).sum(),
    "inv": lambda s: torch.linalg.inv(s.reshape(2, 2)).sum(),
    "cholesky": lambda s: torch.linalg.cholesky(
        s.reshape(2, 2) @ s.reshape(2, 2).T + torch.eye(2, dtype=s.dtype)
    ).sum(),
}


@pytest.mark.parametrize(
    ("op", "name", "mode"),
    [
        pytest.param(op, n, m, id=f"{op}-{n}-{m}")
        for op in _LINALG
        for n in ("hessian", "hessian_diagonal", "laplacian")
        for m in ("auto", "rev", "fwd")
    ],
)
def test_second_order_through_linalg(op: str, name: str, mode: str) -> None:
    s = torch.tensor([0.5, -1.0, 2.0, 0.7], dtype=torch.float64)
    f = _LINALG[op]
    h = torch.autograd.functional.hessian(f, s)  # reverse over reverse, no torchjac
    want = {"hessian": h, "hessian_diagonal": h.diagonal(), "laplacian": h.diagonal().sum()}[name]
    taylor = name != "hessian"  # a full Hessian of 4 inputs is planned as nested AD here
    if (
        op in ("det", "logdet", "solve") and mode == "auto" and taylor
    ):  # NOTE [unreliable nested forward]
        with pytest.warns(tj.FallbackWarning, match="unreliable"):
            got = getattr(tj, name)(f, s, mode=mode)
    else:
        got = getattr(tj, name)(f, s, mode=mode)
    torch.testing.assert_close(got, want)


class _Breaks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.a = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(ItemSin.apply(x * self.a))


@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("name", ["jac", "gramian", "param_jacobian", "ntk"])
def test_graph_and_module_fallbacks_warn_at_most_once(name: str, batch_dim: Any) -> None:
    x = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).reshape(4, 3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if name in ("jac", "gramian"):
            xr = x.clone().requires_grad_(True)
            got = getattr(tj, name)(ItemSin.apply(xr), xr, batch_dim=batch_dim, mode="rev")
            j = torch.diag_embed(x.cos()) if batch_dim == 0 else torch.diag(x.cos().flatten())
            j = j if batch_dim == 0 else j.reshape(4, 3, 4, 3)
            want = j if name == "jac" else (j * j if batch_dim == 0 else j.pow(2))
            torch.testing.assert_close(got, want)
        elif name == "param_jacobian":
            got = tj.param_jacobian(_Breaks().double(), x, batch_dim=batch_dim)
            assert list(got) == ["a", "lin.weight", "lin.bias"]
        else:
            tj.ntk(_Breaks().double(), x, batch_dim=0 if batch_dim is None else batch_dim)
    assert len(record) <= 1, [str(w.message) for w in record]
    for w in record:
        assert issubclass(w.category, tj.FallbackWarning)
        assert re.match(rf"{name}\b", str(w.message)), str(w.message)
