"""The ``littlebig`` command: one console script, one subcommand per job.

Each subcommand imports its heavy modules (torch, onnxruntime, tritonclient) only when it runs, so
``littlebig classify`` works in a client-only install. Exit codes: 0 success, 1 the job ran and
failed (a parity or health check, a server error), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

BUILD = Path("build")


def _cmd_train(args: argparse.Namespace) -> int:
    from littlebig.export.train import train_role

    summary = train_role(args.role, args.out, epochs=args.epochs, seed=args.seed,
                         data_dir=args.data_dir, threads=args.threads)
    print(summary)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the little or big model on Fashion-MNIST",
                       epilog="example: littlebig train big --epochs 6 --out checkpoints/big.safetensors",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("role", choices=["little", "big"], help="which recipe of the registry to train")
    p.add_argument("--out", type=Path, default=None, help="checkpoint path (default checkpoints/ROLE.safetensors)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    p.set_defaults(func=_cmd_train)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="littlebig", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"littlebig {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
