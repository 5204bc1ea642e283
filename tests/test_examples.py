"""Every script of ``examples/`` runs as a user would run it, checks itself and says ``ok``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script -> what its output must contain besides the final "ok"
EXPECTED = {
    "gauss_newton_lsmr.py": "first step: lsmr vs dense normal equations",
    "grad_jacobian.py": "max |tj.jac - row loop|",
    "jacobian_operator_svd.py": "max relative difference",
    "multitask_gramian.py": "no task is harmed",
    "ntk_distributed.py": "top eigenvalues, split over ranks",
    "newton_bratu.py": "Newton iterations: sparse",
    "ntk_spectrum.py": "symmetric and positive semi-definite: True",
    "pinn_poisson.py": "relative L2 error against the exact solution",
}


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


# run with their own checks elsewhere: the figure below, JacobianOperator's examples in
# tests/test_examples_jacobian_operator.py
OWN_TESTS = {"ntk_spectrum.py", "gauss_newton_lsmr.py", "jacobian_operator_svd.py"}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(set(EXPECTED) - OWN_TESTS))
def test_example_runs_and_checks_itself(script: str) -> None:
    done = _run(script)
    assert done.returncode == 0, done.stdout + done.stderr
    assert EXPECTED[script] in done.stdout
    assert done.stdout.rstrip().endswith("ok"), done.stdout


@pytest.mark.slow
def test_ntk_example_writes_its_figure(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the `bench` extra; absent from the compatibility run
    out = tmp_path / "spectrum.png"
    done = _run("ntk_spectrum.py", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert EXPECTED["ntk_spectrum.py"] in done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert done.stdout.rstrip().endswith("ok"), done.stdout
