"""The ``torchjac`` command in a subprocess: help, ``demo --small`` and ``bench --quick``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchjac.cli import build_parser, main

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


def test_python_m_help_explains_each_subcommand(tmp_path: Path) -> None:
    done = _run("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage: torchjac" in done.stdout
    assert "demo" in done.stdout and "bench" in done.stdout


@pytest.mark.parametrize(("sub", "words"), [("demo", "--small"), ("bench", "--workloads")])
def test_subcommand_help(sub: str, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([sub, "--help"])
    assert exit_.value.code == 0
    assert words in capsys.readouterr().out


def test_parser_rejects_bad_threads() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--threads", "0"])


def test_unknown_workload_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--workloads", "W99"])
    assert exit_.value.code == 2
    assert "unknown workload(s) W99" in capsys.readouterr().err


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


def test_console_script_runs(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "torchjac"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: torchjac" in done.stdout


def test_harness_rows_for_missing_peers_placeholders_and_wrong_results() -> None:
    from torchjac._bench import _import, find_benchmarks

    h = _import("_harness", find_benchmarks())
    reference = torch.arange(6.0).view(2, 3)

    def placeholder(_: object) -> None:
        raise NotImplementedError("not landed")

    def broken(_: object) -> None:
        raise RuntimeError("out of memory\nmore")

    strategies = [
        h.Strategy("peer ok", lambda _: reference.clone()),
        h.Strategy("peer slower", lambda _: (reference * 1.0).clone()),
        h.Strategy("peer missing", lambda _: reference, requires=("no_such_module_xyz",)),
        h.Strategy("peer broken", broken),
        h.Strategy("peer wrong", lambda _: reference + 1),
        h.Strategy("peer wrong shape", lambda _: reference.T),
        h.Strategy("tj placeholder", placeholder, torchjac=True),
        h.Strategy("tj ok", lambda _: {"a": reference.clone()}, torchjac=True),
    ]
    workload = h.Workload("W0", "toy", lambda small: h.Case(reference, strategies, "2x3"))
    timing = h.Timing(repeats=3, min_repeats=1, budget_s=0.05)
    run = h.run_workloads([workload], timing=timing, progress=False, warm_up=False)
    rows = {r.strategy: r for r in run}
    assert rows["peer ok"].status == "ok" and len(rows["peer ok"].times_ms) >= 1
    assert rows["peer missing"].status == "skipped: no_such_module_xyz not installed"
    assert rows["peer broken"].status == "error: RuntimeError: out of memory"
    assert rows["peer wrong"].status == "wrong: max abs diff 1.00e+00"
    assert rows["peer wrong shape"].status == "wrong: shape (3, 2), expected (2, 3)"
    assert rows["tj placeholder"].status == "not available"
    assert rows["tj ok"].status == "ok" and rows["tj ok"].ratio is not None
    best = min(rows[k].median_ms for k in ("peer ok", "peer slower"))
    assert rows["tj ok"].ratio == pytest.approx(rows["tj ok"].median_ms / best)
    assert all(r.median_ms is None for r in rows.values() if r.status != "ok")


def test_the_rounds_rotate_so_each_strategy_follows_each_other_equally() -> None:
    from torchjac._bench import _import, find_benchmarks

    h = _import("_harness", find_benchmarks())
    orders = [h.rotated(3, r) for r in range(4)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert {o[0] for o in orders[:3]} == {0, 1, 2}  # each is first (after a peer) once
    assert h.rotated(0, 4) == [] and h.rotated(1, 7) == [0]


@pytest.mark.slow
def test_peak_memory_of_one_strategy_in_a_subprocess() -> None:
    from torchjac._bench import _import, find_benchmarks

    memory = _import("_memory", find_benchmarks())
    registry = _import("registry", find_benchmarks())
    (w4,) = registry.select(registry.all_workloads(), ["W4"])
    names = [s.name for s in w4.build(True).strategies]
    peak = memory.peak_mib("W4", names.index("seed 000: is_grads_batched, eye(P)"), True, 1)
    # eye(P) alone: P = 484 rows -> 0.9 MiB; far below the 100 MiB a leak or a mix-up would show.
    assert peak is not None and 0.5 < peak < 100
