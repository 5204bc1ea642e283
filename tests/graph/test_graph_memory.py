"""``tj.jac`` keeps memory bounded: peak RSS growth measured in a fresh subprocess (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# y = tanh(W @ x), W 20000 x 400 (float32). An unchunked one-hot basis alone would be
# 20000 x 20000 x 4 B = 1.6 GB; the Jacobian itself is 32 MB.
SCRIPT = textwrap.dedent(
    """
    import json, re, sys, threading, time
    import torch
    import torchjac as tj

    torch.set_num_threads(1)
    mode, rows, cols, budget, shape = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:]

    def rss_kib(field):
        with open("/proc/self/status") as f:
            return int(re.search(field + r":\\s+(\\d+)", f.read()).group(1))

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, cols, generator=gen) / 20
    x = torch.randn(cols, generator=gen).requires_grad_()
    if shape == "vector":
        y = torch.tanh(w @ x)
    else:  # a row vector: x @ W.T is a matrix product (vmap batches it well)
        x = x.detach()[None].requires_grad_()
        y = torch.tanh(x @ w.T)
    expected = (1 - y.detach().reshape(-1) ** 2)[:, None] * w  # closed form: diag(1 - y^2) W

    try:  # reset the high-water mark (Linux >= 4.0); the sampler covers other kernels
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm = True
    except OSError:
        hwm = False
    baseline = rss_kib("VmRSS")
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib("VmRSS"))
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)  # never keeps a failed run alive
    thread.start()
    t0 = time.perf_counter()
    try:
        jac = tj.jac(y, x, mode=mode, max_memory=budget)
    finally:  # a raising call ends the sampler too: the process exits with the traceback
        done.set()
        thread.join()
    seconds = time.perf_counter() - t0
    top = max(peak[0], rss_kib("VmHWM") if hwm else 0)
    shape_got = list(jac.shape)
    err = (jac.reshape(rows, cols) - expected).abs().max().item() / expected.abs().max().item()
    print(json.dumps({
        "growth_mib": (top - baseline) / 1024,
        "rel_err": err,
        "shape": shape_got,
        "dtype": str(jac.dtype),
        "seconds": seconds,
        "hwm": hwm,
    }))
    """
)


# glibc's malloc raises its mmap threshold each time a large block is freed, after which blocks
# of a chunk's size come from the heap and stay resident when freed: RSS then counts what the
# allocator keeps as well as what is live, and a run measured ~55 or ~102 MiB at random. A fixed
# threshold (128 KiB, glibc's default start) maps every large block and returns it on free.
_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def _run(mode: str, rows: int, cols: int, max_memory: str, shape: str = "vector") -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(rows), str(cols), max_memory, shape],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=_ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_is_bounded_by_max_memory() -> None:
    out = _run("auto", 20000, 400, "64MiB")
    assert out["shape"] == [20000, 400] and out["dtype"] == "torch.float32"
    assert out["rel_err"] < 1e-5, out
    # the result (32 MB) plus a 64 MiB probe budget, with generous slack; 1.6 GB unchunked
    assert out["growth_mib"] < 400, out


def test_rows_are_chunked_under_max_memory() -> None:
    # reverse mode, 8000 rows: an unchunked one-hot basis would be 8000 x 8000 x 4 B = 256 MB
    out = _run("rev", 8000, 50, "16MiB", "row")
    assert out["shape"] == [1, 8000, 1, 50]
    assert out["rel_err"] < 1e-5, out
    assert out["growth_mib"] < 100, out


def test_a_raising_call_fails_the_run_at_once() -> None:
    """The sampler thread does not keep a failed subprocess alive until the timeout."""
    with pytest.raises(AssertionError, match=r"ValueError: jac: `mode` must be"):
        _run("sideways", 10, 10, "16MiB")
