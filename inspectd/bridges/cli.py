"""`inspectd bridge mqtt|opcua --config FILE`: the PLC-side bridges (inspectd/bridges/)."""

from __future__ import annotations

import argparse
from typing import Any

from inspectd.errors import ConfigError


LIBRARIES = {"mqtt": "paho.mqtt.client", "opcua": "asyncua"}


def cmd_bridge(args: argparse.Namespace) -> int:
    import importlib

    try:  # the bridges' client libraries are an extra: say so in one line, not a traceback per restart
        importlib.import_module(LIBRARIES[args.kind])
    except ImportError as exc:
        raise ConfigError(f"the {args.kind} bridge needs {LIBRARIES[args.kind].split('.')[0]} ({exc}): "
                          f"pip install 'inspectd[bridges]' (deploy/install.sh installs it)") from None
    if args.kind == "mqtt":
        from inspectd.bridges.mqtt import run
    else:
        from inspectd.bridges.opcua import run
    return run(args.config)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bridge", help="republish verdicts and line status to MQTT or OPC UA (PLC side)",
                              description="Subscribe to the daemon's verdict stream and republish it: "
                                          "`mqtt` to <prefix>/<line>/verdict and retained <prefix>/<line>/status, "
                                          "`opcua` as an OPC UA server (a folder per line, an event per "
                                          "verdict). Reads the daemon config's `bridges` section; runs until "
                                          "SIGTERM and reconnects to a restarted daemon or broker.")
    p.add_argument("kind", choices=["mqtt", "opcua"], help="which bridge")
    p.add_argument("--config", required=True, metavar="FILE", help="daemon config (YAML) with a bridges section")
    p.set_defaults(func=cmd_bridge)
