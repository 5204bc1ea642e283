"""Running probes chunk by chunk: vectorised passes, with an exact loop as the fallback.

NOTE [fallback]: a vectorised pass can fail where a plain loop works (a missing batching rule,
``.item()`` or data-dependent control flow in a backward). The failing chunk and every later one
run as a loop, and one ``FallbackWarning`` names the cause. If the loop fails as well, the error
is the user's and is raised as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torchjac._errors import BatchCouplingError, warn_fallback

__all__ = ["FinalError", "run_chunks"]

R = TypeVar("R")


class FinalError(RuntimeError):
    """A probe failure that is not the vectorisation's (a loop would fail the same way): it is
    raised as it is, never retried as a loop (NOTE [fallback])."""


def run_chunks(
    fn_name: str,
    n_probes: int,
    chunk_size: int,
    probe: Callable[[int, int, bool], R],
    write: Callable[[int, int, R], None],
) -> None:
    """Run ``probe(start, stop, vectorised)`` over ``[0, n_probes)`` and ``write`` each result.

    ``chunk_size == 1`` is a plain loop with no vmap. See NOTE [fallback].
    """
    looping = chunk_size <= 1
    start = 0
    while start < n_probes:
        stop = min(n_probes, start + max(chunk_size, 1))
        if not looping:
            try:
                result = probe(start, stop, True)
            except (BatchCouplingError, FinalError):  # a loop would fail the same way
                raise
            except Exception as err:  # retried below; re-raised there if the loop fails too
                first = probe(start, start + 1, False)
                warn_fallback(
                    fn_name, "vectorised probing failed, computed with a loop instead", err
                )
                looping = True
                write(start, start + 1, first)
                start += 1
                continue
            write(start, stop, result)
            start = stop
            continue
        for i in range(start, stop):
            write(i, i + 1, probe(i, i + 1, False))
        start = stop
