"""The ``torchjac`` command (also ``python -m torchjac``): ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
torchjac computes Jacobians exactly and fast. Two subcommands:

  demo    the user problems of the seeds (forum threads and library docs), each computed the
          way the seed computes it and with torchjac: agreement, timings, a figure (demo.png)
  bench   the benchmark workloads W1-W7 against the peers (torch.func, torch.autograd,
          TorchJD, BackPACK), checked against references, medians and ratios, Markdown table

Run `torchjac demo --help` or `torchjac bench --help` for their options.
"""


def _threads(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--threads must be >= 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``torchjac`` command.

    Example:
        >>> from torchjac.cli import build_parser
        >>> args = build_parser().parse_args(["bench", "--workloads", "W4,W5", "--quick"])
        >>> args.command, args.workloads, args.quick
        ('bench', 'W4,W5', True)
    """
    parser = argparse.ArgumentParser(
        prog="torchjac",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    demo = sub.add_parser(
        "demo",
        help="the seed problems, the seed's way and torchjac's: agreement, speedups, demo.png",
        description=(
            "For each seed problem (000-004): compute it the way the seed does and with "
            "torchjac, assert that they agree, print a table (seed, problem, seed method time, "
            "torchjac time, speedup, max |difference|) and save a figure with the speedups and "
            "a per-sample parameter Jacobian heatmap like seed 003's. A torchjac function not "
            "available yet is shown as such."
        ),
    )
    demo.add_argument("--out", default="demo.png", help="figure path (default: demo.png)")
    demo.add_argument("--small", action="store_true", help="reduced problem sizes (seconds)")
    demo.add_argument("--threads", type=_threads, help="torch threads (default: torch's)")
    bench = sub.add_parser(
        "bench",
        help="workloads W1-W7 against the peers: checked, timed, Markdown table",
        description=(
            "Run the benchmark workloads of benchmarks/ (from the repository checkout). Every "
            "strategy is checked against a reference before it is timed; a peer that is not "
            "installed is listed as skipped. Prints a Markdown table: workload, strategy, median "
            "ms, ratio to the best peer, check."
        ),
    )
    bench.add_argument("--workloads", help="comma-separated keys, e.g. W1,W4 (W5 = W5 and W5b)")
    bench.add_argument("--quick", action="store_true", help="fewer repeats (about 1 s each)")
    bench.add_argument("--small", action="store_true", help="reduced problem sizes (for tests)")
    bench.add_argument("--json", metavar="PATH", help="write every row and timing as JSON")
    bench.add_argument("--plot", metavar="PATH", help="save a bar chart (PNG, matplotlib Agg)")
    bench.add_argument(
        "--memory",
        action="store_true",
        help="also measure each strategy's peak memory (a subprocess each; Linux)",
    )
    bench.add_argument("--threads", type=_threads, help="torch threads (default: torch's)")
    bench.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``torchjac`` and ``python -m torchjac``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "demo":
        from torchjac._demo import run_demo

        return run_demo(out=args.out, small=args.small)
    from torchjac._bench import run_bench

    keys = args.workloads.split(",") if args.workloads else None
    try:
        return run_bench(
            keys,
            quick=args.quick,
            small=args.small,
            json_path=args.json,
            plot_path=args.plot,
            progress=not args.no_progress,
            memory=args.memory,
        )
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(2, f"{exc}\n")
