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
the line's ROI.

All or nothing: frames go to a staging folder next to OUT (each file temp + rename + fsync) and
the folder is renamed into place at the end, so OUT holds a complete capture or what it held
before. `capture.json` in it records the line, the source, the frames and their shape. OUT is
looked at again before the rename: if anything was put in it since the check (a second capture,
an operator's images), nothing is replaced and the frames stay in a sibling folder the error names.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from inspectd.fileio import is_or_holds
from inspectd.errors import ConfigError, DataError, InspectdError

log = logging.getLogger("inspectd.capture")

MANIFEST = "capture.json"
DEFAULT_TIMEOUT_S = 10.0


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

    def train_command(self) -> str:
        roi = f" --roi {','.join(map(str, self.roi))}" if self.roi is not None else ""
        bundle = self.bundle if self.bundle is not None else "BUNDLE"
        return f"inspectd train --good {self.out}{roi} --out {bundle}"


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
    disk (InspectdError; nothing is left behind)."""
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

    def open_source() -> None:
        # An unplugged camera: keep trying (like the daemon's reconnect) until the timeout, then say why.
        end = time.monotonic() + timeout_s
        while True:
            try:
                source.open()
                return
            except SourceError as exc:
                source.close()
                if not retry or time.monotonic() >= end:
                    raise SourceError(f"line {line_id}: camera not available after {timeout_s:g} s: {exc}" if retry
                                      else str(exc)) from None
                time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.capture-", dir=out.parent))
    except OSError as exc:
        raise InspectdError(f"cannot create a folder next to {out}: {exc.strerror or exc}") from None
    files: list[Path] = []
    kept: Path | None = None  # where the frames stay when OUT changed during the capture
    frames_read = 0
    shape: tuple[int, ...] = ()
    try:
        open_source()
        say(f"capturing {count} frames ({'every frame' if every == 1 else f'1 frame in {every}'}) "
            f"from {source.describe()}")
        while len(files) < count:
            try:
                frame = source.read(timeout_s)
            except SourceLost as exc:
                source.close()
                say(f"camera lost ({exc}); reconnecting")
                open_source()
                continue
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
                raise DataError(f"line {line_id}: frame {frame.frame_id} is {image.shape}, the first was {shape} "
                                f"(the camera's format changed during the capture)")
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
            _publish(staging, out, seen)
        except _OutChanged as exc:
            kept = _keep(staging)
            raise DataError(f"{out}: {exc} during the capture, not replaced (nothing deleted); the {len(files)} "
                            f"frames captured are kept in {kept}") from None
        except OSError as exc:
            raise _no_space(exc, out, len(files), count) from None
    finally:
        source.close()
        if kept is None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return CaptureResult(out=out, files=files, shape=shape, frames_read=frames_read,
                         seconds=time.monotonic() - t0, roi=line.roi, bundle=line.bundle)


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
    result = capture(args.config, args.line, args.out, args.count, every=args.every, force=args.force,
                     timeout_s=args.timeout, progress=lambda text: print(text, flush=True))
    h, w = result.shape[:2]
    print(f"{len(result.files)} frames ({w}x{h}{'' if len(result.shape) == 2 else ' RGB'}) in {result.out} "
          f"({result.frames_read} read, {result.seconds:.1f} s)")
    print(f"next: {result.train_command()}", file=sys.stdout)
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
