"""Fused attention kernels have no second derivative: where one is needed, use the math kernel.

NOTE [fused attention]: ``F.scaled_dot_product_attention`` picks a fused kernel when it can (on a
CPU in torch 2.13: flash attention for 4-d inputs, float32 and float64 alike). Its backward is
not differentiable (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
is not implemented``), nor does it have forward-mode AD, so a Hessian through it fails. Where
torchjac calls the function itself and needs second derivatives (``hessian``,
``hessian_diagonal``, ``laplacian``, and ``JacobianOperator``'s products, whose ``J @ V`` is forward
mode or a double backward) it runs it under ``sdpa_kernel(SDPBackend.MATH)``, whose
operations (matrix products, softmax) differentiate to any order and give the same values to
floating point. The backend flags are process-wide in torch: they are restored on exit, and
attention run by another thread meanwhile takes the math kernel too (same values). On a graph
that already exists (``jac``/``gramian`` columns by double backward) the kernel is chosen; the
error or fallback warning then names the fix.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["FIX", "math_attention", "names_fused_attention"]

FIX = (
    "scaled_dot_product_attention's fused kernel has no second derivative: run the forward "
    "under torch.nn.attention.sdpa_kernel(SDPBackend.MATH)"
)
_FUSED = ("_scaled_dot_product_", "_flash_attention", "_efficient_attention")


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """``sdpa_kernel(SDPBackend.MATH)`` (a no-op where torch lacks it)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 is outside the supported range
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def names_fused_attention(err: BaseException) -> bool:
    """Whether ``err`` is a fused attention kernel's missing derivative."""
    text = str(err)
    return any(k in text for k in _FUSED) and "not implemented" in text.lower()
