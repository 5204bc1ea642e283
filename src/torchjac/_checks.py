"""Argument validation for the public entry points.

Every check takes the public function's name, so each message says which call failed, which
argument, the rule, what was received and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Container",
    "check_batch_dim",
    "check_chunk_size",
    "check_flag",
    "check_func_inputs",
    "check_gather",
    "check_mode",
    "check_operand",
    "check_process_group",
    "describe",
    "flatten_inputs",
    "flatten_outputs",
    "require_tensor",
    "unflatten",
]

MODES = ("auto", "rev", "fwd")


def describe(x: Any) -> str:
    """Short description of a received value for error messages."""
    if isinstance(x, Tensor):
        return f"Tensor(shape={list(x.shape)}, dtype={x.dtype}, device={x.device})"
    return type(x).__name__


def require_tensor(fn: str, arg: str, x: Any) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: `{arg}` must be a torch.Tensor, got {describe(x)}.")
    return x


def flatten_outputs(fn: str, outputs: Any, arg: str = "outputs") -> tuple[tuple[Tensor, ...], bool]:
    """Return (tensors, is_single). Accepts a Tensor or a non-empty sequence of Tensors."""
    if isinstance(outputs, Tensor):
        return (outputs,), True
    if isinstance(outputs, (str, bytes, Mapping)) or not isinstance(outputs, Iterable):
        raise TypeError(
            f"{fn}: `{arg}` must be a Tensor or a sequence of Tensors, got {describe(outputs)}."
        )
    tensors = tuple(outputs)
    if not tensors:
        raise ValueError(f"{fn}: `{arg}` is empty; pass at least one Tensor.")
    for i, t in enumerate(tensors):
        require_tensor(fn, f"{arg}[{i}]", t)
    return tensors, False


# How the result container mirrors the inputs: "tensor", "tuple" or "dict" (with its keys).
Container = tuple[str, tuple[str, ...]]


def flatten_inputs(
    fn: str, inputs: Any, arg: str = "inputs", allow_empty: bool = False
) -> tuple[tuple[Tensor, ...], Container]:
    """Tensor / iterable / mapping (str -> Tensor) -> (tensors, container); an empty sequence or
    mapping is an error unless ``allow_empty``."""
    if isinstance(inputs, Tensor):
        return (inputs,), ("tensor", ())
    if isinstance(inputs, Mapping):
        keys = tuple(inputs.keys())
        for k in keys:
            if not isinstance(k, str):
                raise TypeError(f"{fn}: the keys of `{arg}` must be str, got {describe(k)}.")
        tensors = tuple(inputs[k] for k in keys)
        names = tuple(f"{arg}[{k!r}]" for k in keys)
        container: Container = ("dict", keys)
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        tensors = tuple(inputs)
        names = tuple(f"{arg}[{i}]" for i in range(len(tensors)))
        container = ("tuple", ())
    else:
        raise TypeError(
            f"{fn}: `{arg}` must be a Tensor, a sequence of Tensors or a mapping str -> Tensor, "
            f"got {describe(inputs)}."
        )
    if not tensors and not allow_empty:
        raise ValueError(f"{fn}: `{arg}` is empty; pass at least one Tensor.")
    for name, t in zip(names, tensors):
        require_tensor(fn, name, t)
    return tensors, container


def input_names(container: Container, n: int, arg: str = "inputs") -> tuple[str, ...]:
    kind, keys = container
    if kind == "tensor":
        return (arg,)
    if kind == "dict":
        return tuple(f"{arg}[{k!r}]" for k in keys)
    return tuple(f"{arg}[{i}]" for i in range(n))


def unflatten(container: Container, results: Sequence[Any]) -> Any:
    """Put per-input results back into the user's container."""
    kind, keys = container
    if kind == "tensor":
        return results[0]
    if kind == "dict":
        return dict(zip(keys, results))
    return tuple(results)


def check_flag(fn: str, arg: str, value: Any, allow_none: bool = False) -> bool | None:
    """A bool option (``None`` too where it means "the default")."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(
            f"{fn}: `{arg}` must be True or False{' or None' if allow_none else ''}, "
            f"got {value!r} ({type(value).__name__})."
        )
    return value


def check_mode(fn: str, mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"{fn}: `mode` must be one of {MODES}, got {mode!r}.")
    return str(mode)


def check_chunk_size(fn: str, chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"{fn}: `chunk_size` must be an int >= 1 or None, got {describe(chunk_size)}."
        )
    if chunk_size < 1:
        raise ValueError(
            f"{fn}: `chunk_size` must be >= 1 (1 means a plain loop), got {chunk_size}. "
            "Pass None to choose it from `max_memory`."
        )
    return chunk_size


def check_batch_dim(
    fn: str, batch_dim: Any, named: Sequence[tuple[str, Tensor]]
) -> tuple[int | None, int]:
    """Validate ``batch_dim`` against every named tensor; return (batch_dim, B) or (None, 0).

    Negative ``batch_dim`` counts from each tensor's end, as in torch.
    """
    if batch_dim is None:
        return None, 0
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
        raise TypeError(f"{fn}: `batch_dim` must be an int or None, got {describe(batch_dim)}.")
    size: int | None = None
    first = ""
    for name, t in named:
        if not -t.dim() <= batch_dim < t.dim():
            raise ValueError(
                f"{fn}: `batch_dim={batch_dim}` is out of range for {name} with shape "
                f"{list(t.shape)}; every output and input needs the batch dimension."
            )
        b = t.shape[batch_dim]
        if size is None:
            size, first = b, name
        elif b != size:
            raise ValueError(
                f"{fn}: mismatched batch sizes at `batch_dim={batch_dim}`: {first} has {size} but "
                f"{name} has {b} (shape {list(t.shape)}). All outputs and inputs must share it."
            )
    assert size is not None
    return batch_dim, size


def check_same_device(fn: str, named: Sequence[tuple[str, Tensor]]) -> torch.device:
    dev = named[0][1].device
    for name, t in named[1:]:
        if t.device != dev:
            raise ValueError(
                f"{fn}: all tensors must be on one device; {named[0][0]} is on {dev} but {name} is "
                f"on {t.device}."
            )
    return dev


def check_func_inputs(
    fn: str, func: Any, inputs: Any, batch_dim: Any
) -> tuple[tuple[Tensor, ...], Container, tuple[str, ...], torch.device, int | None]:
    """A callable ``func`` and its floating ``inputs`` on one device, with ``batch_dim`` checked:
    ``(inputs, container, names, device, batch_dim)``."""
    if not callable(func):
        raise TypeError(f"{fn}: `func` must be callable, got {describe(func)}.")
    ins, container = flatten_inputs(fn, inputs)
    names = input_names(container, len(ins))
    named = list(zip(names, ins))
    device = check_same_device(fn, named)
    for name, x in named:
        if not x.is_floating_point():
            raise TypeError(f"{fn}: {name} must have a real floating dtype, got {describe(x)}.")
    checked, _ = check_batch_dim(fn, batch_dim, named)
    return ins, container, names, device, checked


GATHERS = ("all", "rank0", False)


def check_gather(fn: str, gather: Any) -> str | bool:
    """``gather``: ``"all"``, ``"rank0"`` or ``False`` (NOTE [split and gather])."""
    if not any(gather is g or (isinstance(g, str) and gather == g) for g in GATHERS):
        raise ValueError(
            f'{fn}: `gather` must be "all" (the whole result on every rank), "rank0" (on '
            f"rank 0 only, None elsewhere) or False (each rank's own shard and its index), got "
            f"{gather!r}."
        )
    return gather


def check_process_group(fn: str, group: Any) -> Any:
    """``None`` or a ``torch.distributed.ProcessGroup`` of an initialised run this rank is in."""
    if group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError(
            f"{fn}: `process_group` needs torch.distributed, which this build of torch lacks; "
            "pass process_group=None."
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{fn}: `process_group` must be a torch.distributed.ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD) or None, got {describe(group)}."
        )
    if not dist.is_initialized():
        raise ValueError(
            f"{fn}: `process_group` was given but torch.distributed is not initialised (or was "
            "destroyed): call torch.distributed.init_process_group(...) first on every rank "
            "(torchrun sets the environment it reads), or pass process_group=None."
        )
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"{fn}: this process (global rank {dist.get_rank()}) is not a member of "
            "`process_group`; call with a group it belongs to."
        )
    return group


def check_operand(fn: str, x: Any, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``x`` for ``op @ x``: a vector ``[n]`` or a block ``[n, k]`` of the operator's dtype."""
    if not isinstance(x, Tensor):
        hint = " (numpy arrays: use .to_scipy())" if type(x).__module__.startswith("numpy") else ""
        raise TypeError(f"{fn}: `@` needs a torch.Tensor, got {describe(x)}{hint}.")
    if x.dim() not in (1, 2):
        raise ValueError(
            f"{fn}: `@` needs a vector [{n}] or a block of columns [{n}, k], got a {x.dim()}-D "
            f"tensor of shape {list(x.shape)}. Flatten it, or reshape a stack to [{n}, k]."
        )
    if x.shape[0] != n:
        raise ValueError(
            f"{fn}: `@` needs {n} rows (the operator's columns, flattened in the layout rule's "
            f"order), got shape {list(x.shape)}."
        )
    if x.dtype != dtype:
        raise TypeError(
            f"{fn}: `@` needs the operator's dtype {dtype}, got {x.dtype}; cast with x.to({dtype})."
        )
    if x.device != device:
        raise ValueError(f"{fn}: `@` needs a tensor on {device}, got one on {x.device}.")
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{fn}: products are not differentiable; pass x.detach().")
    return x


def check_sparse_args(fn: str, func: Any, x: Any) -> Tensor:
    """``func`` callable and ``x`` one floating, strided Tensor (the sparse Jacobian doors)."""
    if not callable(func):
        raise TypeError(f"{fn}: `func` must be callable, got {describe(func)}.")
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{fn}: `x` must be one torch.Tensor, got {describe(x)}. For several inputs, "
            "concatenate them into one flat Tensor and split it inside func."
        )
    if x.layout != torch.strided or not x.is_floating_point():
        raise TypeError(
            f"{fn}: `x` must be a dense Tensor with a real floating dtype, got {describe(x)} "
            f"with layout {x.layout}."
        )
    return x


def check_pattern(fn: str, pattern: Any, n: int) -> Tensor | None:
    """``None`` or a boolean sparse CSR ``[m, n]`` (``m`` is checked against the output later)."""
    if pattern is None:
        return None
    if not isinstance(pattern, Tensor) or pattern.layout != torch.sparse_csr:
        raise TypeError(
            f"{fn}: `pattern` must be None or a boolean sparse CSR Tensor [m, n] such as "
            f"tj.sparsity_pattern(func, x) returns, got {describe(pattern)}"
            + (f" with layout {pattern.layout}" if isinstance(pattern, Tensor) else "")
            + ". Convert a dense boolean mask with mask.to_sparse_csr()."
        )
    if pattern.dtype != torch.bool or pattern.dim() != 2 or pattern.shape[1] != n:
        raise ValueError(
            f"{fn}: `pattern` must be boolean with shape [m, {n}] (x has {n} elements), got "
            f"dtype {pattern.dtype} and shape {list(pattern.shape)}."
        )
    return pattern
