"""What a rank checks before it computes its part alone.

NOTE [split samples]: a rank computes its samples alone, which equals the whole batch's result
only when (a) the function draws no random numbers (a shard cannot repeat the batch's draw) and
(b) no output sample depends on another sample. The door's own check sees couplings inside a
rank's samples; ``check_samples`` adds one backward pass on the whole batch with a random
cotangent on the rank's samples, whose gradient must vanish at every other sample, and the same
evaluation checks that the RNG state did not move. Together they see every coupling the
single-process check sees, through the floating inputs. (c) The derivative of an embedding
lookup with ``scale_grad_by_freq=True`` divides by index counts over the whole call (NOTE
[per-sample index counts]), which a rank's samples alone do not have: the same evaluation
records whether one runs (``check_samples`` returns it, ``scaled_lookups`` asks without a
graph), and a rank that meets one computes the whole result and keeps its part (every rank
does the whole work, as without ``process_group``, and gets its result).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from torchjac._checks import check_batch_dim
from torchjac._engine.core.func_state import call_state
from torchjac._engine.modules.sample_counts import LookupCounts
from torchjac._errors import BatchCouplingError, coupling_fix

__all__ = ["check_samples", "evaluate", "scaled_lookups"]


def _draws(fn: str) -> ValueError:
    return ValueError(
        f"{fn}: with `process_group` each rank evaluates only its part, so a function that draws "
        "random numbers (dropout in train mode) cannot repeat the draw of one call; call "
        "model.eval() (or draw outside the function), or pass process_group=None."
    )


def evaluate(fn: str, target: Any, call: Callable[[], Any], tensors: tuple[Tensor, ...]) -> Any:
    """``call()`` once, no graph, RNG and buffers left as found; refuses a function that draws."""
    with call_state(target, tensors), torch.inference_mode(False), torch.no_grad():
        before = torch.get_rng_state()
        out = call()
        if not torch.equal(before, torch.get_rng_state()):
            raise _draws(fn)
    return out


def scaled_lookups(
    fn: str, target: Any, call: Callable[[list[Tensor]], Any], named: Sequence[tuple[str, Tensor]]
) -> bool:
    """Whether ``call`` on the whole batch ``named`` runs a lookup with ``scale_grad_by_freq``
    (NOTE [split samples]): one evaluation, no graph."""
    seen = LookupCounts()
    with seen:
        evaluate(fn, target, lambda: call([x for _, x in named]), tuple(x for _, x in named))
    return bool(seen.counts)


def check_samples(
    fn: str,
    target: Any,
    call: Callable[[list[Tensor]], Any],
    named: Sequence[tuple[str, Tensor]],
    batch_dim: int,
    start: int,
    stop: int,
) -> bool:
    """NOTE [split samples] for samples ``[start, stop)`` of the batched inputs ``named``;
    returns whether a lookup with ``scale_grad_by_freq`` ran (then the part is not enough)."""
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for _, x in named]
    seen = LookupCounts()
    with call_state(target, tuple(x for _, x in named)), torch.inference_mode(False):
        with torch.enable_grad():
            before = torch.get_rng_state()
            with seen:
                out = call(xs)
            if not torch.equal(before, torch.get_rng_state()):
                raise _draws(fn)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))]
        outs = [o for o in outs if isinstance(o, Tensor) and o.requires_grad]
        check_batch_dim(fn, batch_dim, [*named, *((f"output {i}", o) for i, o in enumerate(outs))])
        wrt = [x for x in xs if x.requires_grad]
        if not outs or not wrt:
            return bool(seen.counts)
        gen = torch.Generator().manual_seed(11)
        cots = []
        for o in outs:
            mask = torch.zeros(o.shape[batch_dim], dtype=o.dtype, device=o.device)
            mask[start:stop] = 1
            view = [1] * o.dim()
            view[batch_dim] = -1
            cot = torch.randn(o.shape, generator=gen, dtype=torch.float64)
            cots.append(cot.to(o.dtype).to(o.device) * mask.reshape(view))
        grads = torch.autograd.grad(outs, wrt, cots, allow_unused=True)
    names = [n for (n, x) in named if x.is_floating_point()]
    for name, g in zip(names, grads):
        if g is None:
            continue
        per = g.movedim(batch_dim, 0).reshape(g.shape[batch_dim], -1).abs().amax(1)
        per[start:stop] = 0
        if bool((per.nan_to_num(0.0) > 0).any()):
            where = torch.nonzero(per).flatten()[:5].tolist()
            raise BatchCouplingError(
                f"{fn}: `batch_dim={batch_dim}` declares that output sample i depends only on "
                f"sample i, but the outputs of samples [{start}, {stop}) (this rank's part with "
                f"`process_group`) depend on {name} at samples {where}. Samples are coupled, "
                "e.g. by BatchNorm in train mode (call model.eval()), batch statistics such as "
                f"`x - x.mean(0)`, or attention across the batch. {coupling_fix(fn)}"
            )
    return bool(seen.counts)
