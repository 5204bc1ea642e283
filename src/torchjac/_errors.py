"""The two named exceptions of torchjac; everything else uses built-in types."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["BatchCouplingError", "FallbackWarning", "fallback_scope", "warn_fallback"]


class BatchCouplingError(ValueError):
    """``batch_dim`` declared samples independent, but an output sample depends on another one.

    Typical causes: BatchNorm in train mode, ``x - x.mean(0)``, attention across the batch.
    """


class FallbackWarning(UserWarning):
    """A slower, still exact path was taken (vmap -> loop, forward AD -> reverse); once a call."""


# The fallbacks already warned about in the current public call; None outside any call.
_WARNED: ContextVar[list[str] | None] = ContextVar("torchjac_fallbacks", default=None)


@contextmanager
def fallback_scope() -> Iterator[None]:
    """One public call: at most one ``FallbackWarning`` is issued inside it (the first).

    Nested scopes (a front door calling another) share the outermost one.
    """
    if _WARNED.get() is not None:
        yield
        return
    token = _WARNED.set([])
    try:
        yield
    finally:
        _WARNED.reset(token)


def warn_fallback(fn_name: str, what: str, why: BaseException | str) -> None:
    """Issue the one :class:`FallbackWarning` of a call, naming the path taken and its cause."""
    cause = why if isinstance(why, str) else f"{type(why).__name__}: {str(why).splitlines()[0]}"
    message = f"{fn_name}: {what} ({cause})"
    warned = _WARNED.get()
    if warned is not None:
        warned.append(message)
        if len(warned) > 1:
            return
    warnings.warn(message, FallbackWarning, stacklevel=4)
