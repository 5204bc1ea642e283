"""``JacobianOperator``: products with ``J`` and ``Jᵀ`` that never form ``J`` (NOTE [operator
products] in ``_engine/op_products``), and its Gram operators ``J Jᵀ`` and ``Jᵀ J``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, final

import torch
from torch import Tensor, nn

from torchjac._checks import check_chunk_size, check_operand, check_process_group
from torchjac._distributed import split_columns
from torchjac._engine.core.basis import Group
from torchjac._engine.core.plan import memory_budget, parse_memory
from torchjac._engine.graph.op_graph import GraphSource
from torchjac._engine.graph.op_products import CallSource
from torchjac._graph_args import graph_call
from torchjac._operator_dense import dense_batched, dense_by_blocks, scipy_operator
from torchjac._operator_sources import func_source, module_source

__all__ = ["GramOperator", "JacobianOperator"]

_FN = "JacobianOperator"


@final
class JacobianOperator:
    r"""The Jacobian :math:`J_{ij} = \partial y_i / \partial x_j` as a linear operator: products
    ``J @ V`` and ``J.T @ U`` without ever forming ``J``.

    Shapes: ``J.shape == (m, n)``, ``m`` the number of output elements and ``n`` of input
    elements, both flattened in the layout rule's order: outputs in order, each row-major
    (over ``data``: item after item); inputs (or parameters, in ``named_parameters()`` order)
    in order, each row-major. So row ``r`` of output ``i`` is ``y_i.reshape(-1)[r - o_i]`` with
    ``o_i`` the elements of the outputs before it, and ``(J.T @ u)[o_j : o_j + x_j.numel()]
    .reshape(x_j.shape)`` is input ``j``'s part. ``J @ v``: ``v [n] -> [m]``, ``V [n, k] ->
    [m, k]`` (forward mode, chunks of columns in one vectorised pass each); ``J.T @ u``:
    ``[m] -> [n]``, ``[m, k] -> [n, k]`` (one forward and batched backward passes); ``u @ J``
    is ``(J.T @ u.T).T``. Memory per product: one pass times a chunk, never ``m × n``. A block's
    product is the transposed view of ``[k, m]`` storage (each column contiguous); a block given
    as ``W.T`` of a contiguous ``W [k, n]`` is used without a copy.
    ``dtype``/``device``: the promoted dtype of inputs and outputs, the inputs' device; an
    operand must have both. Products are not differentiable.

    Constructors: ``JacobianOperator(func, inputs, *, batch_dim=None, chunk_size=None,
    max_memory=None)`` for ``func`` at ``inputs`` (called as in :func:`torchjac.jacobian`;
    ``inputs`` are copied when the operator is built); :meth:`from_module` (a module's
    parameters, over one batch or a whole data set); :meth:`from_graph` (tensors already
    computed). ``batch_dim`` declares independent samples (checked, ``BatchCouplingError``): the
    operator is still the full, block-diagonal ``J``, and ``to_dense`` then needs only the
    per-sample probes. ``chunk_size``: columns per vectorised pass (``1``: a loop); default from
    ``max_memory`` (bytes or ``"512MiB"``; default a share of the free memory).
    ``process_group`` (``__init__`` and :meth:`from_module`; every rank builds the operator
    with the same arguments and calls the same products): a block's columns are split over the
    group's ranks (balanced ranges), each rank applies the operator to its columns and every
    rank gets the whole product back; a vector is computed by every rank alone. ``to_dense``
    and ``gram`` products split the same way. Default ``None``: this process alone.
    Every evaluation uses the random draw of the moment the operator was built (dropout: one
    fixed ``J``); the model, its buffers and the global RNG state are left as found.

    ``J.to_dense()`` is the ``[m, n]`` matrix (the flattened :func:`torchjac.jacobian`,
    :func:`torchjac.param_jacobian` or :func:`torchjac.jac`); ``J.to_scipy()`` a
    ``scipy.sparse.linalg.LinearOperator`` in float64 (``svds``, ``lsmr``, ``eigsh``);
    ``J.gram()`` is ``J Jᵀ`` (``[m, m]``, as :func:`torchjac.gramian`) and ``J.T.gram()`` is
    ``Jᵀ J`` (``[n, n]``, the Gauss-Newton matrix), both applied as two products.

    Example:
        >>> import torch, torchjac as tj
        >>> J = tj.JacobianOperator(lambda x: x ** 2, torch.tensor([1.0, 2.0, 3.0]))
        >>> J.shape
        (3, 3)
        >>> J @ torch.ones(3)
        tensor([2., 4., 6.])
        >>> J.T @ torch.tensor([1.0, 0.0, 0.0])
        tensor([2., 0., 0.])
        >>> J.to_dense()
        tensor([[2., 0., 0.],
                [0., 4., 0.],
                [0., 0., 6.]])
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> batches = [torch.randn(5, 3), torch.randn(3, 3)]
        >>> P = tj.JacobianOperator.from_module(net, data=batches)
        >>> P.shape  # rows: 8 samples x 2 outputs; columns: 3*4 + 4 + 4*2 + 2 parameters
        (16, 26)
        >>> (P.T.gram() @ torch.ones(26)).shape  # Jᵀ J v
        torch.Size([26])
    """

    __slots__ = ("_batch", "_budget", "_chunk", "_group", "_source", "_transposed")

    def __init__(
        self,
        func: Any,
        inputs: Tensor | Iterable[Tensor] | Mapping[str, Tensor],
        *,
        batch_dim: int | None = None,
        chunk_size: int | None = None,
        max_memory: float | str | None = None,
        process_group: Any = None,
    ) -> None:
        chunk = check_chunk_size(_FN, chunk_size)
        group = check_process_group(_FN, process_group)
        parse_memory(_FN, max_memory)  # checked before func runs
        source, batch = func_source(_FN, func, inputs, batch_dim)
        self._init(source, chunk, memory_budget(_FN, max_memory, source.device), batch, False)
        self._group = group

    def _init(
        self,
        source: CallSource | GraphSource,
        chunk: int | None,
        budget: int,
        batch: tuple[Group, Group] | None,
        transposed: bool,
        group: Any = None,
    ) -> None:
        self._source, self._chunk, self._budget = source, chunk, budget
        self._batch, self._transposed, self._group = batch, transposed, group

    @classmethod
    def from_module(
        cls,
        model: nn.Module,
        *args: Any,
        params: Iterable[str | Tensor] | str | Tensor | None = None,
        data: Iterable[Any] | None = None,
        chunk_size: int | None = None,
        max_memory: float | str | None = None,
        process_group: Any = None,
        **kwargs: Any,
    ) -> JacobianOperator:
        """The Jacobian of ``model(*args, **kwargs)`` w.r.t. its parameters (``params`` as in
        :func:`torchjac.param_jacobian`; columns in ``named_parameters()`` order), read when
        each product runs. With ``data`` (a re-iterable such as a ``DataLoader`` with
        ``shuffle=False`` or a list, each item the model's positional arguments: a Tensor or
        a tuple; ``**kwargs`` go to every call), the rows of every item are stacked in order;
        the model runs once per item when the operator is built, then once per item, chunk
        and product. ``chunk_size``/``max_memory`` as in :class:`JacobianOperator`.

        >>> import torch, torchjac as tj
        >>> lin = torch.nn.Linear(2, 1)
        >>> J = tj.JacobianOperator.from_module(lin, torch.ones(4, 2))
        >>> J.to_dense()[0]  # d out / d (weight, bias)
        tensor([1., 1., 1.])
        """
        fn = f"{_FN}.from_module"
        chunk = check_chunk_size(fn, chunk_size)
        group = check_process_group(fn, process_group)
        parse_memory(fn, max_memory)  # checked before the model runs
        source = module_source(fn, model, args, params, data, kwargs)
        op = cls.__new__(cls)
        budget = memory_budget(fn, max_memory, source.device)
        op._init(source, chunk, budget, None, False, group)
        return op

    @classmethod
    def from_graph(
        cls,
        outputs: Tensor | Sequence[Tensor],
        inputs: Tensor | Iterable[Tensor] | Mapping[str, Tensor],
        *,
        chunk_size: int | None = None,
        max_memory: float | str | None = None,
    ) -> JacobianOperator:
        """The Jacobian of ``outputs`` (on the graph) w.r.t. ``inputs`` (requiring grad), as
        :func:`torchjac.jac`; an input the outputs do not use gives zero columns. The
        operator keeps the graph alive for as long as it lives.

        >>> import torch, torchjac as tj
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> J = tj.JacobianOperator.from_graph(x.sin(), x)
        >>> torch.allclose(J @ torch.ones(2), x.detach().cos())
        True
        """
        fn = f"{_FN}.from_graph"
        call = graph_call(
            fn,
            outputs,
            inputs,
            None,
            batch_dim=None,
            mode="auto",
            chunk_size=chunk_size,
            max_memory=max_memory,
            retain_graph=True,
            create_graph=False,
            allow_unused=True,
            unused_means="",
        )
        op = cls.__new__(cls)
        op._init(GraphSource(call.problem), call.chunk_size, call.budget, None, False)
        return op

    @property
    def shape(self) -> tuple[int, int]:
        m, n = self._source.n_rows, sum(self._source.col_sizes)
        return (n, m) if self._transposed else (m, n)

    @property
    def dtype(self) -> torch.dtype:
        return self._source.dtype

    @property
    def device(self) -> torch.device:
        return self._source.device

    @property
    def T(self) -> JacobianOperator:
        """The transposed operator (products ``Jᵀ @ U``); ``J.T.T`` is ``J`` again."""
        op = JacobianOperator.__new__(JacobianOperator)
        op._init(
            self._source, self._chunk, self._budget, self._batch, not self._transposed, self._group
        )
        return op

    def _name(self) -> str:
        return f"{_FN}.T" if self._transposed else _FN

    def __matmul__(self, x: Tensor) -> Tensor:
        x = check_operand(self._name(), x, self.shape[1], self.dtype, self.device)
        block = x.detach().reshape(x.shape[0], -1)
        src, chunk, budget = self._source, self._chunk, self._budget

        def local(b: Tensor) -> Tensor:
            return src.pull(b, chunk, budget) if self._transposed else src.push(b, chunk, budget)

        if self._group is None or block.shape[1] < 2:  # a vector: every rank computes it
            res = local(block)
        else:
            res = split_columns(self._name(), self._group, local, block, self.device)
        return res[:, 0] if x.dim() == 1 else res

    def __rmatmul__(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor) and x.dim() == 2:
            return (self.T @ x.T).T
        return self.T @ x

    def to_dense(self) -> Tensor:
        """The ``[m, n]`` matrix, from ``min(m, n)`` probes in chunks (per sample with
        ``batch_dim``: ``min(out, in)`` probes); see the class docstring."""
        if self._transposed:
            return self.T.to_dense().T
        if self._batch is not None:
            return dense_batched(self, *self._batch, self._budget)
        return dense_by_blocks(self, self._budget)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out; needs scipy)."""
        return scipy_operator(self, self._name())

    def gram(self) -> GramOperator:
        """``J Jᵀ`` (``[m, m]``) as an operator; ``J.T.gram()`` is ``Jᵀ J`` (``[n, n]``)."""
        return GramOperator(self)

    def __repr__(self) -> str:
        m, n = self.shape
        t = ".T" if self._transposed else ""
        return f"JacobianOperator{t}(shape=({m}, {n}), dtype={self.dtype}, device={self.device})"


@final
class GramOperator:
    """``A Aᵀ`` for a :class:`JacobianOperator` ``A``: ``G @ x = A @ (A.T @ x)`` (symmetric).

    >>> import torch, torchjac as tj
    >>> J = tj.JacobianOperator(lambda x: 2 * x, torch.zeros(2))
    >>> J.gram() @ torch.ones(2)
    tensor([4., 4.])
    """

    __slots__ = ("_a",)

    def __init__(self, a: JacobianOperator) -> None:
        self._a = a

    @property
    def shape(self) -> tuple[int, int]:
        return (self._a.shape[0], self._a.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self._a.dtype

    @property
    def device(self) -> torch.device:
        return self._a.device

    @property
    def T(self) -> GramOperator:
        return self

    def _name(self) -> str:
        return f"{self._a._name()}.gram()"

    def __matmul__(self, x: Tensor) -> Tensor:
        check_operand(self._name(), x, self.shape[1], self.dtype, self.device)
        return self._a @ (self._a.T @ x)

    def __rmatmul__(self, x: Tensor) -> Tensor:
        return (self @ x.T).T if isinstance(x, Tensor) and x.dim() == 2 else self @ x

    def to_dense(self) -> Tensor:
        """The ``[s, s]`` matrix, from products with blocks of the identity."""
        return dense_by_blocks(self, self._a._budget)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out; needs scipy)."""
        return scipy_operator(self, self._name())

    def __repr__(self) -> str:
        return f"GramOperator(shape={self.shape}, dtype={self.dtype})"
