"""The two named exceptions of torchjac; everything else uses built-in types."""

from __future__ import annotations

import warnings

__all__ = ["BatchCouplingError", "FallbackWarning", "warn_fallback"]


class BatchCouplingError(ValueError):
    """``batch_dim`` declared samples independent, but an output sample depends on another one.

    Typical causes: BatchNorm in train mode, ``x - x.mean(0)``, attention across the batch.
    """


class FallbackWarning(UserWarning):
    """A slower, still exact path was taken (vmap -> loop, forward AD -> reverse); once a call."""


def warn_fallback(fn_name: str, what: str, why: BaseException | str) -> None:
    """Issue the one :class:`FallbackWarning` of a call, naming the path taken and its cause."""
    cause = why if isinstance(why, str) else f"{type(why).__name__}: {str(why).splitlines()[0]}"
    warnings.warn(f"{fn_name}: {what} ({cause})", FallbackWarning, stacklevel=4)
