"""Reverse-mode Jacobian of a gradient through a fused norm kernel: wrong with batched grads.

``g = torch.func.grad(E)`` with ``E`` through ``F.group_norm`` (``layer_norm`` and ``batch_norm``
in training, also run below, come out right on torch 2.13) is a function whose graph holds
``native_group_norm_backward``; its Jacobian (a Hessian) by reverse mode pulls cotangents back
through that node's own backward. With ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap
over the autograd engine) torch returns wrong rows; one cotangent at a time is right, as are
forward mode and ``torch.func.jacrev``. ``tj.jacobian(g, x, mode="rev")`` and
``tj.sparse_jacobian(g, x, mode="rev")`` (and ``"auto"`` where it picks reverse) batch their
pullbacks and return the wrong Jacobian silently (the sparse check probe rides in the same
batched pass, so it agrees). ``chunk_size=1`` (a loop) gives the right one.

The DESIGN's nested-AD path already writes these layers out for second derivatives of
``jacobian``/``hessian``; a ``func`` that computes a gradient itself is not covered. A fix
belongs in the core engine (detect such nodes on the probed graph and pull back one cotangent at
a time, or write the layers out), not only in the sparse path.

Run: PYTHONPATH=src python repros/batched_double_backward_norms.py
"""

import warnings

import torch
import torch.nn.functional as F

import torchjac as tj

warnings.simplefilter("ignore")
D = torch.float64
norms = {
    "group_norm": lambda u: F.group_norm(u.reshape(1, 4, 2), 2),
    "layer_norm": lambda u: F.layer_norm(u.reshape(2, 4), (4,)),
    "batch_norm_train": lambda u: F.batch_norm(u.reshape(4, 2), None, None, training=True),
}
for name, norm in norms.items():

    def energy(u: torch.Tensor, norm=norm) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return norm(u).sin().sum()

    g = torch.func.grad(energy)
    x = torch.randn(8, dtype=D, generator=torch.Generator().manual_seed(0))
    H = torch.autograd.functional.jacobian(g, x)  # rows one at a time: right
    leaf = x.detach().requires_grad_(True)
    y = g(leaf)
    V = torch.eye(8, dtype=D)
    batched = torch.autograd.grad(y, leaf, V, retain_graph=True, is_grads_batched=True)[0]
    print(f"{name}: torch batched grads vs H {(batched - H).abs().max().item():.3g}")
    for mode in ("rev", "fwd"):
        dense = tj.jacobian(g, x, mode=mode)
        sparse = tj.sparse_jacobian(g, x, mode=mode).to_dense()
        print(
            f"   {mode}: tj.jacobian {(dense - H).abs().max().item():.3g}, "
            f"tj.sparse_jacobian {(sparse - H).abs().max().item():.3g}"
        )
    loop = tj.sparse_jacobian(g, x, mode="rev", chunk_size=1).to_dense()
    print(f"   rev chunk_size=1: tj.sparse_jacobian {(loop - H).abs().max().item():.3g}")
