"""``usfmae-fast bench``: the benchmark suites (benchmarks/bench_*.py)."""
from __future__ import annotations

import argparse

from . import EXIT_FAILURE, exit_on


def add_commands(sub) -> None:
    """Register ``bench``."""
    from ..bench import SUITES

    def run(args: argparse.Namespace) -> int:
        from ..bench import run_bench
        with exit_on():
            provenance = run_bench(args.suites, args.out, suites_dir=args.suites_dir,
                                   select=args.select)
        failed = [r["file"] for r in provenance["suites"] if r["status"].startswith("failed")]
        return EXIT_FAILURE if failed else 0

    p = sub.add_parser("bench", help="run the benchmark suites that fit this device; JSON, "
                       "summary table, plot and provenance", description="Runs benchmarks/"
                       "bench_*.py with pytest-benchmark (see benchmarks/README.md); exit 1 "
                       "when a suite fails.")
    p.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=None,
                   help="suites to run (default: all)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/"
                   "run-<device>-<date>)")
    p.add_argument("-k", dest="select", default=None,
                   help="pytest -k expression selecting cases, e.g. 'cpu and not compile'")
    p.add_argument("--suites-dir", default=None,
                   help="the benchmarks/ folder (default: the checkout's)")
    p.set_defaults(func=run)
