"""The Taylor mode over torch's own operator database, against ``torch.func`` (NOTE [opinfo sweep]).

One sweep per session (``op_db`` takes seconds to import): every float64 op that supports autograd,
on its smallest sample, through first order, trace, diagonal (forward and on the tape) and full
Hessian. No op may get a wrong answer or an error; the ops that ``benchmarks/OPINFO.md`` (the
complete sweep, written by ``python -m benchmarks.opinfo_coverage``) lists as served by a rule are
served by it here too.
"""

from __future__ import annotations

import re
import warnings

import torch

from torchjac._bench import _import, find_benchmarks

BENCHMARKS = find_benchmarks()
sweep_mod = _import("opinfo_sweep", BENCHMARKS)
# The CI sweep: the smallest sample of each op (always one the table's sweep ran too), full
# Hessians up to FULL_D elements; ops the table lists as served by a rule also on larger samples.
MAX_D, FULL_D = 50, 24


def _table() -> dict[str, dict[str, str]]:
    """``op -> kind -> class`` as ``OPINFO.md`` lists it (stars dropped), and its torch version."""
    text = (BENCHMARKS / "OPINFO.md").read_text()
    rows: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"\| `([^`]+)` \| (.+) \|", line)
        cells = m.group(2).split(" | ") if m else []
        if m and len(cells) == len(sweep_mod.KINDS):
            rows[m.group(1)] = {k: c.rstrip("*") for k, c in zip(sweep_mod.KINDS, cells)}
    version = re.search(r"^torch (\S+)\.$", text, re.M)
    rows["__torch__"] = {"version": version.group(1) if version else ""}
    return rows


def test_sweep_of_op_db() -> None:
    """One sweep (``op_db`` takes seconds to import; one test, so ``-n 2`` runs it once): no wrong
    answer and no error; each (op, kind) that ``OPINFO.md`` lists as served by a rule is served by
    it here too (its samples include the one run here), and the table lists the same ops."""
    table = _table()
    version = table.pop("__torch__")["version"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation and performance notes
        ops = sweep_mod.load_ops()
        ruled = [op for op in ops if "rule" in table.get(sweep_mod.op_name(op), {}).values()]
        others = [op for op in ops if op not in ruled]
        result = sweep_mod.sweep(others, max_d=MAX_D, max_samples=1, big_d=MAX_D, full_d=FULL_D)
        result.update(sweep_mod.sweep(ruled, max_d=MAX_D, max_samples=1))
    assert len(result) > 400  # the database was read, not an empty sweep
    bad = [
        f"{name} [{kind}]: {out.cls}: {out.reason}"
        for name, row in result.items()
        for kind, out in row.items()
        if out.cls in ("wrong", "error")
    ]
    assert not bad, "\n".join(bad)
    served = sum(out.cls in ("rule", "general") for row in result.values() for out in row.values())
    assert served > 1500  # most (op, kind) pairs are answered by the Taylor mode itself
    on_rule = [(n, k) for n, row in table.items() for k, c in row.items() if c == "rule"]
    assert len(on_rule) > 150
    if version != torch.__version__:  # the table describes the pinned torch; another may differ
        return
    assert set(result) == set(table)
    missed = [f"{n} [{k}]: {result[n][k].cls}" for n, k in on_rule if result[n][k].cls != "rule"]
    assert not missed, "\n".join(missed)


def test_the_table_is_clean() -> None:
    """The committed table records no wrong answer and no error, for any kind or op."""
    text = (BENCHMARKS / "OPINFO.md").read_text()
    for kind in sweep_mod.KINDS:  # the summary's columns: ERROR, then WRONG
        assert re.search(rf"^\| {kind} \| 0 \| 0 \|", text, re.M), kind
    per_op = text.split("## Per op")[1]
    assert "**WRONG**" not in per_op and "**ERROR**" not in per_op
