"""Normalisation layers written out wherever torch's fused kernels differentiate wrongly.

NOTE [exact norms]: torch's fused ``layer_norm``, ``batch_norm`` with batch statistics and
``instance_norm`` save their mean and inverse standard deviation without autograd history, and
their double backward treats them as constants beyond what its formula covers (pytorch issues
175754 and 186256): mixed second derivatives (a norm's weight and its input) and every
derivative of order 3 are wrong, silently, with the forward values right (measured on torch 2.13:
``d²/dw dx`` of a ``layer_norm`` off by the size of the entries themselves). Second derivatives
of pure inputs and the first order are right. So wherever torchjac evaluates the function itself
and a derivative of order 2 or more of it will be taken — the nested-AD path of ``hessian``,
``hessian_diagonal`` and ``laplacian``, and every call with ``create_graph=True`` (the result's
own derivative adds an order) — it runs the function under :func:`exact_norms`, a torch function
mode that computes those three layers from means, products and ``rsqrt`` (``taylor_decomp``, the
forms the Taylor mode uses for the same reason): same values to rounding, every derivative
right. The decomposed batch norm does not update running statistics, which NOTE [module state]
restores after every call anyway. ``jac``/``gramian`` differentiate a graph the user already
built: there the fused kernels stay; with ``create_graph=True`` they warn when the graph holds
one (``warn_fused_norms``), and docs/limits.md says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode

from torchjac._engine.taylor.taylor_decomp import DECOMPOSITIONS, GRAPH_DECOMPOSITIONS

__all__ = ["exact_norms", "fused_norm", "fused_norms", "warn_fused_norms"]


class _ExactNorms(TorchFunctionMode):
    """Calls of the fused normalisations become their decompositions (and with ``graph``, the
    vector norms: NOTE [vector norms with create_graph]); the rest runs as is."""

    def __init__(self, graph: bool) -> None:
        super().__init__()
        self.graph = graph

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        decomposition = DECOMPOSITIONS.get(func)
        if decomposition is not None:
            return decomposition(*args, **kwargs)
        if self.graph:
            decomposition = GRAPH_DECOMPOSITIONS.get(func)
            if decomposition is not None:
                out = decomposition(*args, **kwargs)
                if out is not NotImplemented:
                    return out
        return func(*args, **kwargs)


def exact_norms(graph: bool = False) -> _ExactNorms:
    """A context manager: NOTE [exact norms] for the code it runs; ``graph`` (a call with
    ``create_graph``): NOTE [vector norms with create_graph] too."""
    return _ExactNorms(graph)


def fused_norm(node: Any) -> str | None:
    """The fused normalisation of NOTE [exact norms] an autograd node runs, or ``None``."""
    name = type(node).__name__
    if "LayerNormBackward" in name:
        return "layer_norm"
    if "BatchNormBackward" in name and getattr(node, "_saved_training", True):
        return "batch_norm with batch statistics"
    return None


def fused_norms(outputs: Sequence[Tensor]) -> set[str]:
    """Every :func:`fused_norm` on the graph of ``outputs`` (one walk over all of it, nodes keyed
    by themselves: NOTE [node identity])."""
    found: set[str] = set()
    stack = [y.grad_fn for y in outputs if y.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        norm = fused_norm(node)
        if norm is not None:
            found.add(norm)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return found


def warn_fused_norms(fn: str, found: Collection[str]) -> None:
    """``create_graph=True`` on a graph the user built: warn if a derivative of the result goes
    through a fused normalisation (``found``, from :func:`fused_norm` on its nodes), which
    torchjac cannot rewrite there (NOTE [exact norms])."""
    if found:
        warnings.warn(
            f"{fn}: create_graph=True, and the outputs were computed with torch's fused "
            f"{' and '.join(sorted(found))}, whose derivatives of order 3, and mixed ones of order "
            "2 (its weight and its input), are wrong in torch (pytorch issues 175754 and 186256): "
            "derivatives of this result may be too. Compute the normalisation from elementary "
            "ops (mean, rsqrt) to differentiate the result exactly; tj.jacobian and tj.hessian "
            "on the function do that themselves.",
            UserWarning,
            stacklevel=4,
        )
