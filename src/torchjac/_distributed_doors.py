"""How each front door splits its work over a process group (NOTE [split and gather]).

The function doors and ``param_jacobian`` split the samples with ``batch_dim`` and the rows of
the flattened output without (``ntk``'s tiles are in ``_distributed_ntk``). Each rank calls the
door itself (``process_group=None``) on its part.

NOTE [split samples]: a rank computes its samples alone, which equals the whole batch's result
only when (a) the function draws no random numbers (a shard cannot repeat the batch's draw) and
(b) no output sample depends on another sample. The door's own check sees couplings inside a
rank's samples; ``check_samples`` adds one backward pass on the whole batch with a random
cotangent on the rank's samples, whose gradient must vanish at every other sample, and the same
evaluation checks that the RNG state did not move. Together they see every coupling the
single-process check sees, through the floating inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchjac._checks import (
    check_batch_dim,
    check_flag,
    check_func_inputs,
    check_gather,
    check_process_group,
    unflatten,
)
from torchjac._distributed import Job, run
from torchjac._engine.func_state import call_state
from torchjac._errors import BatchCouplingError, coupling_fix

__all__ = [
    "check_samples",
    "describe_named",
    "split_function",
    "split_param_jacobian",
    "whole_or_pair",
]

Door = Callable[..., Any]


def whole_or_pair(gather: Any, call: Callable[[], Any]) -> Any:
    """``process_group=None``: today's call; ``gather=False`` pairs it with a whole index."""
    result = call()
    return (result, (slice(None),)) if gather is False else result


def describe_named(named: Sequence[tuple[str, Any]]) -> str:
    return ", ".join(
        f"{n}: {list(t.shape)} {t.dtype}" if isinstance(t, Tensor) else f"{n}: {type(t).__name__}"
        for n, t in named
    )


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


def check_samples(
    fn: str,
    target: Any,
    call: Callable[[list[Tensor]], Any],
    named: Sequence[tuple[str, Tensor]],
    batch_dim: int,
    start: int,
    stop: int,
) -> None:
    """NOTE [split samples] for samples ``[start, stop)`` of the batched inputs ``named``."""
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for _, x in named]
    with call_state(target, tuple(x for _, x in named)), torch.inference_mode(False):
        with torch.enable_grad():
            before = torch.get_rng_state()
            out = call(xs)
            if not torch.equal(before, torch.get_rng_state()):
                raise _draws(fn)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))]
        outs = [o for o in outs if isinstance(o, Tensor) and o.requires_grad]
        check_batch_dim(fn, batch_dim, [*named, *((f"output {i}", o) for i, o in enumerate(outs))])
        wrt = [x for x in xs if x.requires_grad]
        if not outs or not wrt:
            return
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


def _rows_of(func: Any, sizes: list[int], container: Any, start: int, stop: int) -> Any:
    """``func`` with only rows ``[start, stop)`` of its flattened outputs, as a sequence."""

    def rows(*args: Any) -> tuple[Tensor, ...]:
        out = func(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        pieces, off = [], 0
        for o, n in zip(outs, sizes):
            a, b = max(start - off, 0), min(stop - off, n)
            if b > a:
                pieces.append(o.reshape(-1)[a:b])
            off += n
        return tuple(pieces)

    return rows


def split_function(door: Door, fn: str, a: dict[str, Any]) -> Any:
    """``jacobian``, ``hessian``, ``hessian_diagonal``, ``laplacian`` with ``process_group``."""
    group = check_process_group(fn, a["process_group"])
    gather = check_gather(fn, a["gather"])
    opts = {
        k: a[k]
        for k in ("batch_dim", "mode", "has_aux", "chunk_size", "max_memory", "create_graph")
    }
    func, inputs = a["func"], a["inputs"]
    if group is None:
        return whole_or_pair(gather, lambda: door(func, inputs, **opts))

    def plan() -> Job:
        for flag in ("has_aux", "create_graph"):
            if check_flag(fn, flag, opts[flag]):
                raise ValueError(
                    f"{fn}: `{flag}=True` cannot be split over `process_group` (an aux value or "
                    "a graph lives on one rank); pass process_group=None."
                )
        ins, container, names, device, bd = check_func_inputs(fn, func, inputs, opts["batch_dim"])
        kind, _ = container

        def call(xs: Sequence[Tensor], f: Any = func) -> Any:
            built = unflatten(container, list(xs))
            return f(*built) if kind == "tuple" else f(built)

        sig = (
            f"{fn}({describe_named(list(zip(names, ins)))}; batch_dim={bd}, mode={opts['mode']!r})"
        )
        whole = lambda: door(func, inputs, **opts)  # noqa: E731
        if bd is not None:

            def samples(ranges: tuple[tuple[int, int], ...]) -> tuple[Any, tuple[int, ...]]:
                (start, stop), named = ranges[0], list(zip(names, ins))
                check_samples(fn, func, call, named, bd, start, stop)
                part = [x.narrow(bd, start, stop - start) for x in ins]
                return door(func, unflatten(container, part), **opts), (0,)

            return Job(sig, (ins[0].shape[bd],), device, samples, whole)
        out = evaluate(fn, func, lambda: call(ins), ins)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        shapes = [tuple(o.shape) for o in outs if isinstance(o, Tensor)]
        sizes = [o.numel() for o in outs if isinstance(o, Tensor)]
        single = isinstance(out, Tensor)

        def rows(ranges: tuple[tuple[int, int], ...]) -> tuple[Any, tuple[int, ...]]:
            start, stop = ranges[0]
            return door(_rows_of(func, sizes, container, start, stop), inputs, **opts), (0,)

        def finish(result: Any) -> Any:
            return _map(result, lambda t: t.reshape(*shapes[0], *t.shape[1:])) if single else result

        return Job(f"{sig} -> {shapes}", (sum(sizes),), device, rows, whole, finish)

    return run(fn, group, gather, plan)


def _map(x: Any, f: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(x, Tensor):
        return f(x)
    if isinstance(x, dict):
        return {k: _map(v, f) for k, v in x.items()}
    return tuple(_map(v, f) for v in x)


class _Rows(nn.Module):
    """A model's flattened output, rows ``[start, stop)`` only (its parameters as ``model.*``)."""

    def __init__(self, model: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self.model, self.start, self.stop = model, start, stop

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.model(*args, **kwargs).reshape(-1)[self.start : self.stop]


def split_param_jacobian(door: Door, fn: str, a: dict[str, Any]) -> Any:
    """``param_jacobian`` with ``process_group``: samples with ``batch_dim``, rows without."""
    group = check_process_group(fn, a["process_group"])
    gather = check_gather(fn, a["gather"])
    model, args, kwargs = a["model"], a["args"], a["kwargs"]
    opts = {k: a[k] for k in ("params", "batch_dim", "chunk_size", "max_memory")}
    if group is None:
        return whole_or_pair(gather, lambda: door(model, *args, **opts, **kwargs))

    def plan() -> Job:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: `model` must be a torch.nn.Module, got {type(model).__name__}.")
        named = [*((f"args[{i}]", x) for i, x in enumerate(args)), *kwargs.items()]
        tensors = tuple(x for _, x in named if isinstance(x, Tensor))
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        params = [(n, p) for n, p in model.named_parameters()]
        bd = opts["batch_dim"]
        sig = f"{fn}({describe_named(named)}; {describe_named(params)}; batch_dim={bd})"
        whole = lambda: door(model, *args, **opts, **kwargs)  # noqa: E731
        if bd is not None:
            first = next((x for x in tensors), None)
            if first is None:
                raise ValueError(f"{fn}: `batch_dim={bd}` needs a tensor argument to split.")
            _, n = check_batch_dim(fn, bd, [("the first tensor argument", first)])
            batched = [
                isinstance(x, Tensor) and x.dim() > 0 and x.shape[bd % x.dim()] == n
                for _, x in named
            ]

            def samples(ranges: tuple[tuple[int, int], ...]) -> tuple[Any, tuple[int, ...]]:
                start, stop = ranges[0]
                cut = [
                    x.narrow(bd % x.dim(), start, stop - start) if b else x
                    for (_, x), b in zip(named, batched)
                ]
                float_at = [i for i, ((_, x), b) in enumerate(zip(named, batched)) if b]

                def call(xs: list[Tensor]) -> Any:
                    full = [x for _, x in named]
                    for i, x in zip(float_at, xs):
                        full[i] = x
                    return model(*full[: len(args)], **dict(zip(kwargs, full[len(args) :])))

                check_samples(fn, model, call, [named[i] for i in float_at], bd, start, stop)
                res = door(model, *cut[: len(args)], **opts, **dict(zip(kwargs, cut[len(args) :])))
                shapes = dict(model.named_parameters())
                name, leaf = next(iter(res.items()))
                return res, (bd % (leaf.dim() - shapes[name].dim()),)

            return Job(sig, (n,), device, samples, whole)
        out = evaluate(fn, model, lambda: model(*args, **kwargs), tensors)
        shape = tuple(out.shape) if isinstance(out, Tensor) else ()

        def rows(ranges: tuple[tuple[int, int], ...]) -> tuple[Any, tuple[int, ...]]:
            start, stop = ranges[0]
            wrapped, names = _Rows(model, start, stop), opts["params"]
            if isinstance(names, str):
                names = [names]
            if names is not None and not isinstance(names, Tensor):
                names = [f"model.{p}" if isinstance(p, str) else p for p in names]
            res = door(wrapped, *args, **{**opts, "params": names}, **kwargs)
            return {k.removeprefix("model."): v for k, v in res.items()}, (0,)

        def finish(result: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.reshape(*shape, *v.shape[1:]) for k, v in result.items()}

        return Job(f"{sig} -> {list(shape)}", (out.numel(),), device, rows, whole, finish)

    return run(fn, group, gather, plan)
