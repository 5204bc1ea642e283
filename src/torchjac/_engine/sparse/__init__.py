"""Sparse Jacobians (``sparsity_pattern``, ``sparse_jacobian``): index sets traced through the
ops, colourings and the compressed probes. Imports ``core`` and ``func``."""
