"""The sparsity pattern of a function's Jacobian, for every input value, from the ops it runs.

NOTE [sparsity tracing]: ``func`` is called once on a copy of ``x`` under a dispatch mode that
sees every aten operation (after autograd, so composite ops such as ``F.conv2d``, ``F.pad`` or
``@`` arrive as the few primitives they are made of). Dependence is kept per *storage element*,
not per tensor: a view (slice, reshape, transpose, ``expand``) reads the same storage and needs
no rule, and an in-place write through a view (``out[1:-1] = ...``, ``copy_``, ``index_put_``)
updates the base it writes into. Each op that produces or writes data maps the index sets of its
inputs (NOTE [index sets]) to its outputs by a rule of ``sparsity_rules`` chosen from the op's
structure (elementwise, data movement, reduction, matrix product, convolution, scatter). An op
with no rule makes every element it writes depend on every input element it reads: a superset,
never a missed nonzero, and the op is reported. Integer and boolean tensors carry index sets too
(the values they were computed from), so an index, mask or condition computed from ``x`` makes
the op that uses it depend on all the elements it could select. A Python branch on a value of
``x`` (``.item()``, ``bool(t)``, ``torch.allclose``) is reported: the pattern then holds for
the branch taken (``.tolist()`` and ``.numpy()`` read values with no aten op: unseen).
A tensor of a sparse layout (``x.to_sparse()``, ``torch.sparse_coo_tensor`` of values from
``x``) has no storage of its elements: it keeps one set, the union of what made it, for all its
elements (and the tensors viewed from it, as its ``values()``), and an op that makes or reads
one is dense and reported.
An op that writes no argument reads its inputs' sets only after it ran and only if it made
data (a view makes none, so slicing costs no set work). When ``sparse_jacobian`` detects the
pattern itself, its graph (the call always runs with autograd on: NOTE [custom functions in
sparsity]) is the one the reverse probes pull back through (NOTE [compressed probes]): ``func``
runs once for both.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from torchjac._engine.core.dispatch import EagerDispatchMode
from torchjac._engine.sparse.index_sets import Sets
from torchjac._engine.sparse.sparsity_base import Reader, Rule, broadcast, dense_rule, tensors
from torchjac._engine.sparse.sparsity_custom import CustomFunctions
from torchjac._engine.sparse.sparsity_rules import choose_rule, pointwise_rule

try:  # without it (a torch that moved it), storages are kept alive: no address is reused
    from torch.multiprocessing.reductions import StorageWeakRef
except ImportError:  # pragma: no cover
    StorageWeakRef = None  # type: ignore[assignment,misc]

__all__ = ["Trace", "trace_pattern"]

aten = torch.ops.aten
_BRANCHES = {  # ops that read values of a tensor into Python (a number or a bool)
    aten._local_scalar_dense.default,
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
}


@dataclass
class _Entry:
    ref: Any  # a StorageWeakRef (or the storage itself, kept alive)
    itemsize: int
    sets: Sets  # one row per storage element


@dataclass
class Trace:
    """The pattern's rows (one per output element), and what made it a superset."""

    sets: Sets
    dense_ops: list[str] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)


class _Storages:
    """Index sets per storage element, for every storage written during the trace."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.entries: dict[int, _Entry] = {}
        self.keep: list[Tensor] = []  # without StorageWeakRef: no address is ever reused
        # tensors of a sparse layout, by object: one set (a row) for all their elements
        self.opaque: dict[int, tuple[Any, Sets]] = {}
        self._arange = torch.arange(0)  # grown when first needed (views rarely need it)

    def _entry(self, t: Tensor) -> _Entry | None:
        if t.numel() == 0 or t.layout != torch.strided or t.device.type == "meta":
            return None
        e = self.entries.get(t.untyped_storage().data_ptr())
        if e is None:
            return None
        if StorageWeakRef is not None and e.ref.expired():
            del self.entries[t.untyped_storage().data_ptr()]
            return None
        return e

    @staticmethod
    def _whole(t: Tensor, itemsize: int) -> bool:
        """``t`` is its whole storage in order: its sets are the storage's, as they are."""
        size = t.untyped_storage().nbytes() // itemsize
        return (
            t.element_size() == itemsize
            and t.numel() == size
            and t.storage_offset() == 0
            and t.is_contiguous()
        )

    def arange(self, size: int) -> Tensor:
        """``torch.arange(size)``, sliced from one kept tensor (never written)."""
        if self._arange.numel() < size:
            self._arange = torch.arange(max(size, self.n, 2 * self._arange.numel()))
        return self._arange[:size]

    def _offsets(self, t: Tensor, itemsize: int) -> Tensor:
        scale = t.element_size() / itemsize
        size = t.untyped_storage().nbytes() // itemsize
        base = self.arange(size)
        if scale != 1:  # a dtype view: every element reads the whole storage (a superset)
            return base
        return base.as_strided(t.shape, t.stride(), t.storage_offset()).reshape(-1)

    def read(self, t: Tensor) -> Sets:
        """The index sets of ``t``'s elements (row-major)."""
        e = self._entry(t)
        if e is None:
            if self.opaque and t.layout != torch.strided:
                kept = self.opaque.get(id(t))
                if kept is not None and kept[0]() is t:
                    return kept[1].dense_to(t.numel())
            return Sets.empty(t.numel(), self.n)
        if self._whole(t, e.itemsize):
            return e.sets
        if t.element_size() == e.itemsize:  # a strided view of the storage's rows
            found = e.sets.strided(t.shape, t.stride(), int(t.storage_offset()))
            if found is not None:
                return found
        off = self._offsets(t, e.itemsize)
        if off.numel() != t.numel():
            return e.sets.dense_to(t.numel())
        return e.sets.take(off)

    def write(self, t: Tensor, sets: Sets, fresh: bool = False) -> None:
        """``t``'s elements (row-major) now have the index sets ``sets``; ``fresh``: ``t`` is
        an op's new output (any entry at its address is a dead storage's)."""
        if t.numel() == 0:
            return
        if t.layout != torch.strided:  # a sparse layout: one set for all its elements
            if sets.live or id(t) in self.opaque:
                self.opaque[id(t)] = (weakref.ref(t), sets.dense_to(1))
            return
        if fresh and self._whole(t, t.element_size()):
            self._store(t, t.element_size(), sets)
            return
        e = self._entry(t)
        if e is None and not sets.live:
            return
        itemsize = t.element_size() if e is None else e.itemsize
        size = t.untyped_storage().nbytes() // itemsize
        if self._whole(t, itemsize):
            new = sets
        elif (
            off := self._offsets(t, itemsize)
        ).numel() != t.numel():  # a dtype view written: the storage depends on it all
            old = e.sets if e is not None else Sets.empty(size, self.n)
            new = Sets.union([old, sets.dense_to(size)], size, self.n)
        else:
            moved = sets.relabel(off, size)
            if e is None:
                new = moved
            else:
                written = torch.zeros(size, dtype=torch.bool)
                written[off] = True
                new = Sets.union([e.sets.keep_rows(written), moved], size, self.n)
        self._store(t, itemsize, new)

    def _store(self, t: Tensor, itemsize: int, sets: Sets) -> None:
        storage = t.untyped_storage()
        if StorageWeakRef is not None:
            ref: Any = StorageWeakRef(storage)
        else:  # pragma: no cover
            ref = storage
            self.keep.append(t)
        self.entries[storage.data_ptr()] = _Entry(ref, itemsize, sets)


@dataclass(frozen=True)
class _Op:
    """What the tracer needs to know of an aten op, worked out once per op."""

    writes: bool  # mutates an argument
    branch: bool  # reads a value of a tensor into Python
    metadata: bool  # changes metadata only (squeeze_, t_): the storage's sets are unchanged
    view: bool  # returns views of its arguments only (slice, select, view): no data made
    rule: Rule | None
    elementwise: bool  # the pointwise rule, writing no argument: ``_Tracer._elementwise``


_OPS: dict[int, tuple[Any, _Op]] = {}  # by id: an aten op's hash is Python code


def _op(func: Any) -> _Op:
    found = _OPS.get(id(func))
    if found is not None and found[0] is func:
        return found[1]
    schema = func._schema
    writes = any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)
    metadata = torch.Tag.inplace_view in func.tags and func is not aten.resize_.default
    view = not writes and bool(schema.returns) and all(r.alias_info for r in schema.returns)
    rule, branch = choose_rule(func), func in _BRANCHES
    elementwise = rule is pointwise_rule and not writes and not branch and not view
    op = _Op(writes, branch, metadata, view, rule, elementwise)
    _OPS[id(func)] = (func, op)
    return op


class _Tracer(EagerDispatchMode):
    def __init__(self, storages: _Storages, trace: Trace, custom: CustomFunctions | None) -> None:
        super().__init__()
        self.storages = storages
        self.trace = trace
        self.custom = custom

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        op = _op(func)
        if op.view or op.metadata:  # no data made, no storage's sets changed: nothing to do
            if self.custom is not None:
                self.custom.see_viewed(args, kwargs)  # NOTE [custom functions in sparsity]
            if self.storages.opaque and op.view:  # unless it views a sparse layout's data
                return self._view_of_opaque(func(*args, **kwargs), args, kwargs)
            return func(*args, **kwargs)
        leaves = tensors(args) + tensors(kwargs) if kwargs else tensors(args)
        if self.custom is not None:
            self.custom.see(leaves)  # NOTE [custom functions in sparsity]
        if op.elementwise:
            out = func(*args, **kwargs)
            if isinstance(out, Tensor) and self._elementwise(out, leaves):
                return out
            return self._after(func, op, args, kwargs, leaves, out, [], _cached(self.storages))
        reader = _cached(self.storages)
        # read before a write can change them; an op that writes nothing is read after it
        # runs, if it makes data at all (a view makes none: no read)
        early = op.writes or op.branch
        tracked = [t for t in leaves if reader(t).live] if early else []
        return self._after(func, op, args, kwargs, leaves, func(*args, **kwargs), tracked, reader)

    def _after(
        self,
        func: Any,
        op: _Op,
        args: Any,
        kwargs: Any,
        leaves: list[Tensor],
        out: Any,
        tracked: list[Tensor],
        reader: Callable[[Tensor], Sets],
    ) -> Any:
        """The op has run: write its outputs' index sets (``tracked``: the live arguments, when
        read before it ran)."""
        early = op.writes or op.branch
        if op.branch and tracked:
            self.trace.branches.append(str(func.overloadpacket.__name__))
        fresh = _fresh(out, leaves)
        targets = fresh + _mutated(func, args, kwargs, fresh) if op.writes else fresh
        if not targets:
            return out
        if not early:
            tracked = [t for t in leaves if reader(t).live]
        if not tracked:  # constants: nothing to write (an untracked target has no sets)
            return out
        sets = None
        if op.rule is not None and not _opaque(targets, tracked):
            sets = op.rule(func, args, kwargs, targets, Reader(reader, self.storages.n, tracked))
        if sets is None:
            self.trace.dense_ops.append(str(func))
            sets = dense_rule(targets, tracked, reader)
        for i, (t, s) in enumerate(zip(targets, sets)):
            self.storages.write(t, s, fresh=i < len(fresh))
        return out

    def _view_of_opaque(self, out: Any, args: Any, kwargs: Any) -> Any:
        """A view's outputs (``values()``, ``indices()``, an alias) read every element of the
        tensors of a sparse layout it views (NOTE [sparsity tracing])."""
        read = self.storages.read
        parts = [read(t) for t in tensors((args, kwargs)) if t.layout != torch.strided]
        parts = [s.dense_to(1) for s in parts if s.live]
        if parts:
            union = Sets.union(parts, 1, self.storages.n)
            for t in tensors(out):
                self.storages.write(t, union.dense_to(t.numel()))
        return out

    def _elementwise(self, out: Tensor, leaves: list[Tensor]) -> bool:
        """``pointwise_rule`` for an op that made one fresh tensor, without the general path's
        bookkeeping; ``False``: not that case, and the general path writes them (the op has
        run)."""
        if out.layout != torch.strided or not out.numel():
            return False
        at = out.untyped_storage().data_ptr()
        read, n = self.storages.read, self.storages.n
        floating = out.is_floating_point() or out.is_complex()
        parts, tracked = [], False
        for a in leaves:
            if a.layout == torch.strided and a.untyped_storage().data_ptr() == at:
                return False  # not a fresh output
            sets = read(a)
            if not sets.maybe_live:  # a constant (a slice of x may be empty too: unread)
                continue
            tracked = True
            if floating and not (a.is_floating_point() or a.is_complex()):
                continue  # NOTE [sparsity tracing]: a mask selects, it carries no derivative
            if a.shape != out.shape:
                try:
                    sets = broadcast(sets, a, out.shape)
                except RuntimeError:
                    return False
            parts.append(sets)
        if tracked:  # else constants: nothing to write
            self.storages.write(out, Sets.lazy_union(parts, out.numel(), n), fresh=True)
        return True


def _opaque(targets: list[Tensor], tracked: list[Tensor]) -> bool:
    """An op makes or reads a tensor of a sparse layout: no rule knows its elements."""
    return any(t.layout != torch.strided for t in targets) or any(
        t.layout != torch.strided for t in tracked
    )


def _cached(storages: _Storages) -> Callable[[Tensor], Sets]:
    """``storages.read``, each tensor read once (an op's rule may read an argument again)."""
    cache: dict[int, Sets] = {}
    read = storages.read

    def reader(t: Tensor) -> Sets:
        found = cache.get(id(t))
        if found is None:
            found = cache[id(t)] = read(t)
        return found

    return reader


def _fresh(out: Any, leaves: list[Tensor]) -> list[Tensor]:
    """The outputs with storage of their own (not views of an argument)."""
    found = tensors(out)
    if not found:
        return found
    mine = {t.untyped_storage().data_ptr() for t in leaves if t.layout == torch.strided}
    return [
        t
        for t in found
        if t.numel()
        and (
            t.untyped_storage().data_ptr() not in mine
            if t.layout == torch.strided
            else not any(t is a for a in leaves)
        )
    ]


def _mutated(func: Any, args: Any, kwargs: Any, fresh: list[Tensor]) -> list[Tensor]:
    """The arguments the op writes (not already among its fresh outputs: an op may write an
    argument and return fresh outputs too, as batch norm's running statistics)."""
    found = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(a.name)
        found += [t for t in tensors(value) if not any(t is f for f in fresh)]
    return found


def trace_pattern(
    func: Callable[[Tensor], Any], x: Tensor, graph: bool = False
) -> tuple[Any, Trace, Tensor | None]:
    """Call ``func`` on a copy of ``x`` under the tracer (NOTE [sparsity tracing]).

    Returns the output, its trace (``trace.sets`` has one row per output element) and, with
    ``graph``, the leaf the output's autograd graph starts from: the call is then also the
    one reverse probes pull back through (``func`` gets a copy of that leaf, which it may
    write into); without, the output is returned detached. Autograd is on either way (NOTE
    [custom functions in sparsity]), unless ``func`` cannot run with it: then no graph is
    returned (``None``, even if asked for), and reverse probes, making their own, fail as
    reverse-mode AD does (``"auto"`` then takes columns in forward mode).
    """
    try:
        return _traced(func, x, graph, True)
    except RuntimeError:
        pass
    # a function autograd cannot run (``.numpy()`` of ``x``, an ``out=`` op reading it, an
    # in-place write into one of ``split``'s views) has no reverse-mode derivative, so no
    # custom Function's to miss: traced without autograd (forward-mode AD may still follow it)
    return _traced(func, x, False, False)


def _traced(
    func: Callable[[Tensor], Any], x: Tensor, graph: bool, autograd: bool
) -> tuple[Any, Trace, Tensor | None]:
    n = x.numel()
    storages = _Storages(n)
    trace = Trace(Sets.empty(0, n))
    custom = CustomFunctions(storages, trace.dense_ops) if autograd else None
    leaf = x.detach().requires_grad_(autograd)
    with torch.set_grad_enabled(autograd):
        copy = leaf.clone(memory_format=torch.contiguous_format)
        storages.write(copy, Sets.identity(n))
        with _Tracer(storages, trace, custom):
            y = func(copy)
    if isinstance(y, Tensor):
        if custom is not None:
            custom.see([y])
        trace.sets = storages.read(y)
    if not graph:
        return (y.detach() if isinstance(y, Tensor) else y), trace, None
    return y, trace, leaf
