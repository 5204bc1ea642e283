"""The user documentation stays true: the engine map lists every NOTE, generated files are up to
date, and the README stays a page for users."""

from __future__ import annotations

import re
from pathlib import Path

from torchjac._bench import _import, find_benchmarks

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "torchjac"
NOTE = re.compile(r"NOTE \[([^\]]+)\]")
ENTRY = re.compile(r"\*\*NOTE \[([^\]]+)\]\*\* \(`([^`]+)`\)")


def _names(text: str) -> set[str]:
    """The NOTE names in ``text``; a name broken over lines (and comment marks) is joined."""
    return {re.sub(r"[\s#]+", " ", name).strip() for name in NOTE.findall(text)}


def _notes_in_code() -> set[str]:
    return {name for path in SRC.rglob("*.py") for name in _names(path.read_text())}


def test_internals_page_lists_every_note_of_the_code_in_its_file() -> None:
    page = (ROOT / "docs" / "internals.md").read_text()
    entries = dict(ENTRY.findall(page))
    missing = _notes_in_code() - set(entries)
    assert not missing, f"add these notes to docs/internals.md: {sorted(missing)}"
    stale = set(entries) - _notes_in_code()
    assert not stale, f"docs/internals.md lists notes the code no longer has: {sorted(stale)}"
    for name, file in entries.items():
        assert name in _names((SRC / file).read_text()), f"NOTE [{name}] is not in {file}"


def test_results_page_and_readme_table_are_rendered_from_the_json() -> None:
    render = _import("render", find_benchmarks())
    assert render.main(["--check"]) == 0, "run `python -m benchmarks.render`"


def test_readme_is_short_and_for_users() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "../" not in text, "the README points outside the repository"
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", w)]
    assert not hashes, f"commit hashes in the README: {hashes}"
    for command in ("make demo", "make test"):
        assert command in text


def test_the_w5c_sweep_renders_as_a_grid_of_ratios() -> None:
    render = _import("render", find_benchmarks())
    harness = _import("_harness", find_benchmarks())

    def row(m: int, n: int, ratio: float | None) -> object:
        title = f"Gramian of m={m} task losses, N={n}, width 64 (issue 21 sweep)"
        return harness.Row("W5c", title, "", "tj.gramian", True, "ok", ratio=ratio)

    assert render.sweep_table([]) is None
    table = render.sweep_table([row(4, 32, 0.5), row(16, 32, None), row(4, 256, 1.25)])
    assert table.splitlines()[0] == "| width | N | m=4 | m=16 |"
    assert "| 64 | 32 | 0.50× | — |" in table
    assert "| 64 | 256 | 1.25× | — |" in table


def test_a_workload_whose_calls_are_all_named_forms_keeps_every_line() -> None:
    render = _import("render", find_benchmarks())
    harness = _import("_harness", find_benchmarks())

    def row(strategy: str, ms: float, mine: bool) -> object:
        return harness.Row("W9", "sparse", "", strategy, mine, "ok", median_ms=ms, ratio=ms / 100)

    rows = [
        row("jacfwd", 100.0, False),
        row("tj.sparse_jacobian, slicing", 3.0, True),
        row("tj.sparse_jacobian, cached pattern", 2.0, True),
    ]
    table = render.summary_table(rows, sweep=False)
    assert "`tj.sparse_jacobian, slicing` | 3 |" in table
    assert "`tj.sparse_jacobian, cached pattern` | 2 |" in table


def test_the_w5c_sweep_plot_is_written_and_its_absence_is_stale(tmp_path: Path) -> None:
    render = _import("render", find_benchmarks())
    harness = _import("_harness", find_benchmarks())
    rows = [
        harness.Row("W5c", f"Gramian of m={m} task losses, N=32, width 64", "", "tj", True, "ok",
                    ratio=r)
        for m, r in ((4, 1.5), (16, None), (64, 0.7))
    ]  # fmt: skip
    assert not render.sweep_plot([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    assert render.sweep_plot(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = tmp_path / "RESULTS.md"  # a results page without its plot beside it is stale
    results.write_text((ROOT / "benchmarks" / "RESULTS.md").read_text())
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    args = ["--check", "--results", str(results), "--readme", str(readme), "--docs", str(docs)]
    assert render.main(args) == 1
    (tmp_path / render.SWEEP_PLOT).write_bytes(b"")
    assert render.main(args) == 1  # the docs' copy is missing still
    (docs / render.SWEEP_PLOT).write_bytes(b"")
    assert render.main(args) == 0
