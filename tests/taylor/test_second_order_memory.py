"""Peak memory of the Taylor mode, measured in a subprocess, is linear in the input size."""

from __future__ import annotations

import pytest

_MEMORY_SCRIPT = """
import resource, sys, torch, torchjac as tj
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                          torch.nn.Tanh(), torch.nn.Linear(256, 1))
x = torch.randn(512, 64)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
getattr(tj, sys.argv[1])(net, x, batch_dim=0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


@pytest.mark.slow
@pytest.mark.parametrize("fn", ["laplacian", "hessian_diagonal"])
def test_peak_memory_is_linear_in_the_input_size(fn: str) -> None:
    """B=512, D=64, width 256: per-sample Hessians would hold B·D²·256 floats per layer (2 GiB);
    the Taylor mode holds O(B·D·256) per layer. Peak RSS growth, in a fresh process."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, fn], capture_output=True, text=True, check=True
    )
    assert int(out.stdout.strip()) < 600, out.stdout  # MiB
