"""``usfmae-fast`` command line: ``info`` (what is available here and why not), ``demo``."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from .info import collect, render
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usfmae-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, usable backends and why others are not")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_info)
    demo = sub.add_parser("demo", help="pretrain a tiny MAE on real ultrasound DICOMs (CPU, minutes)")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=32, help="batch size (default: %(default)s)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
