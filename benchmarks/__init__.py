"""torchjac benchmarks: workloads W1-W7 against the peers, side by side in one process.

Run them with ``torchjac bench`` (``--workloads W1,W4``, ``--quick``, ``--json``, ``--plot``,
``--memory``, ``--threads``) or, from the repository root, ``python -m benchmarks [options]``.
Each workload file builds its problem with fixed seeds, a reference result (float64 where
affordable) and a list of strategies; the harness (:mod:`benchmarks._harness`) checks every
strategy against the reference before timing it, times them in interleaved rounds and reports
medians and ratios to the fastest peer (:mod:`benchmarks._report`). On a machine shared with
other work, ``--threads 1`` gives the steadiest ratios. ``python -m benchmarks.render`` turns the
``--json`` file ``benchmarks/results.json`` into ``RESULTS.md`` and the README's table.
"""
