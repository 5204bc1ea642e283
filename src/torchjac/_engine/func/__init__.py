"""Jacobians and second derivatives of functions (``jacobian``, ``hessian``,
``hessian_diagonal``, ``laplacian``): the probes of a function call and the second-order plans.
Imports ``core`` and ``taylor``."""
