"""NG archive: keep the image, heatmap and verdict header of rejected parts for later review.

Layout: <root>/<line>/<YYYY-MM-DD>/<HHMMSSmmm>_f<frame_id>{.png, _heatmap.png, .json}
(local date/time of acquisition, so names sort chronologically). Each file is written to a
temp file in the same directory, fsynced and renamed into place: a crash never leaves a
half-written image under a real name, and the JSON sidecar is written last, so its presence
marks a complete record.

The archive is a side job: it runs in its own thread behind a bounded queue (full -> the item is
dropped and counted), `save()` never raises, and any OSError (disk full, read-only, permission)
switches archiving off (metric archive_enabled=0, one log line) instead of disturbing inspection.
While off, one record every `retry_s` is let through as a probe: once it is written (space is
back, the disk is writable again) the archive rescans its folder and is on again by itself
(metric 1, one log line); no restart needed. The quota is enforced by deleting the oldest records; the directory
is scanned once at start and the total is tracked from then on.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import queue
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inspectd.fileio import atomic_write, fsync_dir, json_value
from inspectd.errors import ConfigError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
_DAY_DIR = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_SUFFIXES = ("_heatmap.png", ".png", ".json")  # longest first: "_heatmap.png" also ends with ".png"


_STOP = object()
RETRY_S = 30.0  # while switched off, try one record this often
RECORD_MODE = 0o640  # reviewers in the service's group read the evidence


@dataclass
class _Record:
    stem: Path                     # <day dir>/<name without suffix>
    paths: list[Path] = field(default_factory=list)
    size: int = 0


def _nbytes(array: Any) -> int:
    return int(getattr(array, "nbytes", 0) or 0)


def _encode_png(image: np.ndarray, rgb: bool) -> bytes:
    import cv2

    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
        raise ValueError(f"expected a uint8 H x W or H x W x 3 image, got {image.dtype} {image.shape}")
    if rgb and image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # frames are RGB, OpenCV writes BGR
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


class NgArchive:
    """Archive of NG parts for one line. `start()` it, `save()` from any thread, `stop()` at the end."""

    def __init__(self, root: str | os.PathLike, quota_bytes: int, line: str, metrics: Any = None,
                 queue_size: int = 32, retry_s: float = RETRY_S, queue_bytes: int = 256 * 1024 * 1024) -> None:
        if not isinstance(quota_bytes, int) or quota_bytes <= 0:
            raise ConfigError(f"archive quota must be a positive number of bytes, got {quota_bytes!r}")
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", line or ""):
            raise ConfigError(f"line name must be 1-64 of A-Z a-z 0-9 _ -, got {line!r}")
        if queue_size < 1:
            raise ConfigError(f"archive queue size must be >= 1, got {queue_size}")
        self.root = Path(root)
        self.line_dir = self.root / line
        self.quota_bytes = quota_bytes
        self.line = line
        self.metrics = metrics
        self.enabled = True
        self.retry_s = float(retry_s)
        self.recoveries = 0      # times the archive switched itself back on
        self._disabled_at = 0.0
        self._probe_queued = False
        self.saved = 0
        self.dropped = 0         # queue full
        self.errors = 0
        self.deleted = 0         # records removed for the quota
        self.undeletable = 0     # files the quota could not remove (left in place, no longer counted)
        self.total_bytes = 0     # bytes of archived records (worker thread writes, others read)
        self._records: deque[_Record] = deque()
        self._stems: set[Path] = set()
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        # Bytes of the arrays queued (frames can be tens of MB each): bounded like the count.
        self.queue_bytes = int(queue_bytes)
        self._queued_bytes = 0
        self._bytes_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._scanned = threading.Event()
        self._stopping = False
        if metrics is not None:
            metrics.archive_enabled.labels(line=line).set(1)
            metrics.archive_errors.labels(line=line)

    # ---- any thread --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"inspectd-archive-{self.line}", daemon=True)
        self._thread.start()

    def save(self, frame_image: np.ndarray, heatmap_u8: np.ndarray | None, header_dict: dict) -> bool:
        """Queue one NG record; True when queued. Never raises. The arrays must not be modified
        afterwards (they are written later, by the archive thread)."""
        probe = False
        try:
            if self._stopping:
                return False
            if not self.enabled:
                # Off: only a probe now and then, to find out whether the disk is usable again.
                if self._probe_queued or time.monotonic() - self._disabled_at < self.retry_s:
                    return False
                probe = self._probe_queued = True
            size = _nbytes(frame_image) + _nbytes(heatmap_u8)
            with self._bytes_lock:
                if self._queued_bytes and self._queued_bytes + size > self.queue_bytes:
                    raise queue.Full
                self._queue.put_nowait((frame_image, heatmap_u8, dict(header_dict), probe))
                self._queued_bytes += size
            return True
        except queue.Full:
            if probe:
                self._probe_queued = False
            self.dropped += 1
            if self.metrics is not None and hasattr(self.metrics, "archive_dropped"):
                self.metrics.archive_dropped.labels(line=self.line).inc()
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("NG archive %s: writer busy, %d records dropped so far", self.line, self.dropped)
            return False
        except Exception:
            log.exception("NG archive %s: save failed", self.line)
            return False

    def submit(self, frame: Any, verdict: Any) -> bool:
        """Archive a Frame with its Verdict (what LinePipeline calls for NG parts). Never raises."""
        try:
            header = {
                "line": verdict.line, "frame_id": verdict.frame_id, "acquired_ns": verdict.acquired_ns,
                "verdict": verdict.verdict, "score": verdict.score, "raw_score": verdict.raw_score,
                "threshold": verdict.threshold, "latency_ms": verdict.latency_ms,
                "deadline_missed": verdict.deadline_missed, "backend": verdict.backend,
                "bundle_id": verdict.bundle_id, "error": verdict.error,
                "meta": {k: v for k, v in getattr(frame, "meta", {}).items() if isinstance(v, (str, int, float))},
            }
            return self.save(frame.image, verdict.heatmap, header)
        except Exception:
            log.exception("NG archive %s: submit failed", self.line)
            return False

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until the start-up scan is done and everything queued is written (or discarded)."""
        end = time.monotonic() + timeout
        if not self._scanned.wait(timeout):
            return False
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def stop(self, timeout: float = 10.0) -> bool:
        """Write what is queued, then end the thread. True when it ended within `timeout`."""
        self._stopping = True
        if self._thread is None:
            return True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---- archive thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._scan()
            self._enforce_quota()
        except OSError as exc:
            self._disable(exc)
        finally:
            self._scanned.set()
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                image, heatmap, header, probe = item
                with self._bytes_lock:
                    self._queued_bytes -= _nbytes(image) + _nbytes(heatmap)
                if probe:
                    self._probe(image, heatmap, header)
                elif self.enabled:
                    self._write(image, heatmap, header)
            except Exception:  # one bad record must never end the writer: the queue would fill for good
                self._count_error()
                log.exception("NG archive %s: record failed", self.line)
            finally:
                self._queue.task_done()

    def _probe(self, image: np.ndarray, heatmap: np.ndarray | None, header: dict) -> None:
        """Archive off: rescan (space may have been freed by hand) and try this one record."""
        try:
            try:
                self._records.clear()
                self._stems.clear()
                self.total_bytes = 0
                self._scan()
            except OSError as exc:
                self._disable(exc)
                return
            before = self.errors
            self._write(image, heatmap, header)
            if self.errors == before and not self.enabled:
                self.enabled = True
                self.recoveries += 1
                if self.metrics is not None:
                    self.metrics.archive_enabled.labels(line=self.line).set(1)
                log.warning("NG archive %s enabled again (%s is writable)", self.line, self.line_dir)
        finally:
            self._probe_queued = False

    def _count_error(self) -> None:
        self.errors += 1
        if self.metrics is not None:
            self.metrics.archive_errors.labels(line=self.line).inc()

    def _disable(self, exc: OSError) -> None:
        self._count_error()
        self._disabled_at = time.monotonic()
        if self.enabled:
            self.enabled = False
            if self.metrics is not None:
                self.metrics.archive_enabled.labels(line=self.line).set(0)
            log.error("NG archive %s disabled: %s", self.line, exc)

    def _scan(self) -> None:
        """Rebuild the record list from disk (previous runs), oldest first; drop stale temp files."""
        self.line_dir.mkdir(parents=True, exist_ok=True)
        by_stem: dict[Path, _Record] = {}
        for day in sorted(p for p in self.line_dir.iterdir() if p.is_dir() and _DAY_DIR.match(p.name)):
            for path in day.iterdir():
                if path.name.startswith(TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        path.unlink()  # left by a crash mid-write
                    continue
                if not path.is_file():
                    continue
                suffix = next((s for s in _SUFFIXES if path.name.endswith(s)), None)
                if suffix is None:
                    continue  # not ours: neither counted nor deleted
                stem = day / path.name[: -len(suffix)]
                rec = by_stem.setdefault(stem, _Record(stem))
                rec.paths.append(path)
                rec.size += path.stat().st_size
        for stem in sorted(by_stem, key=lambda s: (s.parent.name, s.name)):
            self._add(by_stem[stem])

    def _add(self, rec: _Record) -> None:
        self._records.append(rec)
        self._stems.add(rec.stem)
        self.total_bytes += rec.size

    def _enforce_quota(self) -> None:
        # The newest record stays even when it alone is over the quota: it is the one just asked for.
        while self.total_bytes > self.quota_bytes and len(self._records) > 1:
            rec = self._records.popleft()
            for path in rec.paths:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except PermissionError as exc:
                    # Made undeletable by someone else (chattr +i, another owner): leave it and stop
                    # counting it, so the quota is kept on the records this archive can delete. Not an
                    # error of the archive's own writes (a probe would never see the disk as usable).
                    self.undeletable += 1
                    log.warning("NG archive %s: cannot delete %s (%s): left in place, no longer counted",
                                self.line, path, exc.strerror or exc)
            self._stems.discard(rec.stem)
            self.total_bytes -= rec.size
            self.deleted += 1
            day = rec.stem.parent
            if day != self._records[0].stem.parent:
                with contextlib.suppress(OSError):
                    day.rmdir()  # only succeeds once the day is empty

    def _stem_for(self, header: dict) -> Path:
        acquired_ns = header.get("acquired_ns")
        ns = acquired_ns if isinstance(acquired_ns, int) and acquired_ns > 0 else time.time_ns()
        t = dt.datetime.fromtimestamp(ns / 1e9)
        frame_id = header.get("frame_id")
        fid = f"{int(frame_id):010d}" if isinstance(frame_id, (int, np.integer)) else "unknown"
        name = f"{t:%H%M%S}{t.microsecond // 1000:03d}_f{fid}"
        stem = self.line_dir / f"{t:%Y-%m-%d}" / name
        n = 1
        while stem in self._stems:  # same ms and frame id (e.g. after a restart): keep both
            n += 1
            stem = stem.with_name(f"{name}-{n}")
        return stem

    def _write(self, image: np.ndarray, heatmap: np.ndarray | None, header: dict) -> None:
        try:
            stem = self._stem_for(header)
            sidecar = dict(json_value(header))
            files: list[tuple[Path, bytes]] = []
            # A frame that arrived without pixels (a malformed camera buffer) keeps its sidecar: the
            # record of the fail-safe verdict is the evidence.
            for part, array, rgb in (("image_file", image, True), ("heatmap_file", heatmap, False)):
                sidecar[part] = None
                if array is not None:
                    path = stem.with_name(stem.name + (".png" if rgb else "_heatmap.png"))
                    files.append((path, _encode_png(array, rgb=rgb)))
                    sidecar[part] = path.name
            files.append((stem.with_name(stem.name + ".json"),
                          json.dumps(sidecar, allow_nan=False, indent=1).encode()))
        except Exception as exc:  # a bad item (cv2.error included), not a bad disk: skip it, stay enabled
            self._count_error()
            log.error("NG archive %s: record skipped: %s", self.line, exc)
            return
        rec = _Record(stem)
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            for path, data in files:
                atomic_write(path, data, mode=RECORD_MODE, tmp_prefix=TMP_PREFIX, sync_dir=False)
                rec.paths.append(path)
                rec.size += len(data)
            fsync_dir(stem.parent)
        except OSError as exc:
            for path in rec.paths:  # no half records: they would confuse review and quota
                with contextlib.suppress(OSError):
                    path.unlink()
            self._disable(exc)
            return
        self._add(rec)
        self.saved += 1
        try:
            self._enforce_quota()
        except OSError as exc:
            self._disable(exc)
