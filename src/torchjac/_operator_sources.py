"""The three questions ``JacobianOperator`` answers, validated and turned into product sources.

A function and its inputs (one piece), a module over one batch or over every item of a data
set (one piece per item, rows stacked in order), and tensors already on the graph. Everything is
checked when the operator is built: one evaluation per piece without autograd (its output
shapes are the rows), and the structure of every item of ``data``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from torchjac._checks import check_batch_dim, check_func_inputs, describe
from torchjac._engine.core.basis import Group
from torchjac._engine.core.func_call import FuncProblem
from torchjac._engine.core.func_state import call_state
from torchjac._engine.func.func_probes import autograd_trace
from torchjac._engine.graph.op_products import CallSource, Draw, Piece
from torchjac._engine.modules.layers import call, model_state, no_side_effects
from torchjac._modules import _select

__all__ = ["func_source", "module_source"]


def _promoted(tensors: Iterable[Tensor]) -> torch.dtype:
    dtypes = [t.dtype for t in tensors]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _checked(fn: str, what: str, piece_shapes: tuple[torch.Size, ...], ys: tuple) -> tuple:
    got = tuple(y.shape for y in ys)
    if got != piece_shapes:
        raise RuntimeError(
            f"{fn}: {what} returned shapes {[list(s) for s in got]}, but "
            f"{[list(s) for s in piece_shapes]} when the operator was built. The rows must not "
            "change between products."
        )
    return ys


def func_source(
    fn: str, func: Any, inputs: Any, batch_dim: Any
) -> tuple[CallSource, tuple[Group, Group] | None]:
    """``func`` at ``inputs`` (copied now); with ``batch_dim``, the groups of NOTE [flat layout]."""
    ins, container, names, device, batch_dim = check_func_inputs(fn, func, inputs, batch_dim)
    named = list(zip(names, ins))
    with torch.inference_mode(False):  # the operator's point: a copy, never the user's tensors
        xs = tuple(x.detach().clone() for x in ins)
    p = FuncProblem(fn, func, container, xs, names, False, batch_dim, False)
    draw = Draw.take(device)  # NOTE [operator draw]: the draw a plain call would make now
    with call_state(func, xs), torch.inference_mode(False):
        draw.apply()
        if batch_dim is None:
            with torch.no_grad():
                outs, _ = p.call(*(x.clone() for x in xs))
        else:

            def check_batch(ys: tuple[Tensor, ...]) -> None:
                labels = [f"the output of func[{i}]" for i in range(len(ys))]
                check_batch_dim(fn, batch_dim, named + list(zip(labels, ys)))

            outs = autograd_trace(p, check_batch).outputs  # checks the samples' independence
    shapes = tuple(y.shape for y in outs)
    groups = None if batch_dim is None else (Group.of(outs, batch_dim), Group.of(xs, batch_dim))

    def evaluate(*columns: Tensor) -> tuple[Tensor, ...]:
        return _checked(fn, "func", shapes, p.outputs_only(*columns))

    @contextmanager
    def open_() -> Iterator[tuple[tuple[Tensor, ...], Iterator[Piece]]]:
        with call_state(func, xs), torch.inference_mode(False):  # buffers, RNG as found
            yield xs, iter([Piece(evaluate, shapes, draw)])

    dtype = _promoted((*xs, *outs))
    rows = sum(y.numel() for y in outs)
    source = CallSource(fn, tuple(x.shape for x in xs), rows, dtype, device, open_)
    return source, groups


def module_source(
    fn: str, model: Any, args: tuple, params: Any, data: Any, kwargs: dict
) -> CallSource:
    """``model`` w.r.t. its parameters over one batch (``args``) or every item of ``data``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: `model` must be a torch.nn.Module, got {describe(model)}.")
    names = _select(fn, model, params)
    device = next(model.parameters()).device
    if data is None:
        data = [args]
    elif args:
        raise ValueError(
            f"{fn}: pass the model's positional arguments either as `*args` (one batch) or as "
            f"the items of `data`, not both; got {len(args)} positional argument(s) and `data`."
        )
    else:
        _check_reiterable(fn, data)
    buffers = [n for n, _ in model.named_buffers()]
    shapes: list[tuple[torch.Size, ...]] = []
    draws: list[Draw | None] = []
    structures: list[Any] = []
    with no_side_effects(device), torch.inference_mode(False), torch.no_grad():
        state = model_state(model, names)
        for i, item in enumerate(data):
            a = _item_args(fn, i, item, structures)
            draw = Draw.take(device)
            out = call(model, state.with_leaves(state.leaves), a, kwargs)
            if not isinstance(out, Tensor) or not out.is_floating_point():
                raise TypeError(
                    f"{fn}: the model must return a real floating Tensor, got {describe(out)}."
                )
            moved = not torch.equal(draw.cpu, torch.get_rng_state())  # kept only if it drew
            draws.append(draw if moved or device.type == "cuda" else None)
            shapes.append((out.shape,))
            out_dtype = out.dtype
    if not shapes:
        raise ValueError(f"{fn}: `data` yielded no items; pass at least one batch.")
    dtype = _promoted([*(state.leaves[n] for n in names), torch.empty(0, dtype=out_dtype)])

    @contextmanager
    def open_() -> Iterator[tuple[tuple[Tensor, ...], Iterator[Piece]]]:
        with no_side_effects(device), torch.inference_mode(False):
            st = model_state(model, names)  # the parameters as they are now; buffers cloned
            yield tuple(st.leaves[n] for n in names), _pieces(st.fixed)

    def _pieces(fixed: dict[str, Tensor]) -> Iterator[Piece]:
        seen: list[Any] = structures[:1]
        count = 0
        for i, item in enumerate(data):
            count += 1
            if count > len(shapes):
                break
            a = _item_args(fn, i, item, seen)

            def evaluate(*leaves: Tensor, a: tuple = a, i: int = i) -> tuple[Tensor, ...]:
                # buffers cloned inside the evaluation: a transform refuses in-place writes into
                # tensors it captured (BatchNorm's num_batches_tracked in train mode)
                own = {n: fixed[n].clone() for n in buffers}
                tensors = {**fixed, **own, **dict(zip(names, leaves))}
                return _checked(
                    fn, f"the model on item {i}", shapes[i], (call(model, tensors, a, kwargs),)
                )

            yield Piece(evaluate, shapes[i], draws[i])
        if count != len(shapes):
            got = f"more than {len(shapes)}" if count > len(shapes) else str(count)
            raise RuntimeError(
                f"{fn}: `data` yielded {got} items, but {len(shapes)} when the operator was "
                "built; it must yield the same items in the same order on every pass."
            )

    rows = sum(s[0].numel() for s in shapes)
    cols = tuple(state.leaves[n].shape for n in names)
    return CallSource(fn, cols, rows, dtype, device, open_)


def _check_reiterable(fn: str, data: Any) -> None:
    if not isinstance(data, Iterable) or isinstance(data, (Tensor, str, bytes)):
        raise TypeError(
            f"{fn}: `data` must be a re-iterable of batches (a DataLoader, a list), got "
            f"{describe(data)}."
        )
    if isinstance(data, Iterator):
        raise TypeError(
            f"{fn}: `data` is an iterator ({type(data).__name__}), which runs out after one pass; "
            "every product makes a pass, so pass a list or a DataLoader."
        )
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        raise ValueError(
            f"{fn}: `data` is a DataLoader with shuffle=True; the rows are the items in order, "
            "so every pass must yield them in the same order. Use shuffle=False."
        )


def _item_args(fn: str, i: int, item: Any, structures: list[Any]) -> tuple:
    """An item as the model's positional arguments, with the structure of the first item."""
    with torch.inference_mode(False):
        if isinstance(item, Tensor):
            a: tuple = (item.clone() if item.is_inference() else item,)
        elif isinstance(item, (tuple, list)):
            a = tuple(t.clone() if isinstance(t, Tensor) and t.is_inference() else t for t in item)
        else:
            raise TypeError(
                f"{fn}: each item of `data` must be a Tensor or a tuple of the model's positional "
                f"arguments, got {describe(item)} at item {i}."
            )
    structure = tuple((x.dtype, x.dim()) if isinstance(x, Tensor) else type(x).__name__ for x in a)
    if not structures:
        structures.append(structure)
    elif structure != structures[0]:
        raise ValueError(
            f"{fn}: the items of `data` must share one structure (arguments, and each tensor's "
            f"dtype and number of dimensions); item 0 has {_show(structures[0])} but item {i} "
            f"has {_show(structure)}."
        )
    return a


def _show(structure: tuple) -> str:
    parts = [f"{s[0]} {s[1]}-D" if isinstance(s, tuple) else s for s in structure]
    return "(" + ", ".join(map(str, parts)) + ")"
