"""torchjac benchmarks: workloads W1-W7 against the peers, side by side in one process.

Run them with ``torchjac bench`` (``--workloads W1,W4``, ``--quick``, ``--json``, ``--plot``) or,
from the repository root, ``python -m benchmarks --workloads W4``. Each workload file builds its
problem with fixed seeds, a reference result and a list of strategies; the harness
(:mod:`benchmarks._harness`) checks every strategy against the reference before timing it.
"""
