"""``tj.ntk`` rejects bad arguments with messages naming the argument and the rule."""

from __future__ import annotations

import pytest
import torch
from ntk_cases import DT
from torch import nn

import torchjac as tj


def test_argument_errors(gen: torch.Generator) -> None:
    model = nn.Linear(3, 2).to(DT)
    x = torch.randn(4, 3, generator=gen, dtype=DT)
    with pytest.raises(TypeError, match=r"ntk: `model` must be a torch\.nn\.Module"):
        tj.ntk(lambda t: t, x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ntk: `x1` must be a torch\.Tensor or a tuple"):
        tj.ntk(model, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ntk: `x1\[1\]` must be a torch\.Tensor"):
        tj.ntk(model, [x, 2.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"ntk: every Tensor of `x1` needs the same batch size"):
        tj.ntk(model, (x, x[:2]))
    with pytest.raises(ValueError, match=r"ntk: x2 must be like x1: 1 Tensor\(s\)"):
        tj.ntk(model, x, (x, x))
    with pytest.raises(ValueError, match=r"ntk: `batch_dim=2` is out of range for x1"):
        tj.ntk(model, x, batch_dim=2)
    with pytest.raises(ValueError, match="ntk: `params` names 'nope'"):
        tj.ntk(model, x, params=["nope"])
    with pytest.raises(ValueError, match="ntk: no parameter of the model requires grad"):
        tj.ntk(nn.Linear(3, 2).requires_grad_(False), x.float())
    with pytest.raises(ValueError, match="ntk: the model maps x1 to per-sample outputs"):
        flat = nn.Sequential(nn.Linear(3, 2), nn.Flatten()).to(DT)
        tj.ntk(flat, torch.randn(2, 1, 3, dtype=DT), torch.randn(2, 2, 3, dtype=DT))
