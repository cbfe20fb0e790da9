"""Replay source: a folder of images or a video file, as a camera would deliver them.

Used for commissioning (run the line on recorded parts), demos and tests. Pacing follows an
absolute monotonic schedule (frame i is due at start + i / fps), so it does not drift; when the
consumer falls behind by more than one frame period the schedule restarts from now, the way a
camera drops frames instead of bursting them.

Decoding happens ahead of time, as a camera delivers decoded frames: a decoder thread keeps up to
`decode_ahead` (default DECODE_AHEAD = 2) decoded frames ready, so `read()` costs a queue get, not
a PNG/JPEG decode on the acquisition thread (the pacing still happens in `read()`). Each file is
decoded once (its colour mode read from the same decode). A looping replay keeps the decoded
frames of its first pass in memory, up to `cache_mb` (default CACHE_MB), and replays later passes
from there: on a 2-core line PC a decode per frame (1-3 ms of CPU) is taken from the engine,
which a real camera's DMA never does. Larger sets decode every pass (logged once).

Unreadable image files are skipped, counted in `stats.skipped_files` and logged: one bad file in
a recorded set should not stop a commissioning run. A whole pass without one readable image is an
error (SourceError), so a folder of junk cannot look like an idle camera.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from inspectd.daemon.config import ReplaySourceConfig
from inspectd.daemon.frame import Frame
from inspectd.daemon.sources.base import Source, SourceError, SourceStats
from inspectd.engines.preprocess import IMAGE_SUFFIXES, decode_image, imdecode
from inspectd.errors import DataError

log = logging.getLogger("inspectd.sources.replay")

__all__ = ["ReplaySource", "label_for"]

_LABELS = ("good", "bad")
DECODE_AHEAD = 2        # decoded frames kept ready by the replay's decoder thread
# The config schema is the one source of defaults.
CACHE_MB = ReplaySourceConfig.model_fields["cache_mb"].default
_END = object()         # decoder: the replay has no more frames


def label_for(path: Path, root: Path | None = None) -> str | None:
    """"good"/"bad" from the nearest folder below `root` whose name says so (good/, bad/,
    test_good/), else from the file name (bad_003.png, part-good-7.jpg), else from the name of
    `root` itself (replaying .../test_bad); None if nothing says."""
    names: list[str] = []
    if root is not None:
        try:
            names = list(reversed(path.relative_to(root).parts[:-1]))
        except ValueError:
            names = []
    for name in [*names, path.stem, root.name if root is not None else ""]:
        words = set(re.split(r"[^a-z]+", name.lower()))
        found = [label for label in _LABELS if label in words]
        if len(found) == 1:
            return found[0]
    return None


class ReplaySource(Source):
    """Frames from image files (sorted by relative path) or from a video file."""

    def __init__(self, line: str, path: str | Path, fps: float | None = None, loop: bool = False,
                 labels: bool = True, color: str = "auto", decode_ahead: int = DECODE_AHEAD,
                 cache_mb: float = CACHE_MB) -> None:
        super().__init__(line)
        if decode_ahead < 0:
            raise SourceError(f"line {line}: replay decode_ahead must be >= 0 (got {decode_ahead})")
        if cache_mb < 0:
            raise SourceError(f"line {line}: replay cache_mb must be >= 0 (got {cache_mb})")
        self.cache_bytes = int(cache_mb * 2**20)   # 0 = decode every pass
        # The first pass's decoded frames (read-only arrays, meta), complete once the pass ended.
        self._cache: list[tuple[np.ndarray, dict[str, Any]]] | None = None
        self._cache_size = 0
        self._cache_complete = False
        self._cache_position = 0
        self.decode_ahead = int(decode_ahead)   # 0 = decode in read(), on the caller's thread
        self._decoded: queue.Queue[Any] | None = None
        self._decoder: threading.Thread | None = None
        self._stop_decoder = threading.Event()
        if fps is not None and not fps > 0:
            raise SourceError(f"line {line}: replay fps must be > 0 (got {fps})")
        if color not in ("auto", "rgb", "gray"):
            raise SourceError(f"line {line}: replay color must be auto, rgb or gray (got {color!r})")
        self.path = Path(path)
        self.fps = fps
        self.loop = loop
        self.labels = labels
        self.color = color
        self._files: list[Path] = []
        self._video: Any = None            # cv2.VideoCapture while open (video mode)
        self._is_video = False
        self._position = 0                 # next file index / next video frame number
        self._good_this_pass = 0
        self._frame_id = 0
        self._schedule_start: float | None = None
        self._scheduled = 0                # frames released on the current schedule
        self._exhausted = False
        self._open = False

    @classmethod
    def from_config(cls, cfg: Any, line: str) -> "ReplaySource":
        return cls(line, cfg.path, fps=cfg.fps, loop=cfg.loop, labels=cfg.labels_from_subfolders,
                   color=cfg.color, cache_mb=cfg.cache_mb)

    def describe(self) -> str:
        kind = "video" if self._is_video else f"{len(self._files)} images"
        pace = f"{self.fps:g} fps" if self.fps else "as fast as taken"
        return f"replay {self.path} ({kind}, {pace}{', loop' if self.loop else ''})"

    @property
    def exhausted(self) -> bool:
        return self._exhausted

    # ---- open / close ----------------------------------------------------------------------------
    def open(self) -> None:
        if self._open:
            return
        self.stats = SourceStats()
        self._position = 0
        self._good_this_pass = 0
        self._frame_id = 0
        self._schedule_start = None
        self._scheduled = 0
        self._exhausted = False
        self._cache = [] if self.loop and self.cache_bytes > 0 else None
        self._cache_size = 0
        self._cache_complete = False
        self._cache_position = 0
        if not self.path.exists():
            raise SourceError(f"line {self.line}: replay input {self.path} does not exist")
        if self.path.is_dir():
            self._is_video = False
            # hidden files and folders (a Mac's ._NAME twins, .Trashes) are not parts, as for list_images
            self._files = sorted((p for p in self.path.rglob("*")
                                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                                  and not any(part.startswith(".") for part in p.relative_to(self.path).parts)),
                                 key=lambda p: p.relative_to(self.path).as_posix())
            if not self._files:
                raise SourceError(f"line {self.line}: no images in {self.path} "
                                  f"(looked for {', '.join(IMAGE_SUFFIXES)}, subfolders included)")
        else:
            self._is_video = True
            self._video = self._open_video()
        self._open = True
        if self.decode_ahead > 0:
            self._stop_decoder.clear()
            self._decoded = queue.Queue(maxsize=self.decode_ahead)
            self._decoder = threading.Thread(target=self._decode_loop, args=(self._decoded,),
                                             name=f"replay-decode-{self.line}", daemon=True)
            self._decoder.start()
        log.info("line %s: %s open", self.line, self.describe())

    def close(self) -> None:
        self._stop_decoder.set()
        decoder, self._decoder = self._decoder, None
        if decoder is not None:
            while decoder.is_alive():
                self._drain()  # unblock a decoder waiting for room
                decoder.join(0.05)
        self._decoded = None
        video, self._video = self._video, None
        if video is not None:
            video.release()
        self._open = False

    def _drain(self) -> None:
        q = self._decoded
        try:
            while q is not None:
                q.get_nowait()
        except queue.Empty:
            pass

    def _decode_loop(self, out: "queue.Queue[Any]") -> None:
        """Decoder thread: the next images (files or video), ahead of read(); then _END, or the
        SourceError of a pass without one readable image."""
        while not self._stop_decoder.is_set():
            try:
                item: Any = self._next_image()
            except Exception as exc:  # handed to read(), raised there on the acquisition thread
                item = exc
            while not self._stop_decoder.is_set():
                try:
                    out.put(_END if item is None else item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item is None or isinstance(item, Exception):
                return

    def _take(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The next decoded image: from the decoder thread, or decoded here (decode_ahead 0)."""
        if self._decoded is None:
            return self._next_image()
        item = self._decoded.get()
        if item is _END:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def _open_video(self) -> Any:
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"line {self.line}: {self.path} is not a readable video "
                              f"(and not a folder of images)")
        return capture

    # ---- frames ----------------------------------------------------------------------------------
    def read(self, timeout_s: float) -> Frame | None:
        if not self._open:
            raise SourceError(f"line {self.line}: replay source read before open()")
        if self._exhausted:
            time.sleep(max(timeout_s, 0.0))  # behave like an idle camera, not a busy loop
            return None
        now = time.monotonic()
        if self.fps is not None and self._schedule_start is not None:
            due = self._schedule_start + self._scheduled / self.fps
            if due - now > timeout_s:  # not due within this call: wait like a camera would
                time.sleep(max(timeout_s, 0.0))
                self.stats.timeouts += 1
                return None
        item = self._take()
        if item is None:
            self._exhausted = True
            log.info("line %s: replay of %s finished (%d frames)", self.line, self.path, self.stats.frames)
            return None
        image, meta = item
        if self.chunk_names:
            for name in self.chunk_names:
                self._chunk_missing(name, "replayed files carry no GenICam chunk data")
            meta["chunks"] = {name: None for name in self.chunk_names}
        self._wait_until_due()
        self._frame_id += 1
        self.stats.frames += 1
        return Frame(line=self.line, frame_id=self._frame_id, acquired_ns=time.time_ns(),
                     acquired_mono=time.monotonic(), image=image, meta=meta)

    def _wait_until_due(self) -> None:
        if self.fps is None:
            return
        now = time.monotonic()
        if self._schedule_start is None:
            self._schedule_start, self._scheduled = now, 0
        due = self._schedule_start + self._scheduled / self.fps
        if now - due > 1.0 / self.fps:
            self._schedule_start, self._scheduled = now, 0  # fell behind: restart, do not burst
        elif due > now:
            time.sleep(due - now)
        self._scheduled += 1

    def _next_image(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The next decodable image and its meta, wrapping around when looping; None at the end."""
        if self._cache_complete and self._cache:
            image, meta = self._cache[self._cache_position]
            self._cache_position = (self._cache_position + 1) % len(self._cache)
            return image, dict(meta)  # read() adds to the meta: never to the cached one
        while True:
            item = self._next_video_frame() if self._is_video else self._next_file()
            if item is not None:
                self._good_this_pass += 1
                self._remember(item)
                return item
            # End of one pass.
            if self._good_this_pass == 0:
                raise SourceError(f"line {self.line}: no readable image in {self.path} "
                                  f"({self.stats.skipped_files} unreadable file(s) skipped)")
            if not self.loop:
                return None
            if self._cache:
                self._cache_complete = True  # later passes come from memory
                return self._next_image()
            self._position = 0
            self._good_this_pass = 0
            if self._is_video:
                self._video.release()
                self._video = self._open_video()

    def _remember(self, item: tuple[np.ndarray, dict[str, Any]]) -> None:
        """Keep a first-pass frame for the later passes, while the whole pass fits the budget."""
        if self._cache is None or self._cache_complete:
            return
        image, meta = item
        self._cache_size += image.nbytes
        if self._cache_size > self.cache_bytes:
            log.info("line %s: replay of %s is larger than cache_mb %g MiB: decoding every pass",
                     self.line, self.path, self.cache_bytes / 2**20)
            self._cache = None
            return
        image.flags.writeable = False  # shared by every pass: nobody may draw on it
        self._cache.append((image, dict(meta)))

    def _next_file(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        while self._position < len(self._files):
            path = self._files[self._position]
            self._position += 1
            try:
                image = self._decode(path)
            except DataError as exc:
                self.stats.skipped_files += 1
                log.warning("line %s: replay skips %s", self.line, exc)
                continue
            meta: dict[str, Any] = {"path": str(path), "index": self._position - 1}
            label = label_for(path, self.path) if self.labels else None
            if label is not None:
                meta["label"] = label
            return image, meta
        return None

    def _decode(self, path: Path) -> np.ndarray:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if self.color != "auto":
            image = decode_image(data, self.color, name=str(path))
            return image[:, :, 0] if self.color == "gray" else image
        # Grey files stay grey (H x W), anything with colour becomes RGB: one decode tells both
        # (ANYCOLOR keeps a grey file's single channel and, like IMREAD_COLOR, applies EXIF orientation).
        image = imdecode(data, cv2.IMREAD_ANYCOLOR)
        if image is None:
            raise DataError(f"{path}: not a readable image")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    def _next_video_frame(self) -> tuple[np.ndarray, dict[str, Any]] | None:
        ok, bgr = self._video.read()
        if not ok or bgr is None:
            return None
        number = self._position
        self._position += 1
        if bgr.ndim == 2:
            image = bgr.copy()
        else:
            image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        if self.color == "gray" and image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        elif self.color == "rgb" and image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
        meta: dict[str, Any] = {"path": str(self.path), "video_frame": number}
        label = label_for(self.path) if self.labels else None
        if label is not None:
            meta["label"] = label
        return image, meta
