"""No warning of torch's own reaches the user through torchjac's internal calls.

Each public function's first call runs in a process of its own (torch issues some warnings once
per process, e.g. ``torch.jit.script``'s deprecation when forward AD loads its decompositions: a
``DeprecationWarning`` in torch 2.13, a ``FutureWarning`` from 2.14), with every warning an error
from the moment torch is imported; and so do the README's examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One process imports torch and torchjac; each case runs in a child forked from it, so each call is
# the first of its process (torch issues some warnings once per process).
_SCRIPT = """
import doctest, json, os, sys, traceback, warnings
import torch
torch.set_num_threads(1)
warnings.simplefilter("error")
import torchjac as tj
from torch import nn

def case(code):
    x = torch.randn(4, 3, requires_grad=True)
    f = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    if code == "README":
        res = doctest.testfile(sys.argv[1], module_relative=False)
        assert res.attempted > 0 and res.failed == 0, res
    else:
        exec(code)

failed = {}
for name, code in json.loads(sys.argv[2]).items():
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            case(code)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed[name] = status
print(json.dumps(failed))
"""

FIRST_CALLS = {
    "jac_rev": "tj.jac(f(x), x, mode='rev')",
    "jac_fwd": "tj.jac(f(x), x, mode='fwd')",
    "gramian": "tj.gramian(f(x).sum(0), list(f.parameters()))",
    "jacobian_rev": "tj.jacobian(f, x.detach(), batch_dim=0, mode='rev')",
    "jacobian_fwd": "tj.jacobian(f, x.detach(), batch_dim=0, mode='fwd')",
    "jacobian_full": "tj.jacobian(f, x.detach())",
    "hessian": "tj.hessian(f, x.detach(), batch_dim=0)",
    "hessian_diagonal": "tj.hessian_diagonal(f, x.detach(), batch_dim=0)",
    "laplacian": "tj.laplacian(f, x.detach(), batch_dim=0)",
    "param_jacobian": "tj.param_jacobian(f, x.detach(), batch_dim=0)",
    "param_jacobian_full": "tj.param_jacobian(f, x.detach())",
    "ntk": "tj.ntk(f, x.detach())",
    # each place the engine runs forward mode (core.func_call.forward_jvp) loads torch's
    # forward-AD decompositions itself, quietly (NOTE [first call])
    "taylor_general_rule": (
        "tj.laplacian(lambda z: torch.logsumexp(z, -1), x.detach(), batch_dim=0)"
    ),
    "jacobian_jvp_columns": (
        "tj.jacobian(lambda z: z.sin().cumsum(-1), x.detach(), mode='fwd', chunk_size=2)"
    ),
    "hessian_forward_over_reverse": (
        "tj.hessian(lambda z: z.sin().cumsum(-1).sum(), x.detach(), mode='fwd', chunk_size=2)"
    ),
    "sparse_jacobian_fwd": "tj.sparse_jacobian(torch.sin, x.detach().flatten(), mode='fwd')",
    "operator_matvec": "J = tj.JacobianOperator(f, x.detach()); J @ torch.ones(J.shape[1])",
    "README": "README",  # its examples, in order, as a user runs them
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the cases run in forked children")
def test_first_calls_and_the_readme_warn_nothing() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(readme), json.dumps(FIRST_CALLS)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failed = json.loads(done.stdout.strip().splitlines()[-1])
    assert failed == {}, f"{failed}\n{done.stderr[-6000:]}"
