"""`inspectd capture`: teach from the camera. Opens a line's own source (the daemon's code:
`make_source`), keeps every K-th frame until N are kept, and writes them as lossless PNGs for
`inspectd train` / `inspectd calibrate`.

What is saved, and why: the WHOLE frame exactly as the source hands it to the daemon (after the
pixel-format conversion, before `preprocess.prepare`), at source resolution, grey frames as 8-bit
grey PNGs and colour frames as RGB PNGs. Training then reads them through the same `prepare` (ROI
crop -> colour -> resize) that the daemon applies to the same frames, with the line's ROI given
to `inspectd train --roi` and recorded in the bundle. Saving the ROI crop instead would train a
bundle "on whole frames" (no ROI in the manifest) that the daemon would then feed uncropped
frames: train and line would see different pixels. The command prints the train command with
the line's ROI, and the calibrate command for a capture of held-out good parts (never both).

All or nothing: frames go to a staging folder next to OUT (each file temp + rename + fsync) and
the folder is renamed into place at the end, so OUT holds a complete capture or what it held
before. `capture.json` in it records the line, the source, the frames and their shape. OUT is
looked at again before the rename: if anything was put in it since the check (a second capture,
an operator's images), nothing is replaced and the frames stay in a sibling folder the error names.
A stop (SIGINT, SIGTERM, SIGHUP) or any error removes the staging folder: an interrupted capture
writes nothing, OUT keeps what it held (README: "nothing is left behind"); exit code 128 + signal.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from inspectd.fileio import is_or_holds
from inspectd.errors import ConfigError, DataError, InspectdError

if TYPE_CHECKING:
    from inspectd.daemon.frame import Frame
    from inspectd.daemon.sources.base import Source

log = logging.getLogger("inspectd.capture")

MANIFEST = "capture.json"
DEFAULT_TIMEOUT_S = 10.0
READ_SLICE_S = 0.25  # the longest a stop request waits for the capture loop to notice it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass
class CaptureResult:
    out: Path
    files: list[Path]
    shape: tuple[int, ...]
    frames_read: int
    seconds: float
    roi: tuple[int, int, int, int] | None = None
    bundle: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    line: str | None = None
    config: Path | None = None

    def train_command(self, out: Path | None = None) -> str:
        """`inspectd train` on these frames with the line's ROI, into `out` (default: the line's bundle)."""
        roi = f" --roi {','.join(map(str, self.roi))}" if self.roi is not None else ""
        bundle = out if out is not None else self.bundle
        return f"inspectd train --good {_q(self.out)}{roi} --out {_q(bundle) if bundle is not None else 'BUNDLE'}"

    def calibrate_command(self) -> str:
        """`inspectd calibrate` of the line's bundle on these frames (held-out good parts)."""
        bundle = _q(self.bundle) if self.bundle is not None else "BUNDLE"
        config = _q(self.config) if self.config is not None else "CONFIG"
        return (f"inspectd calibrate --bundle {bundle} --good {_q(self.out)} --line {_q(self.line or 'LINE')} "
                f"--config {config} --target-false-reject 1%")

    def next_steps(self) -> list[str]:
        """The closing hint: the same capture command makes training sets and calibration sets, and
        only the operator knows which this was. Calibrating on training images gives a threshold
        that is too low (the model fits them), so the hint says never both."""
        exists = self.bundle is not None and self.bundle.exists()
        # The line's bundle may be the one running: train beside it; `train --force` would replace it.
        train_out = _free_sibling(self.bundle) if exists and self.bundle is not None else None
        hint = [f"next, if these are training images:   {self.train_command(train_out)}",
                f"  or, if they are held-out good parts{'' if exists else ' (once the bundle is trained)'}: "
                f"{self.calibrate_command()}",
                "  (never both with the same images: a threshold calibrated on images the model was trained on "
                "is too low and rejects good parts)"]
        if train_out is not None:
            hint.append(f"  ({self.bundle} exists and may be the bundle the line runs: train beside it, never over "
                        f"it; `inspectd shadow` tries the new bundle beside it, `inspectd promote` then switches the line)")
        return hint


def _q(path: Path | str) -> str:
    return shlex.quote(str(path))


def _free_sibling(bundle: Path) -> Path:
    """A folder name next to `bundle` that does not exist yet, for a new bundle."""
    for n in range(1, 1000):
        candidate = bundle.with_name(f"{bundle.name}-new{'' if n == 1 else n}")
        if not candidate.exists():
            return candidate
    return bundle.with_name(f"{bundle.name}-new-{time.strftime('%Y%m%dT%H%M%S')}")


class CaptureInterrupted(InspectdError):
    """A stop signal ended the capture; nothing was written. Exit code 128 + the signal number, as a
    shell reports a command killed by it (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, written: int, count: int, out: Path) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} after {written} of {count} frames: nothing "
                         f"written to {out} (a capture is kept only when complete; run the command again)")


class _StopSignals:
    """While a capture runs, SIGINT, SIGTERM and SIGHUP only record that a stop was asked; the capture
    loop looks between frames (reads last at most READ_SLICE_S) and cleans up. The default actions
    end the process without removing the staging folder (SIGTERM, SIGHUP) or raise KeyboardInterrupt
    anywhere, halfway through a rename included. A signal the process ignores (nohup) stays ignored.
    Handlers can be installed from the main thread only: elsewhere nothing changes."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, _frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def _open_off_main_thread(source: "Source") -> None:
    """`source.open()` in a helper thread, as the daemon's acquisition thread opens it: harvesters
    installs its own SIGINT handler, which destroys the acquirer, when a camera is opened in the
    main thread; Ctrl-C then looked like a lost camera and the capture reconnected and went on."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            source.open()
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    opener = threading.Thread(target=run, name="capture-open", daemon=True)
    opener.start()
    opener.join()
    if failure:
        raise failure[0]


@dataclass(frozen=True)
class _Seen:
    """What OUT held when it was checked: the folder's identity and every entry's, so publishing
    hours later can tell whether anything was added, changed or swapped in since."""

    folder: tuple[int, int] | None  # (st_dev, st_ino); None: OUT did not exist
    entries: frozenset[tuple[str, int, int, int]] = frozenset()  # (relative path, inode, size, mtime_ns)


def _look(out: Path) -> _Seen:
    """OUT's identity and contents now (see _Seen)."""
    try:
        st = out.stat()
    except FileNotFoundError:
        return _Seen(None)
    if not out.is_dir():
        return _Seen((st.st_dev, st.st_ino))
    entries = set()
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            path = Path(root, name)
            try:
                s = path.lstat()
            except FileNotFoundError:  # removed while we look: the set differs from the check's anyway
                continue
            entries.add((str(path.relative_to(out)), s.st_ino, s.st_size, s.st_mtime_ns))
    return _Seen((st.st_dev, st.st_ino), frozenset(entries))


def _check_out(out: Path, force: bool, inputs: tuple[Path | None, ...] = ()) -> _Seen:
    """--out may be new, empty, or (with --force) a folder an earlier capture made; never the line's
    own input or bundle, nor a folder holding them (a replaced folder is deleted). Returns what OUT
    held, for `_publish` to replace that and nothing else."""
    for taken in inputs:
        if taken is not None and is_or_holds(out, taken):
            raise DataError(f"{out}: is or holds the line's {taken}; a capture goes to a folder of its own")
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DataError(f"{out}: folder is not empty (use --force to replace its contents)")
        if not (out / MANIFEST).is_file():
            raise DataError(f"{out}: folder not made by inspectd capture (no {MANIFEST}): --force replaces "
                            f"only an earlier capture; choose another --out")
    return _look(out)


class _OutChanged(Exception):
    """OUT is no longer what `_check_out` saw: publishing would delete what someone put there."""


def _encode_png(image: np.ndarray, name: str) -> bytes:
    import cv2

    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise DataError(f"{name}: cannot encode the frame of shape {image.shape} as PNG")
    return buf.tobytes()


def _no_space(exc: OSError, out: Path, written: int, count: int) -> InspectdError:
    why = exc.strerror or str(exc)
    return InspectdError(f"cannot write the capture to {out}: {why} ({written} of {count} frames written, "
                         f"nothing kept)")


def capture(config_path: str | os.PathLike, line_id: str, out: str | os.PathLike, count: int, every: int = 1,
            force: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
            progress: Callable[[str], None] | None = None) -> CaptureResult:
    """Save `count` frames (every `every`-th) of line `line_id`'s source into `out` (see module doc).

    Errors are one line: an unknown line (ConfigError), a non-empty `out` without `force`, a camera
    that does not open or delivers no frame within `timeout_s` (SourceError/InspectdError), a full
    disk (InspectdError; nothing is left behind), SIGINT/SIGTERM/SIGHUP (CaptureInterrupted, from
    the main thread; nothing is left behind)."""
    from inspectd.daemon.config import load_config
    from inspectd.daemon.sources import SourceError, SourceLost, make_source
    from inspectd.engines.preprocess import crop_roi
    from inspectd.fileio import atomic_write, fsync_dir

    if count <= 0 or every <= 0:
        raise ConfigError(f"--count and --every must be > 0 (got {count} and {every})")
    if not timeout_s > 0:
        raise ConfigError(f"--timeout must be > 0 (got {timeout_s})")
    config = load_config(config_path)
    line = config.line(line_id)
    out = Path(out).expanduser()
    seen = _check_out(out, force, (getattr(line.source, "path", None), line.bundle))
    say = progress or (lambda text: None)
    source = make_source(line)
    t0 = time.monotonic()

    retry = line.source.type == "genicam"  # a replay input that is not there will not appear

    files: list[Path] = []
    stops = _StopSignals()

    def stop_if_asked() -> None:
        if stops.signum is not None:
            raise CaptureInterrupted(stops.signum, len(files), count, out)

    def open_source() -> None:
        # An unplugged camera: keep trying (like the daemon's reconnect) until the timeout, then say why.
        end = time.monotonic() + timeout_s
        while True:
            stop_if_asked()
            try:
                _open_off_main_thread(source)
                return
            except SourceError as exc:
                source.close()
                stop_if_asked()
                if not retry or time.monotonic() >= end:
                    raise SourceError(f"line {line_id}: camera not available after {timeout_s:g} s: {exc}" if retry
                                      else str(exc)) from None
                time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def read_frame() -> "Frame | None":
        # In slices: a stop is noticed within READ_SLICE_S, not after the whole --timeout.
        end = time.monotonic() + timeout_s
        while True:
            frame = source.read(min(READ_SLICE_S, max(end - time.monotonic(), 0.0)))
            if frame is not None or source.exhausted or stops.signum is not None or time.monotonic() >= end:
                return frame

    with stops:  # before the staging folder exists: a stop from here on removes it
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.capture-", dir=out.parent))
        except OSError as exc:
            raise InspectdError(f"cannot create a folder next to {out}: {exc.strerror or exc}") from None
        kept: Path | None = None  # where the frames stay when OUT changed during the capture
        frames_read = 0
        shape: tuple[int, ...] = ()
        try:
            open_source()
            say(f"capturing {count} frames ({'every frame' if every == 1 else f'1 frame in {every}'}) "
                f"from {source.describe()}")
            while len(files) < count:
                stop_if_asked()
                try:
                    frame = read_frame()
                except SourceLost as exc:
                    stop_if_asked()  # a signal may be what broke the camera's wait: a stop, not a loss
                    source.close()
                    say(f"camera lost ({exc}); reconnecting")
                    open_source()
                    continue
                stop_if_asked()
                if frame is None:
                    if source.exhausted:
                        raise DataError(f"line {line_id}: {source.describe()} ended after {frames_read} frames; "
                                        f"{count} frames every {every} need {count * every} (use a smaller --count "
                                        f"or --every, or loop: true)")
                    raise SourceError(f"line {line_id}: no frame from {source.describe()} within {timeout_s:g} s "
                                      f"(camera unplugged, or waiting for a trigger?)")
                frames_read += 1
                if (frames_read - 1) % every:
                    continue
                image = frame.image
                if not isinstance(image, np.ndarray):  # delivered, but in a form that cannot be saved
                    raise DataError(f"line {line_id}: frame {frame.frame_id}: "
                                    f"{frame.meta.get('error') or 'no image'}")
                if not files:
                    shape = tuple(image.shape)
                    if line.roi is not None:
                        crop_roi(image, line.roi)  # DataError now, not at training: the ROI must fit the frame
                elif tuple(image.shape) != shape:
                    raise DataError(f"line {line_id}: frame {frame.frame_id} is {image.shape}, the first was "
                                    f"{shape} (the camera's format changed during the capture)")
                name = f"frame_{len(files) + 1:05d}.png"
                data = _encode_png(image, name)
                try:
                    atomic_write(staging / name, data, mode=0o644, sync_dir=False)
                except OSError as exc:
                    raise _no_space(exc, out, len(files), count) from None
                files.append(out / name)
                if len(files) % 10 == 0 or len(files) == count:
                    say(f"  {len(files)}/{count}")
            manifest = {"line": line_id, "config": str(Path(config_path).resolve()), "source": source.describe(),
                        "frames": len(files), "every": every, "frames_read": frames_read, "shape": list(shape),
                        "roi": list(line.roi) if line.roi is not None else None, "bundle": str(line.bundle),
                        "saved": "whole frames as the source delivers them (train with --roi = the line's roi)",
                        "files": [p.name for p in files]}
            try:
                atomic_write(staging / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), mode=0o644,
                             sync_dir=False)
                fsync_dir(staging)
                os.chmod(staging, 0o755)  # mkdtemp makes it 0700: the service user reads it for training
                # The last point a stop is honoured: once publishing starts it completes (a stop halfway
                # could leave an earlier capture moved aside), and the capture is then whole in OUT.
                stop_if_asked()
                _publish(staging, out, seen)
            except _OutChanged as exc:
                kept = _keep(staging)
                raise DataError(f"{out}: {exc} during the capture, not replaced (nothing deleted); the "
                                f"{len(files)} frames captured are kept in {kept}") from None
            except OSError as exc:
                raise _no_space(exc, out, len(files), count) from None
        finally:
            try:
                source.close()
            finally:  # also when closing the camera fails: no staging folder is left behind
                if kept is None and staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
    return CaptureResult(out=out, files=files, shape=shape, frames_read=frames_read,
                         seconds=time.monotonic() - t0, roi=line.roi, bundle=line.bundle, line=line_id,
                         config=Path(config_path))


def _publish(staging: Path, out: Path, seen: _Seen) -> None:
    """Rename the finished staging folder to `out`. A non-empty `out` is replaced only if it is still
    exactly what `_check_out` saw (an earlier capture, with --force): the capture may have lasted
    hours, and what was put in `out` meanwhile (an operator's images, a second capture) is not ours
    to delete. Raises _OutChanged then."""
    from inspectd.fileio import fsync_dir

    aside: Path | None = None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if seen.folder is None or _look(out) != seen:
            raise _OutChanged("was created and filled" if seen.folder is None
                              else "was filled" if not seen.entries else "changed")
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent)) / "x"
        os.replace(out, aside)
        if _look(aside) != seen:  # written to between the look and the move: put it back
            _put_back(aside, out)
            raise _OutChanged("changed")
    try:
        os.replace(staging, out)  # rename(2) takes a new or empty folder, never a non-empty one
    except OSError as exc:
        if aside is not None:
            _put_back(aside, out)
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):  # filled since the look
            raise _OutChanged("was filled") from None
        raise
    if aside is not None:
        shutil.rmtree(aside.parent, ignore_errors=True)
    fsync_dir(out.parent)


def _put_back(aside: Path, out: Path) -> None:
    """Return OUT's old contents from `aside`; if OUT was recreated meanwhile, leave them in `aside`
    (a sibling of OUT), never delete them."""
    try:
        os.replace(aside, out)
        aside.parent.rmdir()
    except OSError:
        log.warning("%s was recreated meanwhile; its previous contents are in %s", out, aside)


def _keep(staging: Path) -> Path:
    """Make the refused capture's staging folder a visible sibling of OUT (not a hidden temp folder
    that looks like litter) and return where it is."""
    visible = staging.with_name(staging.name.lstrip("."))
    try:
        visible.mkdir()  # claims the name: os.replace would take an existing empty folder silently
    except OSError:
        return staging
    try:
        os.replace(staging, visible)
        return visible
    except OSError:
        with contextlib.suppress(OSError):
            visible.rmdir()
        return staging


# ------------------------------------------------------------------------------ CLI
def cmd_capture(args: argparse.Namespace) -> int:
    try:
        result = capture(args.config, args.line, args.out, args.count, every=args.every, force=args.force,
                         timeout_s=args.timeout, progress=lambda text: print(text, flush=True))
    except CaptureInterrupted as exc:  # asked for, not an error: said like the CLI's own "interrupted"
        print(f"inspectd capture: {exc}", file=sys.stderr)
        return exc.exit_code
    h, w = result.shape[:2]
    print(f"{len(result.files)} frames ({w}x{h}{'' if len(result.shape) == 2 else ' RGB'}) in {result.out} "
          f"({result.frames_read} read, {result.seconds:.1f} s)")
    for line in result.next_steps():
        print(line)
    return 0


def register_capture(sub: Any) -> None:
    p = sub.add_parser("capture", help="save frames from a line's camera (or replay) for training",
                       description="Open the line's own source (the daemon's code) and save N frames, every "
                                   "K-th, as lossless PNGs at source resolution: whole frames as the daemon "
                                   "receives them, so `inspectd train --roi <the line's roi>` crops and resizes "
                                   "them exactly as the daemon will. All or nothing: OUT holds a complete "
                                   "capture or what it held before.")
    p.add_argument("--config", required=True, metavar="FILE", help="daemon config (YAML) with the line")
    p.add_argument("--line", required=True, help="line id in the config")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the frames (must be empty or new)")
    p.add_argument("--count", required=True, type=int, metavar="N", help="frames to save")
    p.add_argument("--every", type=int, default=1, metavar="K", help="keep every K-th frame (default 1)")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty OUT")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"seconds to wait for the camera to open and for each frame (default {DEFAULT_TIMEOUT_S:g})")
    p.set_defaults(func=cmd_capture)
