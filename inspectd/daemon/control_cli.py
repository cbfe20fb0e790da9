"""`inspectd recipe|shadow|promote|rollback|audit --config FILE --line L`: requests to the running
daemon's control socket (<state_dir>/control.sock, daemon/control.py) and the audit log reader."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _send(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any]:
    from inspectd.daemon.config import load_config
    from inspectd.daemon.control import request, socket_path
    from inspectd.errors import InspectdError

    config = load_config(args.config)
    config.line(args.line)   # ConfigError naming the known lines
    payload = dict(payload, line=args.line, via="cli")
    if getattr(args, "reason", None):
        payload["reason"] = args.reason
    answer = request(socket_path(config.state_dir), payload)
    if not answer.get("ok"):
        raise InspectdError(f"refused: {answer.get('error')}")
    return answer


def _print(answer: dict[str, Any], as_json: bool, text: str) -> None:
    print(json.dumps(answer, indent=2, default=str) if as_json else text)


def _active_text(a: dict[str, Any]) -> str:
    return (f"recipe {a['recipe']}: bundle {a['bundle_id']} ({a['bundle']}), threshold {a['threshold']:.4g}"
            + (f" from {a['threshold_file']}" if a.get("threshold_file") else ""))


def cmd_recipe(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        answer = _send(args, {"op": "list"})
        lines = [f"line {answer['line']}: active {_active_text(answer['active'])}"]
        for r in answer["recipes"]:
            state = "ACTIVE" if r["active"] else ("ready" if r["ready"] else
                                                  f"not ready: {r['not_ready_reason']}" if r["not_ready_reason"]
                                                  else "loads on switch")
            lines.append(f"  {r['name']:<16} {state:<16} bundle {r['bundle']}  threshold {r['threshold']}"
                         + ("  (preload)" if r["preload"] else ""))
        if answer.get("shadow"):
            s = answer["shadow"]
            lines.append(f"  shadow: bundle {s['bundle_id']} threshold {s['threshold']:.4g}: {s['scored']} scored, "
                         f"{s['dropped']} dropped, agree {s['agree']} / disagree {s['disagree']}, "
                         f"correlation {s['correlation']}")
        _print(answer, args.json, "\n".join(lines))
        return 0
    answer = _send(args, {"op": "recipe", "name": args.name})
    _print(answer, args.json, f"line {answer['line']}: {'now' if answer['changed'] else 'already'} "
                              f"{_active_text(answer['active'])}")
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    if args.clear:
        payload: dict[str, Any] = {"op": "shadow", "bundle": None}
    else:
        if not args.bundle or (args.threshold is None) == (args.threshold_file is None):
            raise SystemExit("inspectd shadow: give --bundle and one of --threshold / --threshold-file (or --clear)")
        from pathlib import Path
        payload = {"op": "shadow", "bundle": str(Path(args.bundle).resolve()),
                   "threshold": args.threshold,
                   "threshold_file": str(Path(args.threshold_file).resolve()) if args.threshold_file else None}
    answer = _send(args, payload)
    s = answer.get("shadow")
    _print(answer, args.json, f"line {answer['line']}: " + (f"shadow bundle {s['bundle_id']} threshold "
                                                             f"{s['threshold']:.4g}" if s else "no shadow bundle"))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    answer = _send(args, {"op": "promote"})
    _print(answer, args.json, f"line {answer['line']}: promoted: {_active_text(answer['active'])}\n"
                              f"  previous (inspectd rollback): {_active_text(answer['previous'])}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    answer = _send(args, {"op": "rollback"})
    _print(answer, args.json, f"line {answer['line']}: rolled back: {_active_text(answer['active'])}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from inspectd.daemon.audit import AuditLog, audit_path, format_record
    from inspectd.daemon.config import load_config

    config = load_config(args.config)
    if args.line:
        config.line(args.line)
    for rec in AuditLog(audit_path(config.state_dir)).records(args.line):
        print(json.dumps(rec, default=str) if args.json else format_record(rec))
    sys.stdout.flush()
    return 0


def _common(p: argparse.ArgumentParser, line: bool = True) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="daemon config (YAML)")
    if line:
        p.add_argument("--line", required=True, metavar="L", help="line id")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")


def register_control(sub: Any) -> None:
    p = sub.add_parser("recipe", help="switch the active recipe of a running line (or --list them)",
                       description="Ask the running daemon (control socket <state_dir>/control.sock) to switch the "
                                   "line's recipe between two frames. Refused, with the reason, when the recipe's "
                                   "engine is not ready (unknown, bundle does not load, parity gate, warm-up).")
    _common(p)
    p.add_argument("name", nargs="?", metavar="NAME", help="recipe to activate")
    p.add_argument("--list", action="store_true", help="list the line's recipes and which is active")
    p.add_argument("--reason", help="why (goes into the audit log)")
    p.set_defaults(func=cmd_recipe)

    p = sub.add_parser("shadow", help="set or clear the shadow (candidate) bundle of a running line",
                       description="Score a candidate bundle on the same frames as the active one, off the "
                                   "critical path (topic shadow.<line>, agreement metrics).")
    _common(p)
    p.add_argument("--bundle", metavar="DIR")
    p.add_argument("--threshold", type=float)
    p.add_argument("--threshold-file", metavar="JSON", help="calibration file (needed for promote)")
    p.add_argument("--clear", action="store_true")
    p.add_argument("--reason", help="why (goes into the audit log)")
    p.set_defaults(func=cmd_shadow)

    p = sub.add_parser("promote", help="make the line's shadow bundle active (parity gate, calibrated threshold)",
                       description="Make the shadow bundle the active recipe's bundle atomically, after the parity "
                                   "gate passes and with its calibrated threshold file; the old bundle is kept "
                                   "for `inspectd rollback`. Persisted in <state_dir>/<line>/recipes.json.")
    _common(p)
    p.add_argument("--reason", help="why (goes into the audit log)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="undo the last promote of a running line")
    _common(p)
    p.add_argument("--reason", help="why (goes into the audit log)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("audit", help="print the audit log (changes of what decides verdicts)")
    _common(p, line=False)
    p.add_argument("--line", metavar="L", help="only this line's records")
    p.set_defaults(func=cmd_audit)
