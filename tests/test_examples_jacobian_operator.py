"""The two ``JacobianOperator`` scripts of ``examples/`` run and print their checked results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str) -> str:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_svd_example_matches_the_dense_svd() -> None:
    out = _run("jacobian_operator_svd.py")
    assert "J: 12288 rows (4096 samples x 3 outputs) x 1443 parameters" in out
    assert "max relative difference" in out and out.rstrip().endswith("ok")


def test_gauss_newton_example_converges() -> None:
    out = _run("gauss_newton_lsmr.py")
    assert "first step: lsmr vs dense normal equations" in out
    assert out.rstrip().endswith("ok")
