"""torch's vmapped ``jvp`` of ``index_fill`` with a tensor ``value`` drops the value's tangent.

``out.index_fill(0, idx, x[0])``: one ``jvp`` at a time is right (the filled positions move with
``x[0]``); under ``torch.vmap`` (as ``torch.func.jacfwd`` and ``sparse_jacobian``'s forward
probes run it) the tangent of ``x[0]`` is lost, and ``jacfwd`` returns 0 there. Reverse mode
is right. ``tj.sparse_jacobian(..., mode="fwd")`` returns yet other values (its colours mix
columns, each probe hit by the lost tangent); the check probe rides in the same vmapped pass.
A torch bug, not torchjac's; noted because the forward side of ``sparse_jacobian`` trusts
``vmap(jvp)`` (a fix would be a loop for ops known to be mis-batched).

Run: PYTHONPATH=src python repros/index_fill_vmapped_jvp.py
"""

import warnings

import torch

import torchjac as tj

warnings.simplefilter("ignore")
D = torch.float64
idx = torch.tensor([0, 2, 2])


def f(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(4, dtype=D).index_fill(0, idx, x[0]) * x[1]


x = torch.tensor([1.0, 2.0, 3.0], dtype=D)
seeds = torch.eye(3, dtype=D)


def push(t: torch.Tensor) -> torch.Tensor:
    return torch.func.jvp(f, (x,), (t,))[1]


print("jvp one at a time:\n", torch.stack([push(s) for s in seeds]).T)
print("vmap(jvp):\n", torch.vmap(push)(seeds).T)
print("reverse:\n", torch.autograd.functional.jacobian(f, x))
print("sparse_jacobian fwd:\n", tj.sparse_jacobian(f, x, mode="fwd").to_dense())
print("sparse_jacobian rev:\n", tj.sparse_jacobian(f, x, mode="rev").to_dense())
