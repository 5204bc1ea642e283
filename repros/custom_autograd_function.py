"""A ``torch.autograd.Function`` whose backward is not the derivative of its forward (a
straight-through estimator): ``sparsity_pattern`` sees only the forward's aten ops, here a
``zeros_like`` (a constant), and returns an empty pattern with no warning, while AD (dense
``jacfwd``/``jacrev``, and so ``sparse_jacobian``'s probes) uses the custom backward: identity.

``sparse_jacobian`` does raise (its check probe finds the nonzeros outside the pattern), so no
wrong Jacobian is returned; ``sparsity_pattern`` alone is silently wrong. The dispatch mode
sees no event for ``Function.apply`` (nor does a ``TorchFunctionMode``), so a fix needs either
the autograd graph (``grad_fn`` of class ``BackwardCFunction`` on the detection call's graph,
which ``sparsity_pattern`` does not build) or a hook on ``Function.apply``.

Run: PYTHONPATH=src python repros/custom_autograd_function.py
"""

import torch

import torchjac as tj


class StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u):  # type: ignore[no-untyped-def]
        return (u > 0).to(u.dtype)  # a step: zero derivative as written

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g  # straight through: identity


def f(u: torch.Tensor) -> torch.Tensor:
    return StraightThrough.apply(u) * 2


x = torch.randn(5, dtype=torch.float64)
pattern = tj.sparsity_pattern(f, x).to_dense()
dense = torch.autograd.functional.jacobian(f, x)
print("pattern entries:", int(pattern.sum()), " AD nonzeros:", int((dense != 0).sum()))
print("missed:", int(((dense != 0) & ~pattern).sum()))
try:
    tj.sparse_jacobian(f, x)
except ValueError as e:
    print("sparse_jacobian raised:", str(e)[:100])
