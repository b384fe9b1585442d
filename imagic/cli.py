"""The `imagic` command line. User mistakes (bad path, bad image, bad checkpoint, bad argument) end with one line on
stderr and a non-zero exit code, never a Python traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Dict, List, Optional

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def _user_errors() -> tuple:
    """The exception types that mean 'the input is bad', not 'the program is broken'."""
    from .checkpoint import CheckpointError
    from .config import ConfigError

    kinds: List[type] = [UserError, CheckpointError, ConfigError]
    try:
        from .fileio import OutputError
        from .images import ImageError

        kinds += [ImageError, OutputError]
    except ImportError:
        pass
    return tuple(kinds)


def _print_inspect(info: Dict) -> None:
    print(f"file:             {info['path']}")
    print(f"family:           {info['family']}")
    print(f"prediction type:  {info['prediction_type']}")
    print(f"native size:      {info['native_resolution']}px")
    print(f"EMA weights:      {'yes' if info['ema'] else 'no'}")
    print("evidence:")
    for line in info["evidence"]:
        print(f"  - {line}")
    print("components:")
    for name, present in info["components"].items():
        n = info["parameters"].get(name, 0)
        dt = ", ".join(info["dtypes"].get(name, [])) or "-"
        print(f"  {name:13s} {'present' if present else 'ABSENT':8s} {n:>13,d} params  dtype {dt}")
    if info["parameters"].get("ema"):
        print(f"  {'ema':13s} {'present':8s} {info['parameters']['ema']:>13,d} params")
    print(f"unknown keys:     {len(info['unknown_keys'])}")
    for k in info["unknown_keys"][:20]:
        print(f"  {k}")
    for p in info["problems"]:
        print(f"PROBLEM: {p}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .loader import inspect_checkpoint

    info = inspect_checkpoint(args.path, config=args.config, probe=not args.no_probe)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(info)
    return 1 if info["problems"] else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagic", description="Imagic text-based real image editing on Stable Diffusion")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="what a checkpoint is: family, prediction type, EMA, dtypes, sizes")
    ins.add_argument("path", help=".safetensors or .ckpt file")
    ins.add_argument("--config", help="original LDM inference yaml (default: <checkpoint>.yaml if present)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--no-probe", action="store_true", help="skip the epsilon/v probe (no UNet forward)")
    ins.set_defaults(func=cmd_inspect)
    return p


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"imagic: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("imagic: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
