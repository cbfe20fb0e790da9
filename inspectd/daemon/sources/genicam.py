"""GenICam camera source via harvesters (any GenTL producer: GigE Vision, USB3 Vision, simulators).

What the camera is told is what it does: every configured node is written, read back and
compared, so a camera that silently clamps an exposure or ignores a pixel format stops the line
at start-up instead of producing scores on images the model was not calibrated for.

GenTL allows one open System per producer file and process, and `Harvester.update()` makes every
acquirer created before it obsolete. So all sources in a process that use the same .cti share one
Harvester (reference-counted); device enumeration (`update()`) runs only when nobody else is
using it. Limitation: a camera that comes back under a new identity while other cameras of the
same producer are still open is found only once they have all closed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from inspectd.daemon.config import GenicamSourceConfig
from inspectd.daemon.frame import Frame
from inspectd.daemon.sources.base import Source, SourceError, SourceLost, SourceStats

log = logging.getLogger("inspectd.sources.genicam")


class _MonotonicTime:
    """harvesters measures fetch timeouts with time.time(): a wall-clock step back (NTP, PTP) would
    stretch a 0.5 s wait by the size of the step. Its module sees this instead: time() is monotonic,
    everything else is the real time module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def time() -> float:
        return time.monotonic()


def _harvesters_on_monotonic_time() -> None:
    import harvesters.core

    if not isinstance(harvesters.core.time, _MonotonicTime):
        harvesters.core.time = _MonotonicTime()


__all__ = ["CameraClock", "GenicamSource", "convert_pixels", "bytes_per_pixel", "SUPPORTED_PIXEL_FORMATS"]

# pixel format -> (bytes per pixel, OpenCV conversion to RGB or None for Mono8).
# OpenCV's two-letter Bayer names describe the second row; its four-letter names (RGGB = R at the
# top-left, like GenICam's BayerRG8) say what they mean, so only those are used here.
_FORMATS: dict[str, tuple[int, int | None]] = {
    "Mono8": (1, None),
    "RGB8": (3, None),                       # already RGB: copied
    "BGR8": (3, cv2.COLOR_BGR2RGB),
    "RGBa8": (4, cv2.COLOR_RGBA2RGB),
    "BGRa8": (4, cv2.COLOR_BGRA2RGB),
    "BayerRG8": (1, cv2.COLOR_BayerRGGB2RGB),
    "BayerGR8": (1, cv2.COLOR_BayerGRBG2RGB),
    "BayerGB8": (1, cv2.COLOR_BayerGBRG2RGB),
    "BayerBG8": (1, cv2.COLOR_BayerBGGR2RGB),
}
SUPPORTED_PIXEL_FORMATS = tuple(_FORMATS)
_FLOAT_REL_TOL = 0.01  # cameras quantize float features (exposure to line time); 1 % is "as asked"


def bytes_per_pixel(pixel_format: str) -> int:
    try:
        return _FORMATS[pixel_format][0]
    except KeyError:
        raise SourceError(f"pixel format {pixel_format!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_PIXEL_FORMATS)})") from None


def convert_pixels(data: np.ndarray, pixel_format: str, width: int, height: int) -> np.ndarray:
    """Camera buffer bytes -> an owned H x W (Mono8) or H x W x 3 RGB uint8 array.

    `data` must hold exactly height * width * bytes-per-pixel bytes (callers check first)."""
    bpp, code = _FORMATS.get(pixel_format, (0, None))
    if bpp == 0:
        raise SourceError(f"pixel format {pixel_format!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_PIXEL_FORMATS)})")
    flat = np.asarray(data, dtype=np.uint8).reshape(-1)
    if flat.size != width * height * bpp:
        raise SourceError(f"{pixel_format} buffer of {flat.size} bytes does not hold {width}x{height} pixels")
    image = flat.reshape((height, width) if bpp == 1 else (height, width, bpp))
    if code is None:
        return image.copy()  # the camera buffer is requeued after this: never hand out a view
    return cv2.cvtColor(image, code)  # a new array


# genicam's GenTL calls keep the GIL while they wait for a buffer: a fetch that waits inside GenTL
# stalls the inference worker and the publisher for as long (beside a 20 fps camera the engine ran
# at half speed and most parts missed their deadline: benchmarks/RESULTS.md §20). So read() never
# waits there: one non-blocking poll, then a sleep of the line's `poll_ms` that lets the GIL go.
ONE_POLL_S = 5e-5  # try_fetch's own time limit: shorter than one poll, so it polls exactly once


class CameraClock:
    """How long a buffer waited in the stream before it was fetched, from the camera's timestamps.

    The stream holds a few filled buffers (OldestFirst): when reading falls behind, the next fetches
    return frames exposed a while ago. Stamped at fetch, such a frame would get a fresh acquisition
    time and a fresh deadline, and its verdict would look in time to a reject gate that judges
    `acquired_ns` while the part has moved on. A buffer that arrived while the fetch was waiting for
    it (`fresh`) waited for nobody: its host clock minus camera clock difference is the reference,
    taken anew from every such buffer (so a camera clock stepped or slewed, or the host's slewed by
    NTP, is followed at the next one). A buffer the fetch found already queued, with a larger
    difference, waited that much longer. Between fresh buffers the reference may also fall (a
    smaller difference) and rise by at most `DRIFT` (200 ppm) of the time since it was taken. A
    difference larger by more than `JUMP_S` is the camera clock jumping back (a timestamp reset),
    not a wait: the reference starts over there.

    A producer that fills GenTL's TIMESTAMP_NS with ticks of another unit would make every frame
    look old (and fail-safe at its deadline): nothing is corrected until the camera clock has been
    seen to run at the host's rate (within a factor of 2) over `RATE_CHECK_S`; one that does not
    is ignored until the camera is reopened (frames dated at fetch, as without timestamps)."""

    DRIFT = 200e-6
    JUMP_S = 30.0
    RATE_CHECK_S = 10.0

    def __init__(self) -> None:
        self._best: float | None = None  # reference host - camera difference (s), see the docstring
        self._best_at = 0.0              # host monotonic time it was last moved
        self._first: tuple[int, float] | None = None  # (camera ns, host s) of the first buffer
        self._rate_ok: bool | None = None             # None: not decided yet

    def held_s(self, camera_ns: int, host_mono: float, fresh: bool = False) -> float:
        """Seconds the buffer stamped `camera_ns` (camera clock, ns) waited before `host_mono`;
        `fresh`: it arrived while the fetch waited (0 by construction, and the new reference)."""
        if self._rate_ok is False:
            return 0.0
        if self._first is None:
            self._first = (camera_ns, host_mono)
        elif self._rate_ok is None and host_mono - self._first[1] >= self.RATE_CHECK_S:
            rate = (camera_ns - self._first[0]) / 1e9 / (host_mono - self._first[1])
            self._rate_ok = 0.5 <= rate <= 2.0
            if not self._rate_ok:
                log.warning("camera timestamps run at %.3g x the host clock (not ns?): frames are dated "
                            "when fetched", rate)
                return 0.0
        difference = host_mono - camera_ns / 1e9
        if self._best is None or fresh:
            self._best, self._best_at = difference, host_mono
            return 0.0
        allowed = self._best + self.DRIFT * max(host_mono - self._best_at, 0.0)
        held = difference - allowed
        if held <= 0.0 or held > self.JUMP_S:
            if held > self.JUMP_S:
                log.warning("camera clock jumped back by %.1f s (timestamp reset?): restarting its mapping", held)
            self._best, self._best_at = difference, host_mono
            return 0.0
        self._best, self._best_at = allowed, host_mono
        return held if self._rate_ok else 0.0


# ---------------------------------------------------------------------------------------- shared Harvester
@dataclass
class _SharedHarvester:
    harvester: Any
    users: int = 0


_HARVESTERS: dict[str, _SharedHarvester] = {}
_HARVESTERS_LOCK = threading.Lock()  # also serializes create()/destroy() on a shared Harvester


def _genicam_errors() -> tuple[type[BaseException], ...]:
    from genicam.genapi import GenericException as GenApiError
    from genicam.gentl import GenericException as GenTLError
    return (GenTLError, GenApiError)


def _short(exc: BaseException) -> str:
    # genicam messages carry "... : XException thrown in node 'X' while calling ... (file, line)".
    text = str(exc).strip() or type(exc).__name__
    parts = [p.split(" (Message from the source")[0].strip() for p in text.split(" : ")]
    kept = [p for p in parts if p and "thrown in node" not in p and "thrown (file" not in p]
    return ": ".join(kept or parts[:1])


def _device_summary(index: int, info: Any) -> str:
    def attr(name: str) -> str:
        try:
            return str(getattr(info, name))
        except Exception:  # GenTL raises NotAvailable for optional fields
            return "?"
    return f"#{index} id {attr('id_')} serial {attr('serial_number')} ({attr('vendor')} {attr('model')})"


def _teardown_steps(ia: Any) -> list[Any]:
    """What closing an acquirer takes, in order. harvesters (ImageAcquirer) and genicam (its
    ChunkAdapter) each register weakref.finalize(obj, obj.method): a strong reference that keeps
    the object (node map, buffers, threads) alive until the finalizer is called. destroy() alone
    does not call them, so every reconnect of a flaky camera kept its acquirer for the life of the
    process; calling the finalizers (each runs its cleanup once) lets them go. A harvesters without
    these private attributes gets plain destroy()."""
    steps = [ia.stop, getattr(ia, "_finalizer", None) or ia.destroy]
    adapter_finalizer = getattr(getattr(ia, "_chunk_adapter", None), "_finalizer", None)
    if adapter_finalizer is not None:
        steps.append(adapter_finalizer)
    return steps


def _incomplete_counter(stats: SourceStats) -> Any:
    """harvesters' INCOMPLETE_BUFFER callback: harvesters requeues the buffer itself; we count.
    It must be a harvesters Callback: anything else makes harvesters raise a bare TypeError out of
    the fetch, which read() would take for a lost camera (one lost packet = a reconnect)."""
    from harvesters.core import Callback

    class IncompleteCounter(Callback):
        def emit(self, context: object | None = None) -> None:
            stats.incomplete_frames += 1

    return IncompleteCounter()


class GenicamSource(Source):
    """Frames from one GenICam camera. Configuration: GenicamSourceConfig (daemon/config.py)."""

    def __init__(self, line: str, cti: str | Path, device: dict[str, Any] | Any,
                 pixel_format: str | None = None, exposure_us: float | None = None,
                 trigger_mode: str | None = None, trigger_source: str | None = None,
                 features: dict[str, Any] | None = None, trigger_selector: str | None = None,
                 poll_ms: float | None = None) -> None:
        super().__init__(line)
        self.cti = Path(cti)
        # Not given (a source made in code, not from a config): the schema's default, the one place defaults live.
        self.poll_s = (poll_ms if poll_ms is not None else GenicamSourceConfig.model_fields["poll_ms"].default) / 1000
        if not isinstance(device, dict):  # a DeviceSelector model
            device = {k: getattr(device, k) for k in ("serial", "id", "index") if getattr(device, k) is not None}
        if len(device) != 1 or next(iter(device)) not in ("serial", "id", "index"):
            raise SourceError(f"line {line}: device must be exactly one of serial, id, index (got {device})")
        self.device_key, self.device_value = next(iter(device.items()))
        self.pixel_format = pixel_format
        self.exposure_us = exposure_us
        self.trigger_mode = trigger_mode
        self.trigger_source = trigger_source
        self.trigger_selector = trigger_selector
        self.features = dict(features or {})
        self._shared: _SharedHarvester | None = None
        self._ia: Any = None
        self._device_name = "?"
        self._counter = 0
        self._last_camera_id: int | None = None  # the camera's own id of the last buffer (reset at open)
        self._clock = CameraClock()
        # (width, height, pixel format) of the first frame delivered since this source was made: kept
        # across reconnects, so a camera that comes back reset or reconfigured is noticed.
        self._geometry: tuple[int, int, str] | None = None

    @classmethod
    def from_config(cls, cfg: Any, line: str) -> "GenicamSource":
        trigger = cfg.trigger
        return cls(line, cfg.cti, cfg.device, pixel_format=cfg.pixel_format, exposure_us=cfg.exposure_us,
                   trigger_mode=trigger.mode if trigger else None,
                   trigger_source=trigger.source if trigger else None, features=cfg.features,
                   trigger_selector=trigger.selector if trigger else None, poll_ms=cfg.poll_ms)

    @property
    def free_running(self) -> bool:  # type: ignore[override]
        """Not in external trigger mode as the config sets it (trigger: {mode: On}; a camera triggered
        by its own saved settings must say so there too, as the InspectdNoFrames alert assumes)."""
        return self.trigger_mode != "On"

    def describe(self) -> str:
        return f"genicam {self.cti.name} {self.device_key} {self.device_value!r} ({self._device_name})"

    # ---- open / close ----------------------------------------------------------------------------
    def open(self) -> None:
        if self._ia is not None:
            return
        self.stats = SourceStats()
        self._counter = 0
        self._last_camera_id = None  # a reopened camera numbers from its own start again
        self._clock = CameraClock()  # and its clock may have restarted too
        if not self.cti.is_file():
            raise SourceError(f"line {self.line}: GenTL producer {self.cti} does not exist")
        try:
            with _HARVESTERS_LOCK:
                self._shared = self._acquire_harvester()
                index = self._find_device(self._shared.harvester.device_info_list)
                try:
                    self._ia = self._shared.harvester.create(index)
                except _genicam_errors() as exc:
                    raise SourceError(f"line {self.line}: cannot open camera {self._device_name}: "
                                      f"{_short(exc)}") from None
            from harvesters.core import ImageAcquirer
            _harvesters_on_monotonic_time()
            self._ia.timeout_period_on_update_event_data_call = 0  # see ONE_POLL_S: never wait inside GenTL
            self._ia.add_callback(ImageAcquirer.Events.INCOMPLETE_BUFFER, _incomplete_counter(self.stats))
            self._configure(self._ia.remote_device.node_map)
            self._enable_chunks(self._ia.remote_device.node_map)
            try:
                self._ia.start()
            except _genicam_errors() as exc:
                raise SourceError(f"line {self.line}: cannot start acquisition on {self._device_name}: "
                                  f"{_short(exc)}") from None
        except BaseException:
            self.close()
            raise
        log.info("line %s: %s open", self.line, self.describe())

    def close(self) -> None:
        ia, self._ia = self._ia, None
        if ia is not None:
            with _HARVESTERS_LOCK:
                for step in _teardown_steps(ia):
                    try:
                        step()
                    except Exception as exc:  # a lost device fails its own teardown; keep releasing
                        log.debug("line %s: %s during close: %s", self.line,
                                  getattr(step, "__name__", "teardown"), _short(exc))
                # The Harvester lists every acquirer it made until its next update() or reset();
                # while another line keeps the shared Harvester open, that list would keep this one.
                if self._shared is not None:
                    made = self._shared.harvester.image_acquirers
                    if ia in made:
                        made.remove(ia)
        shared, self._shared = self._shared, None
        if shared is not None:
            self._release_harvester(shared)

    def _acquire_harvester(self) -> _SharedHarvester:
        from harvesters.core import Harvester

        key = str(self.cti.resolve())
        shared = _HARVESTERS.get(key)
        if shared is None:
            harvester = Harvester()
            try:
                harvester.add_file(key, check_existence=True)
                harvester.update()
            except Exception as exc:
                harvester.reset()
                raise SourceError(f"line {self.line}: cannot load GenTL producer {self.cti}: "
                                  f"{_short(exc)}") from None
            shared = _HARVESTERS[key] = _SharedHarvester(harvester)
        shared.users += 1
        return shared

    def _release_harvester(self, shared: _SharedHarvester) -> None:
        with _HARVESTERS_LOCK:
            shared.users -= 1
            if shared.users > 0:
                return
            for key, value in list(_HARVESTERS.items()):
                if value is shared:
                    del _HARVESTERS[key]
        try:
            shared.harvester.reset()
        except Exception as exc:
            log.debug("line %s: Harvester.reset: %s", self.line, _short(exc))

    def _find_device(self, infos: list[Any]) -> int:
        def field(info: Any, name: str) -> str | None:
            try:
                return str(getattr(info, name))
            except Exception:
                return None

        found: int | None = None
        if self.device_key == "index":
            if 0 <= int(self.device_value) < len(infos):
                found = int(self.device_value)
        else:
            attr = "serial_number" if self.device_key == "serial" else "id_"
            for i, info in enumerate(infos):
                if field(info, attr) == str(self.device_value):
                    found = i
                    break
        if found is None:
            available = "; ".join(_device_summary(i, info) for i, info in enumerate(infos)) or "none"
            raise SourceError(f"line {self.line}: no camera with {self.device_key} {self.device_value!r} "
                              f"on {self.cti.name} (available: {available})")
        self._device_name = field(infos[found], "id_") or f"#{found}"
        return found

    # ---- node writes -----------------------------------------------------------------------------
    def _configure(self, node_map: Any) -> None:
        writes: list[tuple[tuple[str, ...], Any]] = []
        if self.pixel_format is not None:
            if self.pixel_format not in _FORMATS:  # refuse what we cannot convert before touching the camera
                raise SourceError(f"line {self.line}: pixel format {self.pixel_format!r} is not supported "
                                  f"(supported: {', '.join(SUPPORTED_PIXEL_FORMATS)})")
            writes.append((("PixelFormat",), self.pixel_format))
        if self.exposure_us is not None:
            writes.append((("ExposureTime", "ExposureTimeAbs"), float(self.exposure_us)))
        if self.trigger_mode is not None or self.trigger_source is not None:
            # Mode and source belong to the trigger the selector points at: written after it, or a
            # camera whose saved settings selected AcquisitionStart would be "triggered" there and
            # free-run its frames. Unset: FrameStart where the camera offers it (_select_frame_start).
            if self.trigger_selector is not None:
                writes.append((("TriggerSelector",), self.trigger_selector))
            elif node_map.has_node("TriggerSelector"):
                self._select_frame_start(node_map)
        if self.trigger_source is not None:
            writes.append((("TriggerSource",), self.trigger_source))
        if self.trigger_mode is not None:
            writes.append((("TriggerMode",), self.trigger_mode))
        writes.extend(((name,), value) for name, value in self.features.items())
        for names, value in writes:
            self._write_node(node_map, names, value)

    def _select_frame_start(self, node_map: Any) -> None:
        """The default selector, FrameStart, where the camera has it and lets it be written. A camera
        whose per-frame trigger has another name (FrameBurstStart, ExposureStart) or whose selector is
        fixed keeps what it has, with a warning: set `trigger.selector` to choose; only a configured
        selector that cannot be written stops the line."""
        node = node_map.TriggerSelector
        try:
            current = str(node.value)
            offered = tuple(node.symbolics)
        except Exception as exc:
            log.warning("line %s: camera %s: cannot read TriggerSelector (%s): trigger mode and source go to "
                        "whatever it selects", self.line, self._device_name, _short(exc))
            return
        if current == "FrameStart":
            return
        if "FrameStart" not in offered:
            log.warning("line %s: camera %s: TriggerSelector has no FrameStart (offers %s); trigger mode and "
                        "source go to %s: set trigger.selector to choose", self.line, self._device_name,
                        ", ".join(offered) or "nothing", current)
            return
        try:
            self._write_node(node_map, ("TriggerSelector",), "FrameStart")
        except SourceError as exc:
            log.warning("%s; trigger mode and source go to %s: set trigger.selector to choose", exc, current)

    def _write_node(self, node_map: Any, names: tuple[str, ...], wanted: Any) -> None:
        name = next((n for n in names if node_map.has_node(n)), None)
        if name is None:
            raise SourceError(f"line {self.line}: camera {self._device_name} has no node {names[0]} "
                              f"(cannot set {names[0]} = {wanted!r})")
        node = getattr(node_map, name)
        try:
            node.value = wanted
        except _genicam_errors() as exc:
            allowed = ""
            try:
                allowed = f" (allowed: {', '.join(node.symbolics)})"
            except Exception:  # not an enumeration
                try:
                    allowed = f" (range {node.min} .. {node.max})"
                except Exception:
                    pass
            raise SourceError(f"line {self.line}: camera {self._device_name}: writing {name} = {wanted!r} "
                              f"failed: {_short(exc)}{allowed}") from None
        try:
            got = node.value
        except _genicam_errors() as exc:
            raise SourceError(f"line {self.line}: camera {self._device_name}: cannot read back {name}: "
                              f"{_short(exc)}") from None
        if not _same_value(wanted, got):
            raise SourceError(f"line {self.line}: camera {self._device_name}: {name} reads back {got!r} "
                              f"after writing {wanted!r} (the camera adjusted or ignored it)")
        log.debug("line %s: %s = %r", self.line, name, got)

    # ---- frames ----------------------------------------------------------------------------------
    def read(self, timeout_s: float) -> Frame | None:
        if self._ia is None:
            raise SourceLost(f"line {self.line}: camera {self._device_name} is not open")
        deadline = time.monotonic() + max(timeout_s, 0.0)
        waited = False  # the last poll found the stream empty: the next buffer arrived while we slept
        while True:
            try:
                incomplete_before = self.stats.incomplete_frames
                # try_fetch, not fetch: fetch restarts its wait after every incomplete buffer, so a
                # camera delivering only incomplete ones (MTU mismatch) would hang this loop.
                buffer = self._ia.try_fetch(timeout=ONE_POLL_S)
                if buffer is None:  # nothing yet, or an incomplete buffer (counted)
                    left = deadline - time.monotonic()
                    if left <= 0.0:
                        self.stats.timeouts += 1
                        return None
                    # After an incomplete buffer the next one may be queued already.
                    waited = self.stats.incomplete_frames == incomplete_before
                    time.sleep(min(self.poll_s, left))
                    continue
                with buffer:
                    acquired_ns = time.time_ns()
                    acquired_mono = time.monotonic()
                    image, frame_id, error = self._copy_out(buffer)
                    # While the buffer is held: harvesters has parsed its chunk data into the node map.
                    # Also for a frame that cannot be judged: its fail-safe verdict is matched to the
                    # part by these (an encoder count).
                    camera_ns = self._camera_time_ns(buffer)
                    meta = self._buffer_meta(buffer, camera_ns)
                    if camera_ns is not None:
                        # A frame that waited in the stream is dated (and its deadline started)
                        # when it arrived, not when it was fetched.
                        held_s = self._clock.held_s(camera_ns, acquired_mono, fresh=waited)
                        acquired_mono -= held_s
                        acquired_ns -= int(held_s * 1e9)
            except _genicam_errors() as exc:
                raise SourceLost(f"line {self.line}: camera {self._device_name} lost: {_short(exc)}") from None
            except IndexError as exc:
                # harvesters' acquirer turned obsolete under us (device/producer gone).
                raise SourceLost(f"line {self.line}: camera {self._device_name} lost "
                                 f"({type(exc).__name__})") from None
            if image is not None:
                self.stats.frames += 1
                return Frame(line=self.line, frame_id=frame_id, acquired_ns=acquired_ns,
                             acquired_mono=acquired_mono, image=image,
                             meta={"device": self._device_name, **meta})
            if error is not None:  # a part all the same: its verdict is the fail-safe one ("malformed")
                return Frame(line=self.line, frame_id=frame_id, acquired_ns=acquired_ns,
                             acquired_mono=acquired_mono, image=None,
                             meta={"device": self._device_name, **meta, "error": error})
            if time.monotonic() >= deadline:
                return None
            waited = False

    @staticmethod
    def _camera_time_ns(buffer: Any) -> int | None:
        """The buffer's camera timestamp in ns (GenTL's TIMESTAMP_NS), None when the producer gives
        none or only ticks of unknown frequency (then frames are dated at fetch)."""
        return _module_int(buffer, "timestamp_ns")

    def _buffer_meta(self, buffer: Any, camera_ns: int | None) -> dict[str, Any]:
        """The camera's own timestamp of the buffer (`camera_ns`, else the producer's own ticks;
        None when it has neither) and the configured chunk values."""
        meta: dict[str, Any] = {
            "camera_timestamp": camera_ns if camera_ns is not None else _module_int(buffer, "timestamp")}
        if self.chunk_names:
            node_map = self._ia.remote_device.node_map
            chunks: dict[str, Any] = {}
            for name in self.chunk_names:
                chunks[name] = _read_chunk(node_map, name, self._chunk_missing)
            meta["chunks"] = chunks
        return meta

    def _enable_chunks(self, node_map: Any) -> None:
        """Turn chunk mode on and enable each configured chunk. A camera without chunk mode, or
        without one of the chunks, gets a warning per name (values null), never a failed open."""
        if not self.chunk_names:
            return
        try:
            node_map.ChunkModeActive.value = True
        except Exception as exc:  # no such node, or not writable
            for name in self.chunk_names:
                self._chunk_missing(name, f"camera {self._device_name} has no chunk mode ({_short(exc)})")
            return
        try:
            available = set(node_map.ChunkSelector.symbolics)
        except Exception:
            available = set()
        for name in self.chunk_names:
            if name not in available:
                self._chunk_missing(name, f"camera {self._device_name} offers no such chunk "
                                          f"(ChunkSelector: {', '.join(sorted(available)) or 'none'})")
                continue
            try:
                node_map.ChunkSelector.value = name
                node_map.ChunkEnable.value = True
            except Exception as exc:
                self._chunk_missing(name, f"cannot enable it on {self._device_name}: {_short(exc)}")

    def _copy_out(self, buffer: Any) -> tuple[np.ndarray | None, int, str | None]:
        """(pixels copied out of the buffer (it is requeued after this), the camera's frame id,
        None) — or (None, id, None) for a buffer that is empty or of the wrong size (counted as
        incomplete), or (None, id, why) for a full buffer in a pixel format we cannot convert (a
        delivered part: it must get a verdict, and the camera is not lost)."""
        self._counter += 1
        try:
            frame_id = int(buffer.module.frame_id)
        except Exception:  # producers without block ids: our own counter
            frame_id = self._counter
        else:
            # The stream keeps a few buffers and overwrites the rest while nobody reads: those frames
            # (parts, on a triggered line) never reach the line. Counted from the gaps in the ids.
            if self._last_camera_id is not None and frame_id > self._last_camera_id + 1:
                self.stats.skipped_by_camera += frame_id - self._last_camera_id - 1
            self._last_camera_id = frame_id
        payload = buffer.payload
        components = getattr(payload, "components", None) if payload is not None else None
        if not components:
            self.stats.incomplete_frames += 1
            return None, frame_id, None
        comp = components[0]
        fmt = str(comp.data_format)
        width, height = int(comp.width), int(comp.height)
        try:
            bpp = bytes_per_pixel(fmt)
        except SourceError as exc:
            return None, frame_id, f"camera {self._device_name}: {exc}"
        data = comp.data
        if data is None or width <= 0 or height <= 0:
            self.stats.incomplete_frames += 1
            return None, frame_id, None
        data = np.asarray(data).view(np.uint8).reshape(-1)
        row = width * bpp
        padding = int(getattr(comp, "x_padding", 0) or 0)
        if padding and data.size == (row + padding) * height:
            data = data.reshape(height, row + padding)[:, :row].reshape(-1)
        if data.size != row * height:
            self.stats.incomplete_frames += 1
            log.debug("line %s: %s buffer %d of %d bytes, expected %d x %d: skipped",
                      self.line, fmt, frame_id, data.size, width, height)
            return None, frame_id, None
        # Only a complete buffer sets or checks the geometry (an incomplete one may report anything).
        if self._geometry is None:
            self._geometry = (width, height, fmt)
        elif (width, height, fmt) != self._geometry:
            # Resized, cropped or converted into the model, these pixels would be judged as if they
            # were what the line was set up and trained on.
            w0, h0, f0 = self._geometry
            return None, frame_id, (f"camera {self._device_name} delivers {width}x{height} {fmt}; it delivered "
                                    f"{w0}x{h0} {f0} when inspection started (reset, reconfigured or a user set "
                                    f"loaded?): not judged; restore its settings, or restart inspectd for new ones")
        return convert_pixels(data, fmt, width, height), frame_id, None


def _module_int(buffer: Any, attr: str) -> int | None:
    """A GenTL buffer info value (e.g. timestamp_ns) as an int; None when the producer does not
    provide it (NotAvailable) or gives 0."""
    try:
        value = int(getattr(buffer.module, attr))
    except Exception:  # GenTL NotAvailable: the producer keeps no such value
        return None
    return value or None


def _read_chunk(node_map: Any, name: str, missing: Any) -> Any:
    """The value of node Chunk<name> for the buffer in hand (int/float/bool/str), or None with
    `missing(name, why)` called (it logs once per name)."""
    node_name = f"Chunk{name}"
    try:
        if not node_map.has_node(node_name):
            missing(name, f"no node {node_name} in the camera's node map")
            return None
        value = getattr(node_map, node_name).value
    except Exception as exc:  # not readable: the chunk is not in this buffer
        missing(name, f"{node_name} not readable ({_short(exc)})")
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _same_value(wanted: Any, got: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(got, bool):
        return bool(wanted) == bool(got) if isinstance(got, (bool, int)) else str(wanted) == str(got)
    if isinstance(wanted, (int, float)) and isinstance(got, (int, float)):
        if isinstance(wanted, int) and isinstance(got, int):
            return wanted == got
        return math.isclose(float(wanted), float(got), rel_tol=_FLOAT_REL_TOL, abs_tol=1e-9)
    return str(wanted) == str(got)
