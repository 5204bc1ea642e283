"""Forward-mode Taylor propagation for the second-order functions (``hessian``,
``hessian_diagonal``, ``laplacian``) and the per-sample Jacobian of a chain: jets, their rules,
the batch proof (NOTE [batch proof]) and the chain read from a function's ops (NOTE [chain from
operations]). Imports ``core`` and ``kernel``."""
