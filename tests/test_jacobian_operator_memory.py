"""``JacobianOperator`` products never store ``J``: peak RSS growth in a fresh subprocess (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# MLP 64→256→256→10 (85,002 parameters) over 4,096 samples in 8 batches: J is 40,960 x 85,002,
# 13.9 GB in float32. Each product needs one batch's pass times a chunk of columns.
SCRIPT = textwrap.dedent(
    """
    import json, re, threading, time
    import torch
    from torch import nn
    from torch.func import functional_call, jvp
    import torchjac as tj

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )
    batches = list(torch.randn(4096, 64).split(512))
    params = {k: p.detach() for k, p in model.named_parameters()}
    n = sum(p.numel() for p in params.values())
    V = torch.randn(n, 8)
    U = torch.randn(4096 * 10, 8)

    def rss_kib(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\\s+(\\d+)", f.read()).group(1))

    def reference_jv():  # one column, by hand, batch by batch
        tans, o = {}, 0
        for k, p in params.items():
            tans[k] = V[o : o + p.numel(), 0].reshape(p.shape)
            o += p.numel()
        f = lambda b: lambda q: functional_call(model, q, (b,))
        return torch.cat([jvp(f(b), (params,), (tans,))[1].reshape(-1) for b in batches])

    J = tj.JacobianOperator.from_module(model, data=batches, max_memory="64MiB")
    JV = J @ V[:, :1]  # warm up (lazy imports, allocator)
    want = reference_jv()
    err = ((JV[:, 0] - want).abs().max() / want.abs().max()).item()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = rss_kib("VmRSS")
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib("VmRSS"))
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    JV = J @ V
    JTU = J.T @ U
    done.set()
    thread.join()
    top = max(peak[0], rss_kib("VmHWM"))
    dots = ((JV * U).sum() - (V * JTU).sum()).abs() / (JV * U).abs().sum()
    print(json.dumps({
        "growth_mib": (top - baseline) / 1024,
        "dense_mib": J.shape[0] * J.shape[1] * 4 / 2**20,
        "shapes": [list(JV.shape), list(JTU.shape)],
        "rel_err": err,
        "adjoint_err": dots.item(),
    }))
    """
)


def test_products_over_a_data_set_stay_far_below_the_jacobian() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["shapes"] == [[40960, 8], [85002, 8]], out
    assert out["rel_err"] < 1e-5 and out["adjoint_err"] < 1e-5, out  # <J V, U> == <V, Jᵀ U>
    # the results (1.3 + 2.7 MB), a batch's passes times a chunk, with generous slack; J: 13 GiB
    assert out["growth_mib"] < 300, out
    assert out["dense_mib"] >= 20 * 300, out
