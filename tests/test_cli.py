"""The ``torchjac`` command in a subprocess: help, ``demo --small`` and ``bench --quick``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchjac.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torchjac", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_explains_each_subcommand(tmp_path: Path) -> None:
    done = _run("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout and "bench" in done.stdout
    for sub, words in (("demo", "seed"), ("bench", "--workloads")):
        sub_help = _run(sub, "--help", cwd=tmp_path)
        assert sub_help.returncode == 0, sub_help.stderr
        assert words in sub_help.stdout


def test_parser_rejects_bad_threads() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--threads", "0"])


def test_unknown_workload_is_a_clear_error(tmp_path: Path) -> None:
    done = _run("bench", "--workloads", "W99", cwd=ROOT)
    assert done.returncode == 2
    assert "unknown workload(s) W99" in done.stderr


@pytest.mark.slow
def test_bench_quick_prints_the_table_and_saves_json_and_plot(tmp_path: Path) -> None:
    plot, data = tmp_path / "bench.png", tmp_path / "bench.json"
    args = ("bench", "--quick", "--small", "--workloads", "W4", "--no-progress", "--threads", "1")
    done = _run(*args, "--json", str(data), "--plot", str(plot), cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| workload | strategy | median ms | ratio to best peer | check |" in done.stdout
    lines = [line for line in done.stdout.splitlines() if line.startswith("| W4 |")]
    assert any("tj.jac" in line and "| ok" in line for line in lines), done.stdout
    assert any("hand-written columns" in line for line in lines)
    rows = json.loads(data.read_text())["rows"]
    assert {r["workload"] for r in rows} == {"W4"}
    mine = [r for r in rows if r["torchjac"]]
    assert mine and mine[0]["median_ms"] > 0 and mine[0]["max_diff"] < 1e-3
    assert _is_png(plot)


@pytest.mark.slow
def test_demo_small_prints_the_table_and_saves_the_figure(tmp_path: Path) -> None:
    done = _run("demo", "--small", "--out", "demo.png", "--threads", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| seed | problem | seed's method |" in done.stdout
    for seed in ("000", "001", "002", "003", "004"):
        assert f"| {seed} |" in done.stdout
    assert "DISAGREE" not in done.stdout
    assert "| agree" in done.stdout
    assert _is_png(tmp_path / "demo.png")
