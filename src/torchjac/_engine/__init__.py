"""The probe engine: plan (mode, chunk size, memory), basis (lazy one-hot), run (vmap, fallback).

Front doors turn a user's question into probes and shape the answer; they never probe by hand.
The families, each a subpackage importing only those before it: ``core`` (plan, basis, run, the
fast-path switch, structure), ``kernel`` (dense kernels), ``graph`` (``jac``, ``gramian``),
``taylor`` (forward Taylor mode), ``modules`` (``param_jacobian``, ``ntk``), ``func`` (function
Jacobians and second derivatives) and ``sparse`` (``sparse_jacobian``);
``tests/core/test_layout.py`` holds them to that order. The tests mirror the families.
"""
