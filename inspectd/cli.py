"""The `inspectd` console script. Each package registers its own subcommands; heavy imports
(torch, onnxruntime, harvesters) happen only inside the command that needs them."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from inspectd import __version__
from inspectd.errors import InspectdError

# Modules with `register(subparsers)`; the order is the order in --help.
COMMAND_MODULES = (
    "inspectd.engines.cli",
    "inspectd.calibration.cli",
    "inspectd.daemon.cli",
    "inspectd.bridges.cli",
    "inspectd.keys",
    "inspectd.demo",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="inspectd", description="Edge inspection daemon: anomaly engine, calibration, "
                     "line daemon.")
    parser.add_argument("--version", action="version", version=f"inspectd {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a package not built yet contributes no commands
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except InspectdError as exc:
        print(f"inspectd {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError as exc:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            # Our reader went away (`inspectd audit | head -1`): nothing left to say. Point stdout at
            # /dev/null so that the interpreter's final flush does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"inspectd {args.command}: error: {exc.strerror or exc}", file=sys.stderr)  # another pipe broke
        return 1
    except OSError as exc:  # a full disk, an unwritable folder: one line naming the path
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"inspectd {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"inspectd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
