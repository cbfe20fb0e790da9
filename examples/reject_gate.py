#!/usr/bin/env python3
"""A reject gate for one inspectd line that fails safe.

Parts pass only while the line is known to be inspecting them. The gate rejects EVERYTHING when:

* the camera is lost, the engine failed, many parts get the fail-safe verdict (deadlines missed,
  queue full), the line is still starting or the daemon is stopping (heartbeat status),
* heartbeats stop (daemon dead, network down, wrong endpoint or keys),
* verdicts were lost (a `seq` gap, also noticed at the next heartbeat) or the daemon restarted:
  then for `--hold` seconds, because the parts whose verdicts were lost cannot be told apart,
* optionally (`--verdict-timeout`) heartbeats flow but no verdict came for that long (for a
  free-running camera; a triggered line with no parts is legitimately quiet).

Single NG and SKIP (fail-safe) verdicts reject their part. Every decision is printed on stdout, one
line each, e.g. `REJECT ALL: camera lost`, `RESUME: line1 ok`, `REJECT frame 1234 (NG)`. Replace
the three methods of `Gate` with the calls to your PLC or digital outputs.

    python3 examples/reject_gate.py --endpoint tcp://127.0.0.1:5555 --line line1
    # with CURVE (keys from `inspectd keys`):
    python3 examples/reject_gate.py --endpoint tcp://10.20.0.21:5555 --line line1 \\
        --server-key server.key --client-key gate1.key_secret

SIGTERM or Ctrl-C stops it (exit 0). Exit 2 on bad options or key files.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any, TextIO

from inspectd.client import CurveClientKeys, LineStatus, Message, VerdictSubscriber
from inspectd.errors import InspectdError


class Gate:
    """The actuator. Here it prints; on a line these drive the reject output."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def reject_part(self, line: str, frame_id: Any, why: str) -> None:
        self._say(f"REJECT frame {frame_id} ({why})")

    def reject_all(self, line: str, why: str) -> None:
        self._say(f"REJECT ALL: {why}")

    def resume(self, line: str) -> None:
        self._say(f"RESUME: {line} ok")

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


class FailSafeGate:
    """Decides from the subscriber's callbacks. Callbacks and `tick()` run in the one thread that
    polls the subscriber, so no locking is needed."""

    def __init__(self, line: str, gate: Gate, hold_s: float) -> None:
        self.line = line
        self.gate = gate
        self.hold_s = hold_s
        self.status = LineStatus(line)          # unknown until the first heartbeat: reject all
        self.hold_until = 0.0
        self.hold_reason = ""
        self.blocked_by: str | None = None      # the reason announced last; None = passing parts

    # ---- subscriber callbacks ------------------------------------------------------------------
    def on_line_status(self, line: str, status: LineStatus) -> None:
        self.status = status
        self.tick()

    def on_gap(self, topic: str, expected: int, got: int) -> None:
        if topic.startswith("verdict."):
            self._hold(f"{got - expected} verdict{'s' if got - expected != 1 else ''} lost")

    def on_restart(self, line: str) -> None:
        self._hold("daemon restarted")

    def on_verdict(self, msg: Message) -> None:
        self.tick()
        verdict = msg.header.get("verdict")
        if self.blocked_by is None and verdict != "OK":  # NG and SKIP (fail-safe) both reject
            self.gate.reject_part(self.line, msg.header.get("frame_id"), str(verdict))

    # ---- decision ------------------------------------------------------------------------------
    def _hold(self, why: str) -> None:
        self.hold_until = time.monotonic() + self.hold_s
        self.hold_reason = why
        self.blocked_by = None  # announce even if already blocked for another reason
        self.tick()

    def tick(self) -> None:
        """Recompute the gate; prints only on a change."""
        if not self.status.safe:
            why: str | None = self.status.reason
        elif time.monotonic() < self.hold_until:
            why = self.hold_reason
        else:
            why = None
        if why == self.blocked_by:
            return
        self.blocked_by = why
        if why is None:
            self.gate.resume(self.line)
        else:
            self.gate.reject_all(self.line, why)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fail-safe reject gate for one inspectd line.")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="daemon publisher (default %(default)s)")
    p.add_argument("--line", required=True, help="line id")
    p.add_argument("--heartbeat-timeout", type=float, default=3.0,
                   help="reject all after this many seconds without heartbeat (default %(default)s)")
    p.add_argument("--hold", type=float, default=2.0,
                   help="seconds to reject all after lost verdicts or a restart (default %(default)s)")
    p.add_argument("--verdict-timeout", type=float, default=None,
                   help="reject all when heartbeats flow but no verdict came for this long (default: off)")
    p.add_argument("--server-key", default=None, help="CURVE: the daemon's public key file (NAME.key)")
    p.add_argument("--client-key", default=None, help="CURVE: this client's secret key file (NAME.key_secret)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    args = p.parse_args(argv)
    if (args.server_key is None) != (args.client_key is None):
        print("reject_gate: error: --server-key and --client-key go together", file=sys.stderr)
        return 2

    stop = False

    def on_signal(_signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    gate = FailSafeGate(args.line, Gate(), hold_s=args.hold)
    gate.tick()  # nothing known yet: start rejecting everything
    try:
        curve = (CurveClientKeys.from_files(args.server_key, args.client_key)
                 if args.server_key is not None else None)
        sub = VerdictSubscriber(args.endpoint, lines=[args.line], heartbeat_timeout_s=args.heartbeat_timeout,
                                verdict_timeout_s=args.verdict_timeout, curve=curve,
                                on_verdict=gate.on_verdict, on_line_status=gate.on_line_status,
                                on_gap=gate.on_gap, on_restart=gate.on_restart)
    except InspectdError as exc:
        print(f"reject_gate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    end = None if args.duration is None else time.monotonic() + args.duration
    try:
        while not stop and (end is None or time.monotonic() < end):
            sub.poll_once(0.1)
            gate.tick()  # a hold ends with time alone
    except KeyboardInterrupt:
        pass
    except InspectdError as exc:  # e.g. the endpoint cannot be connected
        print(f"reject_gate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        sub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
