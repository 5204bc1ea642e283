"""How each front door splits its work over a process group (NOTE [split and gather]).

The function doors and ``param_jacobian`` split the samples with ``batch_dim`` and the rows of
the flattened output without (``ntk``'s tiles are in ``_distributed_ntk``). Each rank calls the
door itself (``process_group=None``) on its part.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, final

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
from torchjac._distributed_checks import check_samples, evaluate

__all__ = [
    "describe_named",
    "selected_params",
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


def _rows_of(func: Any, sizes: list[int], start: int, stop: int) -> Any:
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

        m, n = sum(sizes), sum(x.numel() for x in ins)
        fwd = opts["mode"] == "fwd" or (opts["mode"] == "auto" and m > n)
        if fn == "jacobian" and fwd and len({x.dtype for x in ins}) == 1:
            lead = shapes[0] if single else (m,)
            cols = _Columns(door, func, ins, container, opts, lead)
            return Job(f"{sig} -> {shapes} by columns", (n,), device, cols, whole, cols.finish)

        def rows(ranges: tuple[tuple[int, int], ...]) -> tuple[Any, tuple[int, ...]]:
            start, stop = ranges[0]
            return door(_rows_of(func, sizes, start, stop), inputs, **opts), (0,)

        def finish(result: Any) -> Any:
            return _map(result, lambda t: t.reshape(*shapes[0], *t.shape[1:])) if single else result

        return Job(f"{sig} -> {shapes}", (sum(sizes),), device, rows, whole, finish)

    return run(fn, group, gather, plan)


@final
class _Columns:
    """A tall Jacobian by columns: rank ``r`` differentiates with respect to its range of the
    inputs' elements (flattened and concatenated, one dtype), the others held fixed. A shard is
    ``[*rows, n_r]``; ``finish`` cuts the gathered ``[*rows, n]`` back into the inputs."""

    def __init__(
        self,
        door: Door,
        func: Any,
        ins: tuple[Tensor, ...],
        container: Any,
        opts: dict[str, Any],
        lead: tuple[int, ...],
    ) -> None:
        self.door, self.func, self.container, self.opts, self.lead = (
            door,
            func,
            container,
            opts,
            lead,
        )
        self.shapes = [x.shape for x in ins]
        self.sizes = [x.numel() for x in ins]
        self.flat = torch.cat([x.detach().reshape(-1) for x in ins])  # a copy, never a view

    def __call__(self, ranges: tuple[tuple[int, int], ...]) -> tuple[Any, tuple[int, ...]]:
        start, stop = ranges[0]
        flat, func, kind = self.flat, self.func, self.container[0]

        def part(z: Tensor) -> Any:
            whole = torch.cat([flat[:start], z, flat[stop:]]).split(self.sizes)
            built = unflatten(self.container, [t.reshape(s) for t, s in zip(whole, self.shapes)])
            return func(*built) if kind == "tuple" else func(built)

        return self.door(part, flat[start:stop].clone(), **self.opts), (len(self.lead),)

    def finish(self, result: Tensor) -> Any:
        pieces = result.split(self.sizes, dim=-1)
        return unflatten(
            self.container, [p.reshape(*self.lead, *s) for p, s in zip(pieces, self.shapes)]
        )


def selected_params(fn: str, model: nn.Module, opts: dict[str, Any]) -> list[tuple[str, Any]]:
    """The parameters differentiated, for the signature (``opts["params"]`` made a tuple once,
    so an iterator is not used up before the door reads it)."""
    from torchjac._modules import _select

    chosen = opts["params"]
    if chosen is not None and not isinstance(chosen, (str, Tensor)):
        opts["params"] = tuple(chosen)
    names = set(_select(fn, model, opts["params"]))
    return [(n, p) for n, p in model.named_parameters() if n in names]


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
        params = selected_params(fn, model, opts)
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

                shapes = dict(model.named_parameters())
                at = lambda k, v: bd % (v.dim() - shapes[k].dim())  # noqa: E731  the samples
                mine = [named[i] for i in float_at]
                if check_samples(fn, model, call, mine, bd, start, stop):  # NOTE [split samples]
                    res = {  # a part of its own (the whole result not kept alive)
                        k: v.narrow(at(k, v), start, stop - start).clone()
                        for k, v in whole().items()
                    }
                else:
                    kw = dict(zip(kwargs, cut[len(args) :]))
                    res = door(model, *cut[: len(args)], **opts, **kw)
                name, leaf = next(iter(res.items()))
                return res, (at(name, leaf),)

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
