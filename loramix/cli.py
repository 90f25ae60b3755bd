"""The ``loramix`` command: one subcommand per module in loramix/commands (each has add_parser and run).

To add a subcommand, write ``loramix/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args)``
and add its module name to COMMANDS.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LoramixError

COMMANDS = ("train", "evaluate", "inspect", "generate", "demo", "export", "merge", "params", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramix", description="MixLoRA fine-tuning for Hugging Face causal LMs")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; user errors print one ``loramix: error:`` line per problem and return 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the subcommand
    try:
        args = build_parser().parse_args([a for a in argv if a != "--debug"])
        return int(args.run(args) or 0)
    except LoramixError as e:
        if debug:
            raise
        for line in e.lines:
            print(f"loramix: {e.label}: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("loramix: interrupted", file=sys.stderr)
        return 130
