"""`inspectd demo`: the whole loop on one machine, no camera or GPU needed.

generate parts -> train on good ones -> calibrate the threshold on held-out good parts -> run the
daemon on a replay line mixing good and defective parts -> subscribe to the verdict stream like a
reject consumer -> print a line per part, write heatmap overlays for NG parts, serve metrics and
the live view -> summary.

`--source genicam` teaches from the camera instead (the GenTL simulator, viky.cti): capture its
frames with `inspectd capture`'s code (the line's own source) -> train on them -> capture more and
calibrate on them -> run on the camera: its normal output is what "good" means, so it passes.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from inspectd.errors import ConfigError, InspectdError

DEMO_SIZE = 128
TARGET_FALSE_REJECT = 0.05   # 5% at 95% confidence needs >= 59 held-out good parts
CALIBRATION_GOOD = 80
# Teaching from the simulator camera (~20 fps, a small square moving over a white field): frames
# spread over the square's path, calibration frames from a later stretch of it.
CAMERA_TEACH_FRAMES, CAMERA_TEACH_EVERY = 40, 3
CAMERA_CALIB_FRAMES, CAMERA_CALIB_EVERY = 100, 1
CAMERA_EPOCHS = 10


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train, calibrate and run a simulated line end to end",
                       description="Generate textured parts with defects, train a small model, calibrate the "
                       "threshold, run the daemon on a replay line (or the GenTL simulator camera), and print the "
                       "verdict stream as a reject consumer sees it.")
    p.add_argument("--source", choices=["replay", "genicam"], default="replay",
                   help="replay generated parts (default), or teach from and run on the GenTL simulator camera "
                        "(viky.cti): capture its frames, train, calibrate, run")
    p.add_argument("--workdir", default=None,
                   help="cache and output folder (default ~/.cache/inspectd/demo); data and model are reused")
    p.add_argument("--parts", type=int, default=40, help="parts to inspect on the line (default 40)")
    p.add_argument("--rate", type=float, default=10.0, help="line rate in parts per second (default 10)")
    p.add_argument("--defect-rate", type=float, default=0.25, help="share of defective parts (default 0.25)")
    p.add_argument("--budget-ms", type=float, default=150.0, help="latency budget per part (default 150 ms)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--retrain", action="store_true", help="train and calibrate again even if cached")
    p.set_defaults(func=_run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def make_line_parts(folder: Path, count: int, defect_rate: float, seed: int) -> list[tuple[str, str]]:
    """`count` unseen parts in line order: (file name, "good"|"bad")."""
    import cv2

    from inspectd.engines.synthetic import DEFECTS, render_part

    marker = folder / f".complete-{count}-{defect_rate}-{seed}"
    rng = np.random.default_rng(seed)
    labels = ["bad" if rng.random() < defect_rate else "good" for _ in range(count)]
    names = [f"part_{i:04d}_{lab}.png" for i, lab in enumerate(labels)]
    if not marker.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # Every marker goes, not only the pngs: another settings' marker left here would later claim
        # these files are its parts and skip generating them (ground truth not matching the parts).
        # Markers first, so an interrupted run leaves none.
        for old in [*folder.glob(".complete-*"), *folder.glob("*.png")]:
            old.unlink()
        for i, (name, lab) in enumerate(zip(names, labels)):
            img, _ = render_part(rng, DEMO_SIZE, defect=DEFECTS[i % len(DEFECTS)] if lab == "bad" else None)
            cv2.imwrite(str(folder / name), img)
        marker.touch()
    return list(zip(names, labels))


def _train_and_calibrate(work: Path, epochs: int, retrain: bool) -> tuple[Path, Path]:
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.synthetic import make_dataset
    from inspectd.engines.train import AUGMENTATIONS, TrainConfig, summary, train
    from inspectd.errors import BundleError

    _step(1, "generating textured parts (good ones to train on, held-out ones to calibrate on)")
    data = make_dataset(work / "data", n_train=60, n_test_good=CALIBRATION_GOOD, n_test_bad=24,
                        size=DEMO_SIZE, seed=0)
    print(f"      {data.root}: 60 training parts, {CALIBRATION_GOOD} held-out good, 24 defective")
    bundle_dir = work / "bundle"
    _step(2, f"training the EfficientNet-Lite0 + normalizing-flow engine on good parts ({epochs} epochs)")
    try:
        if retrain:
            raise BundleError("retrain requested")
        bundle = load_bundle(bundle_dir)
        print(f"      reusing {bundle_dir} (id {bundle.bundle_id}); --retrain to train again")
    except BundleError:
        # The demo's defects are small (a scratch, a spot) on parts that barely vary: per-tap flows at
        # full feature resolution, scored by the map's peak, find them (the MTD defaults average them away).
        # One flow, not the default three: the demo trains in a minute on 2 cores.
        cfg = TrainConfig(model=ModelConfig(image_height=DEMO_SIZE, image_width=DEMO_SIZE, taps=[4, 10],
                                            fusion="separate", members=1,
                                            score_term="nll", reduction="max", hidden_ratio=1.0, steps=4),
                          epochs=epochs, augment=list(AUGMENTATIONS), views=2, seed=0, select=False)
        result = train(data.train_good, bundle_dir, cfg, force=True, golden_bad_dir=data.test_bad)
        print("      " + summary(result))
    return bundle_dir, data.test_good


def _write_config(work: Path, bundle_dir: Path, source: dict[str, Any], budget_ms: float) -> tuple[Path, str, int]:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    metrics_port = _free_port()
    config = {
        "zmq": {"endpoint": endpoint},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "heartbeat_interval_s": 0.5,
        "log_level": "WARNING",
        # its own: the machine's /var/lib/inspectd may belong to a real line's daemon (or not be writable)
        "state_dir": str(work / "state"),
        "lines": [{
            "id": "demo",
            "source": source,
            "bundle": str(bundle_dir),
            "backends": ["onnxruntime"],
            "threshold": 3.0,
            "latency_budget_ms": budget_ms,
            "on_deadline_miss": "NG",
            "queue_size": 4,
            "heatmap": {"publish": "ng", "width": 64, "height": 64, "encoding": "png"},
            "archive": {"enabled": False},
        }],
    }
    path = work / "lines.yaml"
    path.write_text("# written by `inspectd demo`\n" + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, endpoint, metrics_port


def _calibrate(bundle_dir: Path, good: Path, config: Path, count: int = CALIBRATION_GOOD) -> float:
    from inspectd.calibration.calibrate import CalibrationRequest, calibrate
    from inspectd.calibration.config_update import utc_stamp

    _step(3, f"calibrating the line threshold on {count} held-out good parts "
             f"(false-reject target {TARGET_FALSE_REJECT:.0%} at 95% confidence)")
    # The demo made these parts good itself: one that scores like a defect is a part the small demo
    # model learned poorly, kept and said (`inspectd calibrate` refuses it without --accept-outliers).
    result = calibrate(CalibrationRequest(bundle=bundle_dir, good=good, line="demo", config=config,
                                          target_false_reject=TARGET_FALSE_REJECT, accept_outliers=True,
                                          report_dir=config.parent / "calibration" / utc_stamp()))
    threshold = float(result.report["threshold"])
    odd = result.report["outliers"]["images"]
    if odd:
        print(f"      {len(odd)} generated good part(s) score like defects ("
              f"{', '.join(f'{name} {score:.1f}' for name, score in odd[:3])}): kept, as they are good; "
              f"inspectd calibrate asks before keeping such images (--accept-outliers)")
    print(f"      threshold {threshold:.3f} (normalized score) written to {config}")
    return threshold


def _run(args: argparse.Namespace) -> int:
    if args.parts <= 0 or args.rate <= 0 or args.budget_ms <= 0 or not 0 <= args.defect_rate <= 1:
        raise ConfigError("--parts, --rate and --budget-ms must be > 0 and --defect-rate within [0, 1]")
    work = Path(args.workdir or Path.home() / ".cache" / "inspectd" / "demo").expanduser()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.source == "genicam":
        return _run_on_camera(args, work, t0)
    bundle_dir, calib_good = _train_and_calibrate(work, args.epochs, args.retrain)

    parts = make_line_parts(work / "line", args.parts, args.defect_rate, seed=1)
    truth = {i + 1: p for i, p in enumerate(parts)}  # replay frame ids count from 1 in file order
    source: dict[str, Any] = {"type": "replay", "path": str(work / "line"), "fps": args.rate, "loop": False}
    where = f"replay of {len(parts)} unseen parts ({sum(lab == 'bad' for _, lab in parts)} defective)"
    config, endpoint, metrics_port = _write_config(work, bundle_dir, source, args.budget_ms)
    threshold = _calibrate(bundle_dir, calib_good, config)
    _step(4, f"running the daemon on {where} at {args.rate:g} parts/s, budget {args.budget_ms:g} ms")
    print(f"      verdicts on {endpoint}, metrics on http://127.0.0.1:{metrics_port}/metrics, "
          f"live view on http://127.0.0.1:{metrics_port}/")
    rows = _serve_and_watch(config, endpoint, args, truth, work / "overlays")
    _step(5, "summary")
    print(_summary(rows, truth, threshold, work / "overlays", time.monotonic() - t0))
    return 0


def _simulator_source() -> dict[str, Any]:
    import genicam

    cti = Path(genicam.__file__).parent / "viky.cti"
    if not cti.is_file():
        raise InspectdError(f"the GenTL simulator {cti} is not installed (genicam wheel without viky.cti)")
    return {"type": "genicam", "cti": str(cti), "device": {"index": 0}}


def _run_on_camera(args: argparse.Namespace, work: Path, t0: float) -> int:
    """Teach from the camera: capture good frames -> train -> capture held-out frames -> calibrate -> run."""
    from inspectd.daemon.capture import capture
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.train import TrainConfig, summary, train
    from inspectd.errors import BundleError

    cam = work / "genicam"
    cam.mkdir(parents=True, exist_ok=True)
    bundle_dir = cam / "bundle"
    config, endpoint, metrics_port = _write_config(cam, bundle_dir, _simulator_source(), args.budget_ms)
    say = (lambda text: print(f"      {text}", flush=True))
    try:
        if args.retrain:
            raise BundleError("retrain requested")
        bundle = load_bundle(bundle_dir)
        _step(1, "teaching frames from the GenTL simulator camera")
        print(f"      reusing {bundle_dir} (id {bundle.bundle_id}), taught on {cam / 'teach'}; --retrain to teach again")
        _step(2, "training on the camera's frames")
        print("      reusing the bundle")
    except BundleError:
        _step(1, f"capturing {CAMERA_TEACH_FRAMES} good frames from the GenTL simulator camera (viky.cti) "
                 f"with `inspectd capture`")
        print(f"      = inspectd capture --config {config} --line demo --out {cam / 'teach'} "
              f"--count {CAMERA_TEACH_FRAMES} --every {CAMERA_TEACH_EVERY} --force")
        taught = capture(config, "demo", cam / "teach", CAMERA_TEACH_FRAMES, every=CAMERA_TEACH_EVERY, force=True,
                         progress=say)
        _step(2, f"training on the camera's frames ({CAMERA_EPOCHS} epochs, whole frames as the daemon gets them)")
        cfg = TrainConfig(model=ModelConfig(image_height=DEMO_SIZE, image_width=DEMO_SIZE, taps=[4, 10],
                                            color_mode=_color_of(taught.shape), steps=4, members=1),
                          epochs=CAMERA_EPOCHS, seed=0, select=False)
        mc = cfg.model  # the command printed is read from the config trained with, so it cannot drift
        print(f"      = {taught.train_command()} --image-size {DEMO_SIZE} --taps {','.join(map(str, mc.taps))} "
              f"--steps {mc.steps} --members {mc.members} --epochs {cfg.epochs} --no-select")
        result = train(cam / "teach", bundle_dir, cfg, force=True)
        print("      " + summary(result))
    print(f"      capturing {CAMERA_CALIB_FRAMES} more frames for calibration")
    captured = capture(config, "demo", cam / "calibration-capture", CAMERA_CALIB_FRAMES, every=CAMERA_CALIB_EVERY,
                       force=True)
    calib, held_out = _held_out(captured.files, cam / "teach", cam / "calibration-good")
    # The simulator's pattern repeats exactly: frames identical to training frames are not held out.
    print(f"      {held_out} of them differ from every training frame (the simulator repeats its pattern)")
    threshold = _calibrate(bundle_dir, calib, config, count=held_out)
    where = "the GenTL simulator camera (viky.cti), taught on its own frames"
    _step(4, f"running the daemon on {where}, budget {args.budget_ms:g} ms")
    print(f"      verdicts on {endpoint}, metrics on http://127.0.0.1:{metrics_port}/metrics, "
          f"live view on http://127.0.0.1:{metrics_port}/")
    rows = _serve_and_watch(config, endpoint, args, {}, cam / "overlays")
    _step(5, "summary")
    print(_summary(rows, {}, threshold, cam / "overlays", time.monotonic() - t0))
    return 0


def _held_out(files: list[Path], teach: Path, out: Path) -> tuple[Path, int]:
    """Copies of the captured frames whose content is not in the training folder."""
    import shutil

    from inspectd.engines.preprocess import list_images, sha256_file

    seen = {sha256_file(p) for p in list_images(teach)}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    kept = 0
    for path in files:
        if sha256_file(path) not in seen:
            shutil.copy2(path, out / path.name)
            kept += 1
    return out, kept


def _color_of(shape: tuple[int, ...]) -> str:
    return "rgb" if len(shape) == 3 and shape[2] == 3 else "gray"


def _serve_and_watch(config_path: Path, endpoint: str, args: argparse.Namespace,
                     truth: dict[int, tuple[str, str]], overlays: Path) -> list[dict[str, Any]]:
    from inspectd.client import VerdictSubscriber
    from inspectd.daemon.config import load_config
    from inspectd.daemon.run import Daemon

    overlays.mkdir(parents=True, exist_ok=True)
    for old in overlays.glob("*.png"):
        old.unlink()
    rows: list[dict[str, Any]] = []
    heatmaps: dict[int, Any] = {}
    daemon = Daemon(load_config(config_path, validate_paths=True))
    daemon.build()
    sub = VerdictSubscriber(endpoint, lines=["demo"], topics=("verdict", "heatmap", "heartbeat"),
                            heartbeat_timeout_s=3.0,
                            on_gap=lambda topic, exp, got: print(f"      !! gap on {topic}: {got - exp} lost"),
                            on_heartbeat_lost=lambda line: print(f"      !! heartbeat lost on {line}: fail safe"))
    stop = threading.Event()
    logging.getLogger().setLevel(daemon.config.log_level)

    def wait_for_stream() -> None:
        # A reject consumer is connected before parts flow: wait for the first heartbeat.
        end = time.monotonic() + 10.0
        while time.monotonic() < end:
            msg = sub.poll_once(0.1)
            if msg is not None and msg.kind == "heartbeat":
                return
        raise InspectdError("the demo's subscriber got no heartbeat from the daemon within 10 s")

    try:
        if not daemon.start(stop, before_lines=wait_for_stream):
            raise InspectdError("daemon did not become ready")
        print(f"      {'part':<22} {'truth':<5} {'verdict':<7} {'score':>7} {'latency':>9}  deadline")
        deadline = time.monotonic() + args.parts / args.rate + 30.0
        while len(rows) < args.parts and time.monotonic() < deadline:
            msg = sub.poll_once(0.2)
            if msg is None:
                continue
            if msg.kind == "heatmap":
                heatmaps[msg.header["frame_id"]] = msg.heatmap_image()
                continue
            if msg.kind != "verdict":
                continue
            h = msg.header
            name, label = truth.get(h["frame_id"], (f"frame {h['frame_id']}", "-"))
            score = "-" if h["score"] is None else f"{h['score']:.2f}"
            dl = "MISSED" if h["deadline_missed"] else "ok"
            print(f"      {name:<22} {label:<5} {h['verdict']:<7} {score:>7} {h['latency_ms']:>7.1f}ms  {dl}",
                  flush=True)
            rows.append(h)
        # Heatmaps follow their verdicts; collect the last ones before stopping.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            msg = sub.poll_once(0.1)
            if msg is not None and msg.kind == "heatmap":
                heatmaps[msg.header["frame_id"]] = msg.heatmap_image()
    finally:
        stop.set()
        daemon.stop()
        sub.close()
    _write_overlays(rows, heatmaps, truth, config_path.parent / "line", overlays)
    return rows


def _write_overlays(rows: list[dict[str, Any]], heatmaps: dict[int, Any], truth: dict[int, tuple[str, str]],
                    line_dir: Path, overlays: Path) -> None:
    import cv2

    from inspectd.engines.heatmap import overlay

    for h in rows:
        fid = h["frame_id"]
        if h["verdict"] != "NG" or fid not in heatmaps:
            continue
        name = truth.get(fid, (f"frame_{fid}.png", "-"))[0]
        image = cv2.imread(str(line_dir / name), cv2.IMREAD_GRAYSCALE) if fid in truth else None
        heat = heatmaps[fid]
        if image is None:
            image = np.zeros(heat.shape[:2], np.uint8)
        cv2.imwrite(str(overlays / f"NG_{Path(name).stem}.png"), overlay(image, heat.reshape(heat.shape[:2])))


def _summary(rows: list[dict[str, Any]], truth: dict[int, tuple[str, str]], threshold: float,
             overlays: Path, seconds: float) -> str:
    if not rows:
        return "      no verdicts received"
    lat = np.array([r["latency_ms"] for r in rows])
    ng = sum(r["verdict"] == "NG" for r in rows)
    missed = sum(bool(r["deadline_missed"]) for r in rows)
    lines = [f"      parts inspected    {len(rows)}",
             f"      NG                 {ng} ({ng / len(rows):.0%})",
             f"      threshold          {threshold:.3f}",
             f"      latency p50 / p99  {np.percentile(lat, 50):.1f} / {np.percentile(lat, 99):.1f} ms",
             f"      deadline misses    {missed}"]
    known = [(r, truth[r["frame_id"]][1]) for r in rows if r["frame_id"] in truth]
    if known:
        agree = sum((r["verdict"] == "NG") == (lab == "bad") for r, lab in known)
        escapes = sum(r["verdict"] == "OK" and lab == "bad" for r, lab in known)
        false_rejects = sum(r["verdict"] == "NG" and lab == "good" for r, lab in known)
        lines.append(f"      ground truth       {agree}/{len(known)} agree ({agree / len(known):.0%}); "
                     f"{escapes} escapes (bad passed), {false_rejects} false rejects")
    lines.append(f"      NG overlays        {overlays} ({len(list(overlays.glob('*.png')))} files)")
    lines.append(f"      total time         {seconds:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    from inspectd.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
