"""One switch for every optional fast path.

NOTE [fast paths]: a fast path shortcuts a general path it must agree with to floating point
(DESIGN: it declines by returning ``None``, never returns or writes a view of a user tensor). The
fast paths are NOTE [taylor chain], NOTE [parameter chain], NOTE [dense kernels] (oneDNN products,
NOTE [fused tanh] and the backward-pass mode), NOTE [convolution input gradient]'s scatter and
NOTE [lattice colouring].
Each asks ``enabled()`` before it answers. They are on unless the environment sets
``TORCHJAC_FAST_PATHS=0`` (read at every call) or the code runs inside ``fast_paths(False)``;
the test registry runs both ways, so every fast path is checked against the path it shortcuts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["enabled", "fast_paths"]

_ENV = "TORCHJAC_FAST_PATHS"
_override: ContextVar[bool | None] = ContextVar("torchjac_fast_paths", default=None)


def enabled() -> bool:
    """Whether the optional fast paths may answer (NOTE [fast paths])."""
    forced = _override.get()
    if forced is not None:
        return forced
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


@contextmanager
def fast_paths(on: bool) -> Iterator[None]:
    """Turn the fast paths on or off within the block, whatever the environment says.

    >>> import torch, torchjac as tj
    >>> from torchjac._engine.core.fast import fast_paths
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> x = torch.randn(4, 2)
    >>> with fast_paths(False):
    ...     slow = tj.laplacian(net, x, batch_dim=0)
    >>> torch.allclose(slow, tj.laplacian(net, x, batch_dim=0))
    True
    """
    if not isinstance(on, bool):
        raise TypeError(f"fast_paths: `on` must be a bool, got {type(on).__name__}.")
    token = _override.set(on)
    try:
        yield
    finally:
        _override.reset(token)
