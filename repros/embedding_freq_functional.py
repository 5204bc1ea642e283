"""Open: ``F.embedding(..., scale_grad_by_freq=True)`` in a functional forward, per sample.

torch's derivative divides a row's gradient by its index's count in the whole call. The full
``param_jacobian`` (no ``batch_dim``) follows it; with ``batch_dim=0`` the weight is not under a
closed form (no ``nn.Embedding`` module) and goes to the general path, ``vmap`` over samples,
where torch counts per sample: the two disagree (0.075 here). ``nn.Embedding`` is consistent
(its closed form divides by the whole call's counts).

Run: PYTHONPATH=src python repros/embedding_freq_functional.py
"""

import torch
import torch.nn.functional as F
from torch import nn

import torchjac as tj

torch.manual_seed(0)


class Fe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 2, dtype=torch.float64))
        self.lin = nn.Linear(4, 1).double()

    def forward(self, i: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(F.embedding(i, self.w, scale_grad_by_freq=True)).flatten(1))


model, idx = Fe(), torch.tensor([[0, 2], [2, 1]])
full = tj.param_jacobian(model, idx)["w"]
per_sample = tj.param_jacobian(model, idx, batch_dim=0)["w"]
print("max |per-sample - full| =", (per_sample - full).abs().max().item())
assert torch.allclose(per_sample, full), "per-sample rows use per-sample counts"
