"""``tj.ntk`` peak memory, measured in a subprocess, stays far below the size of the Jacobian."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch, torchjac as tj
    from torch import nn
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1536), nn.ReLU(), nn.Linear(1536, 1536), nn.ReLU(),
                          nn.Linear(1536, 8)).double()
    x = torch.randn(16, 64, dtype=torch.float64)
    p = sum(t.numel() for t in model.parameters())
    j_bytes = 16 * 8 * p * 8
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    k = tj.ntk(model, x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert k.shape == (16, 8, 16, 8)
    print(after - before, j_bytes)
    """
)


@pytest.mark.slow
def test_peak_memory_is_far_below_the_jacobian() -> None:
    """J is N·C·P float64 (~2.5 GB here); the kernel needs activations and δ only."""
    res = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    growth, j_bytes = map(int, res.stdout.split())
    assert j_bytes > 300 * 2**20
    assert growth < j_bytes / 10, (growth, j_bytes)
