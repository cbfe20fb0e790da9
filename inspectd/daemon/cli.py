"""Daemon commands for the `inspectd` console script. One small function + one parser block per
command; heavy imports (harvesters, onnxruntime, zmq) happen inside the command functions."""

from __future__ import annotations

import argparse
from typing import Any


# ------------------------------------------------------------------------------ check-config
def cmd_check_config(args: argparse.Namespace) -> int:
    import sys

    from inspectd.daemon.config import config_warnings, load_config, summary

    config = load_config(args.config, validate_paths=not args.skip_paths)
    for warning in config_warnings(config, str(args.config)):
        print(f"WARNING: {warning}", file=sys.stderr)
    print(f"{args.config}: OK ({summary(config)})")
    if not args.engines:
        return 0
    import logging

    from inspectd.daemon.preflight import check_engines

    checks = check_engines(config)
    for c in checks:
        if c.level >= logging.WARNING:
            print(f"{logging.getLevelName(c.level)}: {c.describe()}", file=sys.stderr)
        else:
            print(c.describe())
    return 1 if any(c.level >= logging.ERROR for c in checks) else 0


def _register_check_config(sub: Any) -> None:
    p = sub.add_parser("check-config", help="validate a daemon config file (exit 2 on the first problem)",
                       description="Validate a daemon YAML config: schema, unknown keys, value ranges and "
                                   "(unless --skip-paths) that bundles, .cti files and inputs exist.")
    p.add_argument("config", metavar="FILE", help="daemon config (YAML)")
    p.add_argument("--skip-paths", action="store_true",
                   help="do not check that referenced files and folders exist (e.g. on a build machine)")
    p.add_argument("--engines", action="store_true",
                   help="also open every engine each line may run (its bundle and recipes) as the daemon would "
                        "(backends in order, parity gate at the line's threshold), time it on this machine and "
                        "compare with the line's latency budget; exit 1 if a line could not judge parts or its "
                        "engine is slower than its budget")
    p.set_defaults(func=cmd_check_config)


def register(subparsers: Any) -> None:
    """Add the daemon commands to the `inspectd` parser (called by inspectd.cli)."""
    _register_check_config(subparsers)
    _register_run(subparsers)
    _register_watch(subparsers)
    _register_capture(subparsers)
    from inspectd.daemon.control_cli import register_control  # light: the socket client is imported inside

    register_control(subparsers)


# ------------------------------------------------------------------------------ run
def cmd_run(args: argparse.Namespace) -> int:
    from inspectd.daemon.run import run

    return run(args.config)


def _register_run(sub: Any) -> None:
    p = sub.add_parser("run", help="run the inspection daemon for the lines of a config file",
                       description="Acquire frames, score them within each line's latency budget and "
                                   "publish verdicts over ZeroMQ, with Prometheus metrics. SIGTERM/SIGINT "
                                   "stop cleanly (in-flight frames resolved), SIGHUP reloads thresholds.")
    p.add_argument("--config", required=True, metavar="FILE", help="daemon config (YAML)")
    p.set_defaults(func=cmd_run)


# ------------------------------------------------------------------------------ watch
def _register_watch(sub: Any) -> None:
    from inspectd.daemon.watch import register_watch  # light: zmq is imported inside the command

    register_watch(sub)


# ------------------------------------------------------------------------------ capture
def _register_capture(sub: Any) -> None:
    from inspectd.daemon.capture import register_capture  # light: sources are imported inside the command

    register_capture(sub)
