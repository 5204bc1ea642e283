"""All workloads, in order, and selection by key (``W5`` selects W5 and W5b-d; ``W5b`` only W5b)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from benchmarks._harness import Case, Workload

__all__ = ["MODULES", "all_workloads", "select"]

_VARIANTS = "ABCD"  # W5 selects W5, W5b, W5c and W5d

MODULES = (
    "w1_batch_jacobian",
    "w2_pinn",
    "w3_param_jacobian",
    "w4_grad_jacobian",
    "w5_multitask",
    "w5_sweep",
    "w6_ntk",
    "w7_laplacian",
    "w8_operator_svd",
    "w8_products",
    "w9_sparse_bratu",
)


def _broken(name: str, exc: Exception) -> Workload:
    def build(small: bool) -> Case:
        raise RuntimeError(f"benchmarks.{name} failed to import: {exc}") from exc

    key = "W" + name[1 : name.index("_")]
    return Workload(key, f"benchmarks.{name}", build)


def all_workloads() -> list[Workload]:
    """Every workload of every module (a module that fails to import gives an error row)."""
    found: list[Workload] = []
    for name in MODULES:
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except Exception as exc:
            found.append(_broken(name, exc))
            continue
        found.extend(module.WORKLOADS)
    return found


def select(workloads: Sequence[Workload], keys: Sequence[str] | None) -> list[Workload]:
    """The workloads named by ``keys`` (case-insensitive); a bare number selects its variants."""
    if not keys:
        return list(workloads)
    wanted = [k.strip().upper() for k in keys if k.strip()]
    chosen = [
        w for w in workloads if w.key.upper() in wanted or w.key.upper().rstrip(_VARIANTS) in wanted
    ]
    unknown = [
        k
        for k in wanted
        if not any(k in (w.key.upper(), w.key.upper().rstrip(_VARIANTS)) for w in workloads)
    ]
    if unknown:
        known = ", ".join(w.key for w in workloads)
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {known}")
    return chosen
