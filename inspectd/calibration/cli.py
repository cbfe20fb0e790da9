"""`inspectd calibrate`: registered by inspectd/cli.py. Heavy imports happen inside the command."""

from __future__ import annotations

import argparse
from typing import Any
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate", help="set a line's threshold from held-out good (and bad) images",
        description="Score held-out images through ONNX Runtime, choose the smallest threshold whose "
                    "false-reject rate is below the target with 95%% confidence (order-statistic bound), "
                    "report escape rate / ROC AUC with bad images, and write the line's threshold file atomically "
                    "(mode 0644, the file the config's threshold points to, the file it replaces kept as "
                    "<file>.bak; the first time, the config is repointed to <line>.threshold.json next to it, "
                    "comments kept, old config kept as <config>.bak-<UTC timestamp>). Apply it with "
                    "`systemctl reload inspectd@<line>` (SIGHUP).")
    p.add_argument("--bundle", required=True, type=Path, help="model bundle directory")
    p.add_argument("--good", required=True, type=Path,
                   help="folder of good images NOT used in training (see --skip-overlap)")
    p.add_argument("--bad", type=Path, help="folder of defective images (escape rate, ROC AUC)")
    p.add_argument("--line", required=True, help="line id in the config")
    p.add_argument("--target-false-reject", required=True, metavar="RATE",
                   help="e.g. 0.5%% or 0.005; must be in (0, 50%%)")
    p.add_argument("--target-escape", metavar="RATE", help="also show the threshold meeting this escape rate")
    p.add_argument("--config", required=True, type=Path, help="daemon config (lines.yaml)")
    p.add_argument("--force-overlap", action="store_true",
                   help="accept calibration images that were used in training (rates will be optimistic)")
    p.add_argument("--skip-overlap", action="store_true",
                   help="leave out the calibration images the bundle was trained on (named in the report) and "
                        "calibrate on the others")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="report folder (default: <state_dir>/<line>/calibration/<UTC time>, state_dir from the config)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default 0.95)")
    p.add_argument("--dry-run", action="store_true", help="report only, leave the config alone")
    p.add_argument("--accept-shift", action="store_true",
                   help="calibrate even when the good images score far above every good image the bundle was "
                        "validated on (other parts, camera or light: retraining is usually the fix)")
    p.add_argument("--accept-outliers", action="store_true",
                   help="calibrate even when some good images score like defects, far above every good image the "
                        "bundle was validated on (look at them first: one defective part among them sets the "
                        "threshold at its own score)")
    p.add_argument("--batch", type=int, default=8, help="images per inference batch")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime threads (0 = the daemon's default for the usable CPUs)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from inspectd.calibration.calibrate import CalibrationRequest, calibrate
    from inspectd.calibration.threshold import parse_rate
    from inspectd.errors import ConfigError

    if not 0.5 <= args.confidence < 1.0:
        raise ConfigError(f"--confidence {args.confidence} is outside [0.5, 1)")
    if args.batch < 1:
        raise ConfigError(f"--batch {args.batch} must be >= 1")
    req = CalibrationRequest(
        bundle=args.bundle, good=args.good, bad=args.bad, line=args.line, config=args.config,
        target_false_reject=parse_rate(args.target_false_reject, "--target-false-reject"),
        target_escape=(parse_rate(args.target_escape, "--target-escape", upper=1.0)
                       if args.target_escape is not None else None),
        force_overlap=args.force_overlap, skip_overlap=args.skip_overlap, report_dir=args.report,
        confidence=args.confidence, batch_size=args.batch, threads=args.threads, write_config=not args.dry_run,
        accept_shift=args.accept_shift, accept_outliers=args.accept_outliers)
    result = calibrate(req)
    print(result.summary)
    shift = result.report["shift"]
    if shift["accepted"]:
        print(f"shift accepted: {shift['above_held_out']} of {result.report['n_good']} good images score above every "
              f"held-out good image of the bundle (median {shift['median']:.4g} > {shift['held_out_max']:.4g}): "
              f"check the camera and light, or retrain (--accept-shift)")
    outliers = result.report["outliers"]
    if outliers["accepted"]:
        print(f"outliers accepted: {len(outliers['images'])} good images scoring like defects were kept (above "
              f"{outliers['limit']:.4g}: {', '.join(name for name, _ in outliers['images'][:5])}); the threshold "
              f"is {result.report['threshold']:.4g} (--accept-outliers)")
    left_out = result.report["overlap"].get("left_out")
    if left_out:
        split = f"{left_out['good']} good, {left_out['bad']} bad; " if args.bad is not None else ""
        rest = f"{result.report['n_good']} good" + (f" and {result.report['n_bad']} bad" if args.bad is not None
                                                    else "")
        print(f"left out {left_out['count']} images the bundle was trained on ({split}by {left_out['by']}: "
              f"{', '.join(left_out['examples'])}{', ...' if left_out['count'] > len(left_out['examples']) else ''})"
              f": calibrated on the other {rest} (--skip-overlap; all names in the report)")
    print(f"report: {result.report_files['json']}"
          + (f", {result.report_files['png']}" if result.report_files["png"] else " (no PNG: matplotlib missing)"))
    upd = result.update
    if upd is not None:
        how = (f"; config repointed to it (previous config: {upd.backup.name})" if upd.backup is not None
               else "; config unchanged")
        kept = f"; previous file kept as {upd.threshold_backup.name}" if upd.threshold_backup is not None else ""
        print(f"threshold file: {upd.calibration_file} line {args.line} threshold -> {upd.new_threshold:.4f}{how}"
              f"{kept}; apply with SIGHUP (systemctl reload inspectd@<instance>)")
        _audit_calibration(args, upd)
    else:
        print("config: not changed (--dry-run)")
    return 0


def _audit_calibration(args: argparse.Namespace, upd: Any) -> None:
    """The audit record of a calibration that changed the line's threshold (daemon/audit.py)."""
    import logging

    from inspectd.calibration.config_update import state_dir
    from inspectd.daemon.audit import AuditLog, audit_path, local_who
    from inspectd.errors import InspectdError

    try:
        AuditLog(audit_path(state_dir(args.config))).append(
            args.line, "calibrate", {"threshold": upd.old_threshold},
            {"threshold": upd.new_threshold, "threshold_file": str(upd.calibration_file),
             "bundle": str(args.bundle), "config_changed": upd.config_changed},
            local_who("calibrate"), "inspectd calibrate (applies at the next SIGHUP)")
    except (InspectdError, OSError) as exc:
        logging.getLogger("inspectd.calibration").warning("audit log not written: %s", exc)
