"""`hf-mudsc` entry point: one sub-command per module of `hf_mudsc.cli` (`merge.py`, `evaluate.py`, ...)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from hf_mudsc._version import __version__

# Sub-command name -> module in hf_mudsc.cli exposing `add_arguments(parser)` and `run(args) -> int`.
COMMANDS = {
    "demo": "Train two small ViTs from different seeds on halves of sklearn's digits and merge them.",
    "merge": "Merge two models (Hub ids, folders) into one and save or push it.",
    "push": "Push a merged model folder to the Hub with its card and recipe.",
    "evaluate": "Evaluate a merged model (and its parents) per task and jointly.",
    "serve": "Run the merging service: merge jobs over HTTP, a job store that survives restarts, a web page.",
}


def _module(name: str):
    return importlib.import_module(f"hf_mudsc.cli.{name}")


def command_in(argv: Sequence[str]) -> str | None:
    """The sub-command named in `argv`: the first argument that is not a top-level option (those take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(available: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the commands in `available` (all when None) get their flags, i.e. import their module.

    Every command is listed by `hf-mudsc --help` either way: a command module may import torch (evaluate does),
    and help or an argument error of another command must answer in a second, not after 5-8 s of imports.
    """
    parser = argparse.ArgumentParser(
        prog="hf-mudsc",
        description="Merge fine-tuned Hugging Face transformers without training (MuDSC, CVPR 2024).",
    )
    parser.add_argument("--version", action="version", version=f"hf-mudsc {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if available is not None and name not in available:
            sub.add_parser(name, help=help_text, description=help_text)  # listed, flags not loaded
            continue
        try:
            module = _module(name)
        except ModuleNotFoundError as error:
            if error.name != f"hf_mudsc.cli.{name}":
                raise  # a missing dependency must not silently hide a command
            continue
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(available=[command] if (command := command_in(argv)) else [])
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=min(level, logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hf_mudsc").setLevel(min(level, logging.INFO))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError) as error:
        logging.getLogger("hf_mudsc").debug("command failed", exc_info=True)
        print(f"hf-mudsc {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
