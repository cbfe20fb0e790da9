"""GenicamSource against the real GenTL simulator (viky.cti from the genicam wheel, via
harvesters: 3 devices, 400x400 RGBa8 or Mono8, ~20 fps), and the pixel converter on known images."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import genicam
import numpy as np
import pytest

from inspectd.daemon.config import GenicamSourceConfig
from inspectd.daemon.sources import make_source
from inspectd.daemon.sources.base import SourceError, SourceLost
from inspectd.daemon.sources.genicam import SUPPORTED_PIXEL_FORMATS, GenicamSource, convert_pixels

CTI = Path(genicam.__file__).parent / "viky.cti"
pytestmark = pytest.mark.skipif(not CTI.is_file(), reason="genicam wheel without viky.cti")


# ---------------------------------------------------------------------------------------- converter
def _smooth_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(7)
    # Low-frequency content, so demosaicing can reconstruct it closely.
    return cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)


# GenICam Bayer names give the 2x2 tile from the top-left pixel: RG = R G / G B.
_TILES = {"BayerRG8": "RGGB", "BayerGR8": "GRBG", "BayerGB8": "GBRG", "BayerBG8": "BGGR"}


def _mosaic(rgb: np.ndarray, tile: str) -> np.ndarray:
    channel = {"R": 0, "G": 1, "B": 2}
    out = np.zeros(rgb.shape[:2], np.uint8)
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[dy::2, dx::2] = rgb[dy::2, dx::2, channel[tile[k]]]
    return out


def test_converter_packed_formats_exact() -> None:
    rgb = _smooth_rgb()
    h, w = rgb.shape[:2]
    alpha = np.full((h, w, 1), 9, np.uint8)
    cases = {
        "RGB8": rgb,
        "BGR8": rgb[:, :, ::-1],
        "RGBa8": np.concatenate([rgb, alpha], axis=2),
        "BGRa8": np.concatenate([rgb[:, :, ::-1], alpha], axis=2),
    }
    for fmt, packed in cases.items():
        buffer = np.ascontiguousarray(packed).reshape(-1)
        out = convert_pixels(buffer, fmt, w, h)
        assert out.shape == (h, w, 3) and out.dtype == np.uint8, fmt
        np.testing.assert_array_equal(out, rgb, err_msg=fmt)
        assert not np.shares_memory(out, buffer), fmt  # owned copy: the buffer gets requeued


def test_converter_mono8_is_an_owned_2d_copy() -> None:
    mono = _smooth_rgb()[:, :, 1].copy()
    buffer = mono.reshape(-1)
    out = convert_pixels(buffer, "Mono8", mono.shape[1], mono.shape[0])
    assert out.shape == mono.shape and out.ndim == 2
    np.testing.assert_array_equal(out, mono)
    buffer[:] = 0  # the camera reuses its buffer: the frame must not change
    assert out.any()


@pytest.mark.parametrize("fmt", sorted(_TILES))
def test_converter_bayer_patterns(fmt: str) -> None:
    rgb = _smooth_rgb()
    h, w = rgb.shape[:2]
    out = convert_pixels(_mosaic(rgb, _TILES[fmt]).reshape(-1), fmt, w, h)
    assert out.shape == (h, w, 3)
    err = np.abs(out[4:-4, 4:-4].astype(int) - rgb[4:-4, 4:-4]).mean()
    assert err < 6, f"{fmt}: mean error {err:.1f}"
    # Decoding the same mosaic as any other pattern is far off: the pattern mapping matters.
    for other in _TILES:
        if other != fmt:
            wrong = convert_pixels(_mosaic(rgb, _TILES[fmt]).reshape(-1), other, w, h)
            assert np.abs(wrong[4:-4, 4:-4].astype(int) - rgb[4:-4, 4:-4]).mean() > 4 * err + 10


def test_converter_rejects_unknown_format_and_wrong_size() -> None:
    with pytest.raises(SourceError, match="Mono12.*not supported"):
        convert_pixels(np.zeros(16, np.uint8), "Mono12", 4, 4)
    with pytest.raises(SourceError, match="does not hold"):
        convert_pixels(np.zeros(15, np.uint8), "Mono8", 4, 4)
    assert set(SUPPORTED_PIXEL_FORMATS) >= {"Mono8", "RGB8", "BGR8", "RGBa8", "BGRa8", *_TILES}


# ---------------------------------------------------------------------------------------- camera
def _open(**kw) -> GenicamSource:
    src = GenicamSource("cam", CTI, kw.pop("device", {"index": 0}), **kw)
    src.open()
    return src


def test_reads_frames_with_increasing_ids_and_times() -> None:
    src = _open()
    try:
        frames = [src.read(3.0) for _ in range(4)]
    finally:
        src.close()
    assert all(f is not None for f in frames)
    for f in frames:
        assert f.image.shape == (400, 400, 3) and f.image.dtype == np.uint8
        assert f.line == "cam" and f.meta["device"] == "VikyTL_DEV_red"
    ids = [f.frame_id for f in frames]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert [f.acquired_ns for f in frames] == sorted(f.acquired_ns for f in frames)
    assert [f.acquired_mono for f in frames] == sorted(f.acquired_mono for f in frames)
    assert abs(frames[0].acquired_ns / 1e9 - time.time()) < 60
    assert src.stats.frames == 4


@pytest.mark.parametrize("device, name", [({"index": 1}, "VikyTL_DEV_green"),
                                          ({"serial": "2"}, "VikyTL_DEV_blue"),
                                          ({"id": "VikyTL_DEV_red"}, "VikyTL_DEV_red")])
def test_device_selection(device: dict, name: str) -> None:
    src = _open(device=device)
    try:
        frame = src.read(3.0)
        assert frame is not None and frame.meta["device"] == name
        assert name in src.describe()
    finally:
        src.close()


def test_unknown_serial_lists_available_devices() -> None:
    src = GenicamSource("cam", CTI, {"serial": "99"})
    with pytest.raises(SourceError) as info:
        src.open()
    msg = str(info.value)
    assert "serial '99'" in msg and "VikyTL_DEV_red" in msg and "VikyTL_DEV_blue" in msg
    assert "\n" not in msg
    src.close()
    with pytest.raises(SourceError, match="index 7"):
        GenicamSource("cam", CTI, {"index": 7}).open()


def test_node_read_back_mismatch_names_node_wanted_and_got() -> None:
    # The simulator rounds AcquisitionFrameRate to whole Hz: 2.6 reads back as 3.0.
    src = GenicamSource("cam", CTI, {"index": 0}, features={"AcquisitionFrameRate": 2.6})
    with pytest.raises(SourceError, match=r"AcquisitionFrameRate reads back 3\.0 after writing 2\.6"):
        src.open()
    src.close()


def test_node_write_errors_are_clear() -> None:
    with pytest.raises(SourceError, match="has no node ExposureTime"):  # the simulator has no exposure
        GenicamSource("cam", CTI, {"index": 0}, exposure_us=500.0).open()
    with pytest.raises(SourceError, match=r"writing PixelFormat = 'BayerRG8' failed.*allowed: .*Mono8"):
        GenicamSource("cam", CTI, {"index": 0}, pixel_format="BayerRG8").open()
    with pytest.raises(SourceError, match="Mono16.*not supported"):
        GenicamSource("cam", CTI, {"index": 0}, pixel_format="Mono16").open()
    # After failed opens the camera is free again.
    src = _open()
    assert src.read(3.0) is not None
    src.close()


def test_configured_pixel_format_and_features_apply() -> None:
    src = _open(device={"index": 2}, pixel_format="Mono8", features={"Width": 320})
    try:
        frame = src.read(3.0)
    finally:
        src.close()
    assert frame.image.shape == (400, 320) and frame.image.dtype == np.uint8


def test_timeout_returns_none_and_counts() -> None:
    src = _open(features={"AcquisitionFrameRate": 1.0})
    try:
        assert src.read(3.0) is not None
        t0 = time.monotonic()
        assert src.read(0.1) is None        # next frame is ~1 s away
        assert time.monotonic() - t0 < 0.9
        assert src.stats.timeouts == 1
    finally:
        src.close()


def test_two_lines_share_the_producer_and_a_camera_opens_once() -> None:
    a = _open(device={"index": 0})
    b = _open(device={"index": 1})
    try:
        assert a.read(3.0) is not None and b.read(3.0) is not None
        dup = GenicamSource("dup", CTI, {"index": 0})
        with pytest.raises(SourceError, match="in use"):
            dup.open()
        dup.close()
        a.close()
        assert b.read(3.0) is not None      # closing one line leaves the other running
    finally:
        a.close()
        b.close()


def test_lost_device_raises_source_lost_and_reconnects() -> None:
    src = _open()
    try:
        assert src.read(3.0) is not None
        src._ia._device_proxy.module.close()  # pull the (simulated) device away under harvesters
        with pytest.raises(SourceLost, match="lost"):
            src.read(1.0)
        src.close()
        src.open()
        frame = src.read(3.0)
        assert frame is not None and frame.image.shape == (400, 400, 3)
        assert src.stats.frames == 1        # stats restart on reopen
    finally:
        src.close()


def test_reopen_many_times_without_leaks() -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    src = GenicamSource("cam", CTI, {"serial": "1"})
    src.open()
    assert src.read(3.0) is not None
    src.close()
    threads, files = threading.active_count(), fds()
    for _ in range(5):
        src.open()
        assert src.read(3.0) is not None
        src.close()
        src.close()  # idempotent
    assert threading.active_count() <= threads
    assert fds() <= files
    with pytest.raises(SourceLost):
        src.read(0.1)  # closed: not a silent None


def test_a_closed_camera_is_freed_also_after_a_loss() -> None:
    # harvesters and genicam register weakref.finalize(obj, obj.method): a strong reference until
    # the finalizer runs, so every reconnect of a flaky camera used to keep its acquirer and node
    # map for the life of the process (RSS +0.38 MiB per reconnect on the simulator camera).
    import gc
    import weakref

    acquirers: list[weakref.ref] = []
    lost: list[str] = []

    def acquisition() -> None:  # as the daemon does: in its acquisition thread (harvesters hooks
        # SIGINT with the acquirer when it is made in the main thread), beside another line that
        # keeps the shared Harvester (and its list of acquirers made) open.
        other = _open(device={"index": 1})
        src = _open()
        try:
            assert src.read(3.0) is not None
            acquirers.extend((weakref.ref(src._ia), weakref.ref(src._ia._chunk_adapter)))
            src.close()
            src.open()
            assert src.read(3.0) is not None
            acquirers.extend((weakref.ref(src._ia), weakref.ref(src._ia._chunk_adapter)))
            src._ia._device_proxy.module.close()  # the lost-camera path: its teardown fails half way
            try:
                src.read(1.0)
            except SourceLost as exc:
                lost.append(str(exc))  # not the exception: its traceback holds the frames
        finally:
            src.close()
            other.close()

    worker = threading.Thread(target=acquisition)
    worker.start()
    worker.join(30)
    assert len(lost) == 1 and len(acquirers) == 4
    gc.collect()
    assert [ref() is None for ref in acquirers] == [True] * 4


def test_make_source_from_config() -> None:
    cfg = GenicamSourceConfig(type="genicam", cti=CTI, device={"serial": "0"}, pixel_format="RGBa8",
                              fetch_timeout_s=2.0)
    src = make_source(cfg, "line7")
    assert isinstance(src, GenicamSource)
    src.open()
    try:
        frame = src.read(3.0)
        assert frame.line == "line7" and frame.image.shape == (400, 400, 3)
    finally:
        src.close()


def test_an_incomplete_buffer_is_counted_and_the_camera_stays_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """One lost GigE packet (one incomplete buffer) is not a lost camera: it is counted
    (inspectd_incomplete_frames_total), harvesters requeues it, and the next frame is read. Buffers
    that are all incomplete (an MTU / jumbo-frame mismatch) still let read() return within its
    timeout, so the acquisition loop never hangs. Real harvesters on the GenTL simulator; the
    buffer's completeness is what is forced."""
    import genicam.gentl as gentl

    src = _open()
    try:
        assert src.read(3.0) is not None
        real = gentl.Buffer.is_complete
        left = {"incomplete": 1}

        def once_incomplete(buffer: object) -> bool:
            if left["incomplete"]:
                left["incomplete"] -= 1
                return False
            return real(buffer)

        monkeypatch.setattr(gentl.Buffer, "is_complete", once_incomplete)
        assert src.read(3.0) is not None          # the next complete buffer, no SourceLost
        assert src.stats.incomplete_frames == 1

        monkeypatch.setattr(gentl.Buffer, "is_complete", lambda buffer: False)
        got: dict[str, object] = {}
        t = threading.Thread(target=lambda: got.setdefault("frame", src.read(0.5)), daemon=True)
        t0 = time.monotonic()
        t.start()
        t.join(3.0)
        assert not t.is_alive() and got["frame"] is None, "read() must return within its timeout"
        assert time.monotonic() - t0 < 2.0 and src.stats.incomplete_frames > 1
        monkeypatch.setattr(gentl.Buffer, "is_complete", real)
        assert src.read(3.0) is not None          # still open: frames flow again
    finally:
        src.close()


def test_a_camera_that_changes_its_resolution_is_not_judged() -> None:
    """Mid-run the camera starts delivering another size (a reconnect to a camera reset to its
    defaults, a vendor tool, a user set at power-up): the pixels no longer match what the line was
    set up and trained on. Each such frame is a part with the reason (its verdict: fail-safe), never
    quietly resized or cropped into the model; frames of the first geometry are judged again."""
    src = _open()
    try:
        first = src.read(3.0)
        assert first is not None and first.image.shape == (400, 400, 3)
        ia = src._ia
        nm = ia.remote_device.node_map
        ia.stop()
        nm.Width.value, nm.Height.value = 320, 240    # what an outside tool does to the camera
        ia.start()
        changed = src.read(3.0)
        assert changed is not None and changed.image is None
        assert "320x240" in changed.meta["error"] and "400x400" in changed.meta["error"], changed.meta
        ia.stop()
        nm.Width.value, nm.Height.value = 400, 400
        ia.start()
        again = src.read(3.0)
        assert again is not None and again.image is not None and again.image.shape == (400, 400, 3)
    finally:
        src.close()


def test_a_frame_that_cannot_be_judged_keeps_its_chunks_and_camera_timestamp() -> None:
    """A part whose frame cannot be judged (changed geometry, a pixel format it cannot convert) gets
    the fail-safe verdict, and a reject gate finds that part by its chunk values (an encoder count):
    they and the camera's timestamp stay on the frame. (Before: chunks {} and timestamp null.)"""
    src = GenicamSource("cam", CTI, {"index": 0})
    src.chunk_names = ("NrBounces",)
    src.open()
    try:
        first = src.read(3.0)
        assert first is not None and first.meta["chunks"]["NrBounces"] is not None, first.meta
        ia = src._ia
        nm = ia.remote_device.node_map
        ia.stop()
        nm.Width.value, nm.Height.value = 320, 240
        ia.start()
        changed = src.read(3.0)
        assert changed is not None and changed.image is None and "320x240" in changed.meta["error"]
        assert changed.meta["chunks"]["NrBounces"] is not None, changed.meta
        assert (changed.meta["camera_timestamp"] is None) == (first.meta["camera_timestamp"] is None), changed.meta
        ia.stop()
        nm.Width.value, nm.Height.value = 400, 400
        ia.start()
    finally:
        src.close()


def test_frames_the_camera_numbered_but_never_delivered_are_counted() -> None:
    """When reading stalls (a busy CPU, a slow engine with back-pressure), the camera's stream keeps
    a few buffers and overwrites the rest: those frames (on a triggered line: parts) never get a
    verdict. They are counted from the gaps in the camera's own frame ids, never silently lost."""
    src = _open()
    try:
        first = src.read(3.0)
        assert first is not None
        time.sleep(1.0)  # the simulator runs at 20 fps: about 20 frames come while nobody reads
        frames = [src.read(3.0) for _ in range(6)]
        assert all(f is not None for f in frames)
        ids = [first.frame_id] + [f.frame_id for f in frames]
        gaps = sum(b - a - 1 for a, b in zip(ids, ids[1:]) if b > a + 1)
        assert gaps >= 5, ids  # the case is exercised
        assert src.stats.skipped_by_camera == gaps, (ids, src.stats)
    finally:
        src.close()


def test_a_wall_clock_step_back_does_not_hang_a_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """NTP or PTP steps the wall clock back (an edge PC without an RTC battery, a grandmaster switch)
    while a line waits for a frame that does not come (acquisition stopped: a triggered line with
    no parts). read(0.5) must still return within its timeout: a hung read makes the line 'blind'
    and, after 10 s, costs every line a watchdog restart. The step is simulated on time.time."""
    src = _open()
    try:
        assert src.read(3.0) is not None
        src._ia.stop()                                # no more frames
        real = time.time
        got: dict[str, object] = {}
        t = threading.Thread(target=lambda: got.setdefault("frame", src.read(0.5)), daemon=True)
        t0 = time.monotonic()
        t.start()
        time.sleep(0.1)
        monkeypatch.setattr(time, "time", lambda: real() - 3600.0)   # the clock steps back one hour
        t.join(3.0)
        took = time.monotonic() - t0
        monkeypatch.setattr(time, "time", real)
        src._ia.start()                               # a frame releases a hung read, if any
        t.join(3.0)
        assert took < 2.0 and got.get("frame") is None, (took, got)
    finally:
        src.close()


class _FakeTriggerNodeMap:
    """FAKE node map of a camera with SFNC trigger selectors: the simulator camera here (viky.cti)
    has no trigger nodes at all. Like a real camera, TriggerMode and TriggerSource are stored per
    selected trigger; it records the order of writes."""

    class _Node:
        def __init__(self, owner: "_FakeTriggerNodeMap", name: str) -> None:
            self._owner, self._name = owner, name

        @property
        def value(self) -> object:
            return self._owner.read(self._name)

        @value.setter
        def value(self, wanted: object) -> None:
            self._owner.write(self._name, wanted)

        @property
        def symbolics(self) -> tuple[str, ...]:
            return tuple(self._owner.per_trigger) if self._name == "TriggerSelector" else ()

    def __init__(self, selected: str, triggers: tuple[str, ...] = ("FrameStart", "AcquisitionStart")) -> None:
        self.selected = selected  # what the camera's saved settings left selected
        self.per_trigger: dict[str, dict[str, object]] = {name: {} for name in triggers}
        self.writes: list[tuple[str, object]] = []

    def has_node(self, name: str) -> bool:
        return name in ("TriggerSelector", "TriggerMode", "TriggerSource")

    def __getattr__(self, name: str) -> "_FakeTriggerNodeMap._Node":
        if not self.has_node(name):
            raise AttributeError(name)
        return self._Node(self, name)

    def write(self, name: str, value: object) -> None:
        self.writes.append((name, value))
        if name == "TriggerSelector":
            self.selected = str(value)
        else:
            self.per_trigger[self.selected][name] = value

    def read(self, name: str) -> object:
        return self.selected if name == "TriggerSelector" else self.per_trigger[self.selected].get(name)


@pytest.mark.parametrize("selector, expected", [(None, "FrameStart"), ("AcquisitionStart", "AcquisitionStart")])
def test_trigger_mode_and_source_are_written_for_the_selected_trigger(selector: str | None, expected: str) -> None:
    """A camera whose saved settings selected AcquisitionStart: without the selector written first,
    TriggerMode On lands on AcquisitionStart and the camera free-runs its frames."""
    src = GenicamSource("cam", CTI, {"index": 0}, trigger_mode="On", trigger_source="Line0",
                        trigger_selector=selector)
    nodes = _FakeTriggerNodeMap(selected="AcquisitionStart")
    src._configure(nodes)
    assert nodes.writes[0] == ("TriggerSelector", expected)
    assert nodes.per_trigger[expected] == {"TriggerMode": "On", "TriggerSource": "Line0"}
    other = "AcquisitionStart" if expected == "FrameStart" else "FrameStart"
    assert nodes.per_trigger[other] == {}


@pytest.mark.parametrize("triggers, selected", [(("FrameStart", "AcquisitionStart"), "FrameStart"),
                                                 (("FrameBurstStart", "AcquisitionStart"), "FrameBurstStart")])
def test_the_default_selector_is_not_forced_where_it_is_set_or_missing(
        triggers: tuple[str, ...], selected: str, caplog: pytest.LogCaptureFixture) -> None:
    """FrameStart already selected: nothing written. A camera whose frame trigger has another name:
    a warning, the mode and source go to what it selects, and the camera still opens (a config that
    worked before the selector was written must not stop the line)."""
    src = GenicamSource("cam", CTI, {"index": 0}, trigger_mode="On", trigger_source="Line0")
    nodes = _FakeTriggerNodeMap(selected=selected, triggers=triggers)
    src._configure(nodes)
    assert [name for name, _ in nodes.writes] == ["TriggerSource", "TriggerMode"]
    assert nodes.per_trigger[selected] == {"TriggerMode": "On", "TriggerSource": "Line0"}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warned) == (selected != "FrameStart") and all("trigger.selector" in w for w in warned), warned


def test_trigger_selector_from_config_and_a_camera_without_selectors() -> None:
    cfg = GenicamSourceConfig(type="genicam", cti=CTI, device={"index": 0},
                              trigger={"mode": "On", "selector": "FrameStart"})
    assert make_source(cfg, "cam").trigger_selector == "FrameStart"
    # The simulator has no trigger nodes: a configured trigger is refused by name, not ignored.
    src = GenicamSource("cam", CTI, {"index": 0}, trigger_mode="On", trigger_selector="FrameStart")
    with pytest.raises(SourceError, match="has no node TriggerSelector"):
        src.open()
    src.close()


def test_camera_clock_dates_a_buffer_by_its_wait_in_the_stream() -> None:
    from inspectd.daemon.sources.genicam import CameraClock

    clock, ms = CameraClock(), 1_000_000
    # The camera ticks from 5 s; fetched 2 ms after each 50 ms exposure: no wait. The first
    # RATE_CHECK_S (10 s) check that its clock runs at the host's rate.
    assert [clock.held_s(5_000 * ms + i * 50 * ms, 100.002 + i * 0.050) for i in range(205)] == [0.0] * 205
    # Reading stalled 1 s: frames 205-207 were in the stream, fetched back to back from 111.25 s.
    # Their waits beyond the usual 2 ms (less 200 ppm for drift):
    held = [clock.held_s(5_000 * ms + i * 50 * ms, 111.25 + (i - 205) * 0.001) for i in (205, 206, 207)]
    assert held == pytest.approx([0.998, 0.949, 0.900], abs=3e-4)
    # Fresh again, and a camera clock 100 ppm slower than the host's: followed, no wait read.
    t0 = 111.3
    drift = [clock.held_s(16_300 * ms + k * 1_000 * ms, t0 + k * 1.0001) for k in range(1, 60)]
    assert max(drift) == 0.0
    # A camera clock that jumps back a minute (timestamp reset) is not a minute's wait.
    assert clock.held_s(0, t0 + 61) == 0.0 and clock.held_s(50 * ms, t0 + 61.05) == 0.0
    # One stepped back a second (or a host clock slewed by NTP): a buffer that arrives while the
    # fetch waits is the new reference, so the step is not charged to the frames after it.
    t1, cam = t0 + 62.0, 1_000 * ms
    assert clock.held_s(cam, t1, fresh=True) == 0.0
    assert clock.held_s(cam + 50 * ms - 1_000 * ms, t1 + 0.05, fresh=True) == 0.0
    assert [clock.held_s(cam + (k - 20) * 50 * ms, t1 + k * 0.05) for k in range(2, 6)] == [0.0] * 4


def test_camera_timestamps_in_another_unit_are_not_taken_for_waits() -> None:
    """A producer whose "ns" are 8 ns ticks: its clock runs at 1/8 of the host's, which would make
    every frame look seconds old (and fail-safe at its deadline). Seen in the first 10 s: ignored."""
    from inspectd.daemon.sources.genicam import CameraClock

    clock = CameraClock()
    held = [clock.held_s(i * 50_000_000 // 8, 100.0 + i * 0.050) for i in range(1200)]  # 60 s of frames
    assert max(held) == 0.0


def test_frames_that_waited_in_the_stream_are_dated_when_they_arrived(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real simulator frames; the camera's timestamps are FAKED from its frame ids (viky.cti keeps
    none; it exposes one frame every 50 ms, which the ids count). Reading stalls 1.5 s: the buffers
    the stream kept meanwhile carry their wait in acquired_mono / acquired_ns, fresh ones do not."""
    from inspectd.daemon.sources.genicam import CameraClock

    monkeypatch.setattr(GenicamSource, "_camera_time_ns",
                        staticmethod(lambda buffer: 1_000_000_000 + int(buffer.module.frame_id) * 50_000_000))
    monkeypatch.setattr(CameraClock, "RATE_CHECK_S", 1.0)  # the rate check, shortened from 10 s
    src = _open()
    try:
        for _ in range(25):
            frame = src.read(3.0)
            assert frame is not None and time.monotonic() - frame.acquired_mono < 0.2
        time.sleep(1.5)
        frames = []
        for _ in range(8):
            frame = src.read(3.0)
            assert frame is not None
            frames.append((frame, time.monotonic(), time.time_ns()))
    finally:
        src.close()
    waits = [(fetched - f.acquired_mono, (wall - f.acquired_ns) / 1e9) for f, fetched, wall in frames]
    stale = [w for (f, _, _), w in zip(frames, waits) if f.frame_id <= 28]
    fresh = [w for (f, _, _), w in zip(frames, waits) if f.frame_id > 30]
    assert stale and fresh, [f.frame_id for f, _, _ in frames]
    assert all(1.0 < mono < 2.5 and abs(wall - mono) < 0.05 for mono, wall in stale), stale
    assert all(mono < 0.2 for mono, _ in fresh), fresh


def test_waiting_for_a_frame_lets_the_other_threads_run() -> None:
    """The acquisition thread spends most of its time waiting for the next frame; the inference
    worker and the publisher need the GIL meanwhile. genicam's GenTL calls keep the GIL while they
    wait, so read() must never wait inside them: a thread that wakes every millisecond (as the
    worker does whenever ONNX Runtime hands back a result) keeps its pace beside a reading source.
    Real simulator camera at its 20 fps; waking late by 5 ms or more is Python's switch interval,
    the sign that the GIL was held by the wait."""
    from inspectd.daemon.stallwatch import StallWatch

    src = _open()
    late: list[float] = []
    try:
        assert src.read(3.0) is not None
        with StallWatch(late.append, interval_s=0.001):
            frames = [src.read(3.0) for _ in range(20)]    # about 1 s at 20 fps, mostly waiting
    finally:
        src.close()
    assert all(f is not None for f in frames)
    median_ms = float(np.median(late)) * 1e3
    assert len(late) > 200 and median_ms < 2.0, (len(late), median_ms)


def test_the_poll_interval_comes_from_the_config_and_sets_how_often_the_camera_is_asked() -> None:
    """`poll_ms` trades CPU against how long a frame may wait: a source asks the camera about once
    per poll_ms while nothing comes (real simulator camera, acquisition stopped; the asks counted)."""
    asks = {}
    for poll_ms in (2.0, 20.0):
        src = make_source(GenicamSourceConfig(type="genicam", cti=CTI, device={"index": 0}, poll_ms=poll_ms), "cam")
        src.open()
        try:
            assert src.read(3.0) is not None
            src._ia.stop()                            # nothing comes any more
            real, count = src._ia.try_fetch, [0]

            def counted(*args: object, **kwargs: object) -> object:
                count[0] += 1
                return real(*args, **kwargs)

            src._ia.try_fetch = counted
            assert src.read(0.4) is None
            asks[poll_ms] = count[0]
        finally:
            src.close()
    assert GenicamSource("cam", CTI, {"index": 0}).poll_s == GenicamSourceConfig.model_fields["poll_ms"].default / 1000
    assert 10 <= asks[20.0] <= 25 and asks[2.0] > 5 * asks[20.0], asks

