"""`inspectd watch`: print the verdict stream of a running daemon, one line per verdict, and say
loudly when messages are lost, heartbeats stop, the line's status changes (camera lost, engine
failed) or the daemon restarts. Speaks CURVE with `--server-key` and `--client-key`.

ZeroMQ connects silently to an endpoint nobody publishes on (a wrong endpoint, a daemon not
running, CURVE keys that do not match): when nothing at all arrives within NO_HEARTBEAT_S, one line
on stderr says so, and the command exits 1 if nothing ever came."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from inspectd.errors import ConfigError

if TYPE_CHECKING:
    from inspectd.client import CurveClientKeys

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"   # the daemon's default zmq.endpoint (daemon/config.py)
# A daemon beats every heartbeat_interval_s (1 s by default): this long without anything is no slow beat.
NO_HEARTBEAT_S = 5.0


def _fmt_time(ns: object) -> str:
    if not isinstance(ns, int):
        return "--:--:--.---"
    t = dt.datetime.fromtimestamp(ns / 1e9)
    return t.strftime("%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def _fmt_num(value: object, fmt: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    return "-".rjust(len(format(0.0, fmt)))  # keep the columns aligned


def format_verdict(header: dict) -> str:
    """One display line for a verdict header."""
    text = (f"{_fmt_time(header.get('acquired_ns'))} {header.get('line', '?'):<10} "
            f"frame {header.get('frame_id', '?'):>8} {header.get('verdict', '?'):<4} "
            f"score {_fmt_num(header.get('score'), '8.3f')} thr {_fmt_num(header.get('threshold'), '.3f')} "
            f"latency {_fmt_num(header.get('latency_ms'), '7.1f')} ms")
    if header.get("deadline_missed"):
        text += "  DEADLINE MISSED"
    if header.get("error"):
        text += f"  ({header['error']})"
    return text


@dataclass
class WatchResult:
    shown: int   # verdicts printed
    heard: bool  # anything (heartbeat, verdict) came from the endpoint


def nothing_received(endpoint: str, line: str | None, seconds: float, curve: bool) -> str:
    """The one line for an endpoint that sent nothing: where it listened and what to check."""
    keys = ("the CURVE keys do not match the daemon's (--server-key, --client-key)" if curve
            else "the daemon uses CURVE (then give --server-key and --client-key)")
    which = f", or no line {line!r} there (check --line)" if line else ""
    return (f"inspectd watch: no heartbeat from {endpoint} in {seconds:.1f} s: the daemon is not running, or it "
            f"publishes elsewhere (--endpoint must be its zmq.endpoint), or {keys}{which}")


def watch(endpoint: str, line: str | None = None, stream: TextIO | None = None, duration: float | None = None,
          heartbeat_timeout_s: float = 3.0, curve: "CurveClientKeys | None" = None, err: TextIO | None = None,
          no_heartbeat_s: float = NO_HEARTBEAT_S) -> WatchResult:
    """Print verdicts from `endpoint` (all lines, or one) until `duration` seconds pass or Ctrl-C.
    Says on `err` when nothing at all came within `no_heartbeat_s` (or by the end, if sooner)."""
    from inspectd.client import LineStatus, VerdictSubscriber  # keep `inspectd --help` light

    out = sys.stdout if stream is None else stream
    err = sys.stderr if err is None else err

    def say(text: str, to: TextIO = out) -> None:
        to.write(text + "\n")
        to.flush()

    def on_gap(topic: str, expected: int, got: int) -> None:
        n = got - expected
        say(f"!! gap: {n} message{'s' if n != 1 else ''} lost on {topic}")

    def on_status(ln: str, status: LineStatus) -> None:
        if status.heartbeat:  # heartbeat loss has its own line above
            say(f"-- line {ln}: ok" if status.safe else f"!! line {ln}: {status.reason}")

    shown = 0
    heard = False
    warned = False
    say(f"watching {endpoint} ({'line ' + line if line else 'all lines'}); Ctrl-C to stop")
    sub = VerdictSubscriber(
        endpoint, lines=[line] if line else None, topics=("verdict", "heartbeat"),
        heartbeat_timeout_s=heartbeat_timeout_s, on_gap=on_gap,
        on_heartbeat_lost=lambda ln: say(f"!! heartbeat lost: {ln} (none for {heartbeat_timeout_s:g} s)"),
        on_heartbeat_restored=lambda ln: say(f"!! heartbeat back: {ln}"),
        on_restart=lambda ln: say(f"!! daemon restarted: {ln} (sequence numbers start again)"),
        on_line_status=on_status, curve=curve)
    start = time.monotonic()
    end = None if duration is None else start + duration
    try:
        while end is None or time.monotonic() < end:
            wait = 0.2 if end is None else max(0.0, min(0.2, end - time.monotonic()))
            msg = sub.poll_once(wait)
            if msg is not None:
                if not heard and warned:
                    say(f"inspectd watch: receiving from {endpoint} now "
                        f"(first message after {time.monotonic() - start:.0f} s)", err)
                heard = True
                if msg.kind == "verdict":
                    say(format_verdict(msg.header))
                    shown += 1
            elif not heard and not warned and time.monotonic() - start >= no_heartbeat_s:
                warned = True
                say(nothing_received(endpoint, line, time.monotonic() - start, curve is not None), err)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    if not heard and not warned:  # stopped before the warning was due: say it now
        say(nothing_received(endpoint, line, time.monotonic() - start, curve is not None), err)
    return WatchResult(shown=shown, heard=heard)


def run_watch(endpoint: str, line: str | None = None, stream: TextIO | None = None,
              duration: float | None = None, heartbeat_timeout_s: float = 3.0,
              curve: "CurveClientKeys | None" = None, err: TextIO | None = None) -> int:
    """Print verdicts from `endpoint` (all lines, or one) until `duration` seconds pass or Ctrl-C.
    Returns the number of verdicts shown (see `watch`)."""
    return watch(endpoint, line=line, stream=stream, duration=duration, heartbeat_timeout_s=heartbeat_timeout_s,
                 curve=curve, err=err).shown


def _cmd_watch(args: argparse.Namespace) -> int:
    if args.duration is not None and args.duration <= 0:
        raise ConfigError(f"--duration must be > 0 s, got {args.duration}")
    if (args.server_key is None) != (args.client_key is None):
        raise ConfigError("--server-key and --client-key go together (CURVE needs both)")
    curve = None
    if args.server_key is not None:
        from inspectd.client import CurveClientKeys

        curve = CurveClientKeys.from_files(args.server_key, args.client_key)
    result = watch(args.endpoint, line=args.line, duration=args.duration,
                   heartbeat_timeout_s=args.heartbeat_timeout, curve=curve,
                   no_heartbeat_s=max(NO_HEARTBEAT_S, args.heartbeat_timeout))  # a longer timeout: slower beats
    return 0 if result.heard else 1  # nothing ever came: the line on stderr said why


def register_watch(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `inspectd watch [--endpoint E] [--line L] [--server-key K --client-key S]` (called from
    inspectd/daemon/cli.py)."""
    p = subparsers.add_parser("watch", help="print the verdict stream of a running daemon",
                              description="Subscribe to a daemon's verdicts and print one line per "
                              "verdict; marks lost messages, heartbeat losses and restarts. Says so on "
                              f"stderr when nothing arrives within {NO_HEARTBEAT_S:g} s, and exits 1 if "
                              "nothing ever did.")
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                   help=f"publisher endpoint (default {DEFAULT_ENDPOINT}, the daemon's default)")
    p.add_argument("--line", default=None, help="only this line (default: all lines)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--heartbeat-timeout", type=float, default=3.0,
                   help="report a line as lost after this many seconds without heartbeat (default 3)")
    p.add_argument("--server-key", default=None,
                   help="CURVE: the daemon's public key file (server.key from `inspectd keys`)")
    p.add_argument("--client-key", default=None,
                   help="CURVE: this client's secret key file (NAME.key_secret, mode 0600)")
    p.set_defaults(func=_cmd_watch)
    return p
