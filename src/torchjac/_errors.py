"""The two named exceptions of torchjac; everything else uses built-in types."""

from __future__ import annotations

import warnings
from contextvars import ContextVar

__all__ = [
    "BatchCouplingError",
    "FallbackWarning",
    "coupling_fix",
    "fallback_scope",
    "warn_fallback",
]


class BatchCouplingError(ValueError):
    """``batch_dim`` declared samples independent, but an output sample depends on another one.

    Typical causes: BatchNorm in train mode, ``x - x.mean(0)``, attention across the batch.
    """


def coupling_fix(fn_name: str) -> str:
    """The last sentence of a ``BatchCouplingError``: what works instead of ``batch_dim``.

    ``ntk`` has no full-Jacobian mode (its ``batch_dim`` cannot be dropped): the kernel of a
    coupled batch is the Gramian of the whole batch's output.
    """
    if fn_name == "ntk":
        return (
            "ntk needs independent samples; the kernel of a coupled batch is the Gramian of its "
            "whole output: tj.gramian(model(x1), list(model.parameters())) gives "
            "[N1, *out, N1, *out]."
        )
    return "Drop `batch_dim` to get the full Jacobian instead."


class FallbackWarning(UserWarning):
    """A slower, still exact path was taken (vmap -> loop, forward AD -> reverse); once a call."""


# The fallbacks already warned about in the current public call; None outside any call.
_WARNED: ContextVar[list[str] | None] = ContextVar("torchjac_fallbacks", default=None)


class fallback_scope:
    """One public call: at most one ``FallbackWarning`` comes out of it (the first), when it
    returns; a call that raises warns nothing, its error says enough.

    Nested scopes (a front door calling another) share the outermost one.
    """

    def __enter__(self) -> None:
        self.token = None if _WARNED.get() is not None else _WARNED.set([])

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if self.token is None:
            return
        warned = _WARNED.get()
        _WARNED.reset(self.token)
        if warned and kind is None:  # only when the call succeeded
            warnings.warn(warned[0], FallbackWarning, stacklevel=3)


def warn_fallback(fn_name: str, what: str, why: BaseException | str) -> None:
    """Issue the one :class:`FallbackWarning` of a call, naming the path taken and its cause."""
    cause = why if isinstance(why, str) else f"{type(why).__name__}: {str(why).splitlines()[0]}"
    message = f"{fn_name}: {what} ({cause})"
    warned = _WARNED.get()
    if warned is not None:  # issued when the call returns, see fallback_scope
        warned.append(message)
        return
    warnings.warn(message, FallbackWarning, stacklevel=4)
