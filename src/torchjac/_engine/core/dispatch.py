"""The base of the engine's ``TorchDispatchMode``s.

NOTE [dispatch modes without dynamo]: recent torch wraps the ``__torch_dispatch__`` of every
``TorchDispatchMode`` subclass so that ``torch.compile`` never traces into it. The wrapper imports
``torch._dynamo`` on the first op it sees (1.2 s of a first ``sparsity_pattern`` call of 1.3 s,
measured in a fresh process; ``import torch`` does not load it) and costs about 2 µs per op
afterwards (15 against 13 µs per op of a mode that only forwards the op). The engine's modes
(the sparsity tracer, the oneDNN products of NOTE [dense kernels]) run inside its own eager calls
and forward or replace aten ops; they opt out through ``_should_skip_dynamo``, the switch torch
gives mode authors, and behave as they do on the torch versions that have no wrapper.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["EagerDispatchMode"]


class EagerDispatchMode(TorchDispatchMode):
    """A ``TorchDispatchMode`` whose ``__torch_dispatch__`` torch leaves unwrapped (NOTE
    [dispatch modes without dynamo])."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False
