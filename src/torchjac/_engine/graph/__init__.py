"""Jacobians and Gramians of tensors already on an autograd graph (``jac``, ``gramian``):
rows by vector-Jacobian products, columns by double backward, ghost products for Linear
weights, releasing the graph (NOTE [retain_graph]). Imports ``core`` and ``kernel``."""
