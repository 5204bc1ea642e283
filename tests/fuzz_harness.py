"""Running one fuzz example: the fast-path switch, two checked calls, the comparison to an oracle.

Profiles (``TORCHJAC_FUZZ_PROFILE``): ``ci`` (default; derandomized, so every run draws the same
examples, within a minute on two cores with ``-n 2``) and ``long`` (``make fuzz``: random seeds,
``TORCHJAC_FUZZ_EXAMPLES`` examples per test, default 400; a failure prints the blob to
reproduce it with ``@reproduce_failure``).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import torch
from fuzz_invariants import Snapshot, same_bits, tensors_of
from fuzz_oracles import quiet
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import torchjac as tj
from torchjac._engine.core.fast import fast_paths

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "fuzz-ci",
    max_examples=30,
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=_HEALTH,
)
settings.register_profile(
    "fuzz-long",
    max_examples=int(os.environ.get("TORCHJAC_FUZZ_EXAMPLES") or 400),
    deadline=None,
    print_blob=True,
    suppress_health_check=_HEALTH,
)
FUZZ = settings.get_profile("fuzz-" + os.environ.get("TORCHJAC_FUZZ_PROFILE", "ci"))

# fast paths on, or all off (by the environment variable or the context manager: drawn)
FAST = ("on", "off")


@contextmanager
def fast_switch(fast: str) -> Iterator[None]:
    """Every fast path on (``"on"``, whatever the environment says), or all off by
    ``TORCHJAC_FAST_PATHS=0`` (``"off-env"``) or by ``fast_paths(False)`` (``"off-ctx"``)."""
    old = os.environ.get("TORCHJAC_FAST_PATHS")
    with ExitStack() as stack:
        if fast != "off-env":
            stack.enter_context(fast_paths(fast == "on"))
        else:
            os.environ["TORCHJAC_FAST_PATHS"] = "0"
        try:
            yield
        finally:
            if old is None:
                os.environ.pop("TORCHJAC_FAST_PATHS", None)
            else:
                os.environ["TORCHJAC_FAST_PATHS"] = old


def draw_fast(data: st.DataObject, fast: str) -> str:
    """``"on"``, or how the fast paths are turned off (both ways are drawn)."""
    if fast == "on":
        return fast
    return data.draw(st.sampled_from(["off-env", "off-ctx"]), label="fast paths off by")


Made = tuple[Callable[[], Any], nn.Module | None, dict[str, Tensor]]


def checked_calls(
    make: Callable[[], Made],
    grad_enabled: bool,
    fast: str,
    error: tuple[type, str] | None = None,
    may_refuse: tuple[type, str] | None = None,
    warns: str | None = None,
) -> Any:
    """Two calls, each made by ``make`` (the call, the model, the user's other tensors), under
    the grad mode ``grad_enabled`` and the fast-path setting. After each: nothing recorded has
    changed and the result aliases none of it; the two results are bitwise equal. With
    ``error``, each call must raise it (type, ``match``) and still change nothing; with
    ``may_refuse``, a call may raise it (a documented refusal; ``REFUSED`` is returned then).
    With ``warns``, a call that returns must warn (a ``UserWarning`` matching it)."""
    results = []
    for _ in range(2):
        call, model, owned = make()
        with torch.set_grad_enabled(grad_enabled), fast_switch(fast), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=tj.FallbackWarning)
            # torch's own note that vmap runs an op without a batching rule (mish_backward): a
            # warning in use, not an error; raised, it would stop a pass that has begun freeing
            warnings.filterwarnings("ignore", message="There is a performance drop")
            snap = Snapshot.take(model, owned)
            warned = pytest.warns(UserWarning, match=warns) if warns else contextlib.nullcontext()
            res: Any = REFUSED
            if error is not None:
                with pytest.raises(error[0], match=error[1]):
                    call()
            elif may_refuse is None:
                with warned:
                    res = call()
            else:
                try:
                    with warned:
                        res = call()
                except may_refuse[0] as e:
                    if not re.search(may_refuse[1], str(e)):
                        raise
            changes = snap.changes()
            aliases = [] if res is REFUSED else snap.aliases(res)
        # one assertion per kind of defect, each on its own line (hypothesis reports each)
        user = [c for c in changes if c.startswith(("param ", "tensor "))]
        assert not user, "the call changed the user's tensors:\n" + "\n".join(user)
        buffers = [c for c in changes if c.startswith("buffer ")]
        assert not buffers, "the call changed buffers:\n" + "\n".join(buffers)
        modules = [c for c in changes if c.startswith(("module ", "the model"))]
        assert not modules, "the call changed modules:\n" + "\n".join(modules)
        assert "global RNG state changed" not in changes, "the call changed the RNG state"
        assert len(user) + len(buffers) + len(modules) == len(changes), "\n".join(changes)
        assert not aliases, "the result aliases the user's tensors:\n" + "\n".join(aliases)
        results.append(res)
    if results[0] is not REFUSED or results[1] is not REFUSED:
        assert_identical(results[0], results[1])
    return results[0]


REFUSED = object()


def _structure(r: Any) -> Any:
    if isinstance(r, Tensor):
        return ("tensor", tuple(r.shape), r.dtype, r.requires_grad)
    if isinstance(r, dict):
        return ("dict", [(k, _structure(v)) for k, v in r.items()])
    if isinstance(r, tuple):
        return ("tuple", [_structure(v) for v in r])
    return (type(r).__name__,)


def assert_identical(a: Any, b: Any) -> None:
    """Two consecutive calls: the same containers, shapes, dtypes and bits."""
    assert _structure(a) == _structure(b), "two calls gave different structures"
    for i, (s, t) in enumerate(zip(tensors_of(a), tensors_of(b))):
        assert same_bits(s, t), f"two calls gave different values (result tensor {i})"


def assert_matches(got: Any, want: Any, dtype: torch.dtype, what: str = "result") -> None:
    """``got`` (dtype ``dtype``) equals the float64 oracle ``want``, same containers."""
    if what == "result":
        assert _structure(got) == _structure_of_want(want, dtype, got), (
            f"result layout {_structure(got)} != oracle {_structure_of_want(want, dtype, got)}"
        )
    rtol, atol = (1e-8, 1e-9) if dtype == torch.float64 else (2e-3, 2e-4)
    for g, w in zip(tensors_of(got), tensors_of(want)):
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        torch.testing.assert_close(
            g.detach().to(torch.float64),
            w,
            rtol=rtol,
            atol=atol * scale,
            msg=lambda m: f"{what}: {m}",
        )


def assert_differentiable(
    got: Any,
    want_of: Callable[[dict[str, Tensor]], Any],
    leaves: dict[str, Tensor],
    dtype: torch.dtype,
) -> None:
    """``create_graph=True``: the derivative of ``<R, got>`` (``R`` fixed random) with respect to
    the user's ``leaves`` (parameters, inputs) equals ``torch.func.grad`` of the oracle's
    ``<R, want_of(leaves)>`` (``want_of`` takes float64 values of the leaves by name)."""
    if not leaves:
        return
    gots = tensors_of(got)
    g = torch.Generator().manual_seed(0)
    rs = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in gots]
    terms = [(t.to(torch.float64) * r).sum() for t, r in zip(gots, rs) if t.requires_grad]
    if terms:
        lib = torch.autograd.grad(sum(terms), list(leaves.values()), allow_unused=True)
    else:
        lib = (None,) * len(leaves)

    def scalar(values: dict[str, Tensor]) -> Tensor:
        return sum((w * r).sum() for w, r in zip(tensors_of(want_of(values)), rs))

    with quiet():
        ref = torch.func.grad(scalar)({k: v.detach().to(torch.float64) for k, v in leaves.items()})
    depends = [k for k, r in ref.items() if bool(r.ne(0).any())]
    detached = not any(t.grad_fn is not None for t in gots)
    assert not (depends and detached), (
        f"create_graph=True: the result has no graph, but depends on {depends}"
    )
    for (name, r), got_g in zip(ref.items(), lib):
        got_g = torch.zeros_like(r) if got_g is None else got_g.to(torch.float64)
        assert_matches(got_g, r, dtype, f"d<R, result>/d{name} (create_graph=True)")


def _structure_of_want(want: Any, dtype: torch.dtype, got: Any) -> Any:
    if isinstance(want, Tensor):
        rg = got.requires_grad if isinstance(got, Tensor) else False
        return ("tensor", tuple(want.shape), dtype, rg)
    if isinstance(want, dict):
        gd = got if isinstance(got, dict) else {}
        return ("dict", [(k, _structure_of_want(v, dtype, gd.get(k))) for k, v in want.items()])
    gt = got if isinstance(got, tuple) else ()
    return (
        "tuple",
        [_structure_of_want(v, dtype, gt[i] if i < len(gt) else None) for i, v in enumerate(want)],
    )
