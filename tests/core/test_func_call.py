"""A call's one-off costs: torch's forward-AD decompositions load only when forward mode runs.

Importing ``torch._decomp.decompositions_for_jvp`` scripts a dozen functions with ``torch.jit``
(about 100-230 ms, once per process; NOTE [first call]). Each case runs as the first call of a
process of its own (a child forked from one that imported torch and torchjac): a call that needs
no forward mode must not load them, and one that does must (so the check can see a load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
import torchjac as tj
from torch import nn

class Net(nn.Module):  # a module class with a functional forward
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)

assert "torch._decomp.decompositions_for_jvp" not in sys.modules
loaded = {}
for name, code in json.loads(sys.argv[1]).items():
    sys.stdout.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        x = torch.randn(4, 3)
        f, net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), Net()
        exec(code)
        os.write(write, b"1" if "torch._decomp.decompositions_for_jvp" in sys.modules else b"0")
        os._exit(0)
    os.close(write)
    got = os.read(read, 1)
    os.waitpid(pid, 0)
    loaded[name] = {b"1": True, b"0": False}.get(got, "failed")
print(json.dumps(loaded))
"""

NO_FORWARD_MODE = {
    "jacobian, nn.Sequential": "tj.jacobian(f, x, batch_dim=0)",
    "jacobian, module class": "tj.jacobian(net, x, batch_dim=0)",
    "jacobian, lambda slicing": "tj.jacobian(lambda z: f(z)[..., :1], x, batch_dim=0)",
    "jacobian, whole batch": "tj.jacobian(net, x)",
    "hessian, module class": "tj.hessian(net, x, batch_dim=0)",
    "laplacian, module class": "tj.laplacian(net, x, batch_dim=0)",
    "hessian_diagonal, lambda": "tj.hessian_diagonal(lambda z: f(z)[..., :1], x, batch_dim=0)",
    "param_jacobian, module class": "tj.param_jacobian(net, x, batch_dim=0)",
    "ntk, module class": "tj.ntk(net, x)",
    "jac": "xg = x.requires_grad_(); tj.jac(net(xg), xg)",
}
FORWARD_MODE = {
    "jacobian, jvp columns": (
        "tj.jacobian(lambda z: z.sin().cumsum(-1), x, mode='fwd', chunk_size=2)"
    )
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the cases run in forked children")
def test_forward_ad_decompositions_load_only_for_forward_mode() -> None:
    cases = {**NO_FORWARD_MODE, **FORWARD_MODE}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == {name: name in FORWARD_MODE for name in cases}, done.stderr[-3000:]
