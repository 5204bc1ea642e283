"""torchjac: every Jacobian a PyTorch user needs, exact and fast.

>>> import torch, torchjac as tj
>>> x = torch.tensor([1.0, 2.0], requires_grad=True)
>>> tj.jac(x**2, x)
tensor([[2., 0.],
        [0., 4.]])
"""

from torchjac._errors import BatchCouplingError, FallbackWarning
from torchjac._functional import hessian, hessian_diagonal, jacobian, laplacian
from torchjac._gramian import gramian
from torchjac._graph import jac
from torchjac._modules import param_jacobian
from torchjac._ntk import ntk
from torchjac._operator import JacobianOperator
from torchjac._sparse import sparse_jacobian, sparsity_pattern

__version__ = "0.1.0"

__all__ = [
    "BatchCouplingError",
    "FallbackWarning",
    "JacobianOperator",
    "__version__",
    "gramian",
    "hessian",
    "hessian_diagonal",
    "jac",
    "jacobian",
    "laplacian",
    "ntk",
    "param_jacobian",
    "sparse_jacobian",
    "sparsity_pattern",
]
