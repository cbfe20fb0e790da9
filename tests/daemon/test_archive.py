"""NG archive on the real filesystem: valid files, atomic names, quota, failure switches it off."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import time

import cv2
import numpy as np
import pytest

from inspectd.daemon.archive import NgArchive
from inspectd.daemon.frame import Frame, Verdict
from inspectd.daemon.metrics import Metrics
from inspectd.errors import ConfigError

DAY1 = int(dt.datetime(2024, 5, 1, 23, 59, 0).timestamp() * 1e9)
DAY2 = int(dt.datetime(2024, 5, 2, 8, 0, 0).timestamp() * 1e9)


def image(seed: int, color: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (48, 64, 3) if color else (48, 64)
    return rng.integers(0, 256, shape, dtype=np.uint8)  # noise: PNG size is stable and non-trivial


def header(frame_id: int, acquired_ns: int) -> dict:
    return {"line": "line1", "frame_id": frame_id, "acquired_ns": acquired_ns, "verdict": "NG",
            "score": 7.5, "raw_score": np.float32(-1.5), "threshold": 4.0, "error": None}


def all_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def archives():
    made = []

    def make(*args, **kw):
        a = NgArchive(*args, **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop(5)


def test_record_files_are_valid(tmp_path, archives):
    metrics = Metrics()
    arc = archives(tmp_path, 10_000_000, "line1", metrics=metrics)
    arc.start()
    img, hm = image(1), image(2, color=False)
    assert arc.save(img, hm, header(42, DAY1))
    assert arc.save(image(3, color=False), None, header(43, DAY1 + 5_000_000))  # mono, no heatmap
    assert arc.wait_idle(10)
    day = tmp_path / "line1" / "2024-05-01"
    names = sorted(p.name for p in day.iterdir())
    assert names == ["235900000_f0000000042.json", "235900000_f0000000042.png",
                     "235900000_f0000000042_heatmap.png", "235900005_f0000000043.json",
                     "235900005_f0000000043.png"]
    # Image stored in true colours (RGB frame -> PNG), read back bit-exact.
    back = cv2.cvtColor(cv2.imread(str(day / "235900000_f0000000042.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, img)
    np.testing.assert_array_equal(cv2.imread(str(day / "235900000_f0000000042_heatmap.png"),
                                             cv2.IMREAD_UNCHANGED), hm)
    side = json.loads((day / "235900000_f0000000042.json").read_text())
    assert side["frame_id"] == 42 and side["verdict"] == "NG" and side["raw_score"] == -1.5
    assert side["image_file"] == "235900000_f0000000042.png"
    assert side["heatmap_file"] == "235900000_f0000000042_heatmap.png"
    assert json.loads((day / "235900005_f0000000043.json").read_text())["heatmap_file"] is None
    assert not [p for p in day.iterdir() if p.name.startswith(".tmp-")]  # temp files were renamed
    # Reviewers in the service's group read the evidence (the unit's UMask=0027 means exactly that).
    assert {oct(p.stat().st_mode & 0o777) for p in day.iterdir()} == {oct(0o640)}
    assert arc.total_bytes == sum(p.stat().st_size for p in all_files(tmp_path))
    assert arc.saved == 2 and arc.enabled
    assert metrics.registry.get_sample_value("inspectd_archive_enabled", {"line": "line1"}) == 1


def test_quota_deletes_oldest_first(tmp_path, archives):
    # Measure one record's size, then allow room for three.
    probe = archives(tmp_path / "probe", 10_000_000, "line1")
    probe.start()
    probe.save(image(0), image(0, color=False), header(0, DAY1))
    probe.wait_idle(10)
    record = probe.total_bytes
    arc = archives(tmp_path / "arc", 3 * record + record // 2, "line1")
    arc.start()
    stamps = [DAY1 + i * 1_000_000_000 for i in range(2)] + [DAY2 + i * 1_000_000_000 for i in range(4)]
    for i, ns in enumerate(stamps):
        assert arc.save(image(0), image(0, color=False), header(i, ns))
        assert arc.wait_idle(10)  # one at a time: the writer queue is bounded
    kept = sorted(p.name for p in all_files(tmp_path / "arc") if p.suffix == ".json")
    assert kept == ["080001000_f0000000003.json", "080002000_f0000000004.json", "080003000_f0000000005.json"]
    assert arc.deleted == 3
    assert not (tmp_path / "arc" / "line1" / "2024-05-01").exists()  # emptied day removed
    assert arc.total_bytes == sum(p.stat().st_size for p in all_files(tmp_path / "arc")) <= arc.quota_bytes


def test_existing_archive_scanned_at_start(tmp_path, archives):
    first = archives(tmp_path, 10_000_000, "line1")
    first.start()
    for i in range(5):
        first.save(image(i), None, header(i, DAY2 + i * 1_000_000_000))
    assert first.wait_idle(10)
    record = first.total_bytes // 5
    assert first.stop(5)
    day = tmp_path / "line1" / "2024-05-02"
    (day / ".tmp-crashed").write_bytes(b"x" * 100)     # left by a crash mid-write
    (day / "notes.txt").write_text("operator notes")     # not ours: kept, not counted
    second = archives(tmp_path, 2 * record + record // 2, "line1")
    second.start()
    assert second.wait_idle(10)
    kept = sorted(p.name for p in day.iterdir())
    assert kept == ["080003000_f0000000003.json", "080003000_f0000000003.png",
                    "080004000_f0000000004.json", "080004000_f0000000004.png", "notes.txt"]
    assert second.total_bytes == sum(p.stat().st_size for p in day.iterdir() if p.name != "notes.txt")


def test_unwritable_root_disables_without_raising(tmp_path, archives, caplog):
    # Works as root too: a directory path that is really a regular file cannot be created.
    blocker = tmp_path / "archive"
    blocker.write_text("not a directory")
    metrics = Metrics()
    arc = archives(blocker, 1_000_000, "line1", metrics=metrics)
    arc.start()
    assert arc.wait_idle(10)
    assert not arc.enabled
    assert arc.save(image(1), None, header(1, DAY1)) is False
    assert metrics.registry.get_sample_value("inspectd_archive_enabled", {"line": "line1"}) == 0
    assert metrics.registry.get_sample_value("inspectd_archive_errors_total", {"line": "line1"}) == 1
    assert len([r for r in caplog.records if "NG archive line1 disabled" in r.getMessage()]) == 1
    assert blocker.read_text() == "not a directory"


def test_failure_mid_run_disables_and_leaves_no_partial_record(tmp_path, archives, caplog):
    metrics = Metrics()
    arc = archives(tmp_path, 10_000_000, "line1", metrics=metrics)
    arc.start()
    assert arc.save(image(1), None, header(1, DAY1))
    assert arc.wait_idle(10)
    # The disk "goes away" under the archive: the line directory is replaced by a file.
    shutil.rmtree(tmp_path / "line1")
    (tmp_path / "line1").write_text("x")
    assert arc.save(image(2), image(2, color=False), header(2, DAY2))
    assert arc.wait_idle(10)
    assert not arc.enabled
    for _ in range(3):
        assert arc.save(image(3), None, header(3, DAY2)) is False  # no raise, nothing queued
    assert metrics.registry.get_sample_value("inspectd_archive_errors_total", {"line": "line1"}) == 1
    assert metrics.registry.get_sample_value("inspectd_archive_enabled", {"line": "line1"}) == 0
    assert len([r for r in caplog.records if "disabled" in r.getMessage()]) == 1


def test_bad_image_is_skipped_archive_stays_on(tmp_path, archives):
    arc = archives(tmp_path, 10_000_000, "line1")
    arc.start()
    assert arc.save(np.zeros((4, 4), np.float32), None, header(1, DAY1))  # not uint8
    assert arc.save(image(2), None, header(2, DAY1))
    assert arc.wait_idle(10)
    assert arc.enabled and arc.errors == 1 and arc.saved == 1
    assert len(list((tmp_path / "line1" / "2024-05-01").glob("*.json"))) == 1


def test_full_queue_drops_and_counts(tmp_path, archives):
    metrics = Metrics()
    arc = archives(tmp_path, 10_000_000, "line1", metrics=metrics, queue_size=2)
    # Not started yet: the writer is "busy", the queue fills.
    assert arc.save(image(1), None, header(1, DAY1))
    assert arc.save(image(2), None, header(2, DAY1 + 1_000_000))
    assert arc.save(image(3), None, header(3, DAY1 + 2_000_000)) is False
    assert arc.dropped == 1
    assert metrics.registry.get_sample_value("inspectd_archive_dropped_total", {"line": "line1"}) == 1
    arc.start()
    assert arc.wait_idle(10)
    assert arc.saved == 2  # the queued ones were not lost


def test_same_millisecond_and_frame_keeps_both(tmp_path, archives):
    arc = archives(tmp_path, 10_000_000, "line1")
    arc.start()
    assert arc.save(image(1), None, header(7, DAY1))
    assert arc.save(image(2), None, header(7, DAY1))  # e.g. frame ids restarted with the daemon
    assert arc.wait_idle(10)
    assert len(list(tmp_path.rglob("*.json"))) == 2


def test_bad_settings():
    with pytest.raises(ConfigError, match="quota"):
        NgArchive("/tmp/x", 0, "line1")
    with pytest.raises(ConfigError, match="line name"):
        NgArchive("/tmp/x", 100, "../etc")


def test_stop_writes_what_is_queued(tmp_path):
    arc = NgArchive(tmp_path, 10_000_000, "line1", queue_size=8)
    for i in range(5):
        assert arc.save(image(i), None, header(i, DAY1 + i * 1_000_000))
    arc.start()
    assert arc.stop(10)
    assert len(list(tmp_path.rglob("*.json"))) == 5
    assert arc.save(image(9), None, header(9, DAY1)) is False  # stopped


def test_submit_frame_and_verdict(tmp_path, archives):
    # The call LinePipeline makes for NG parts.
    arc = archives(tmp_path, 10_000_000, "line1")
    arc.start()
    img, hm = image(5), image(6, color=False)
    frame = Frame(line="line1", frame_id=77, acquired_ns=DAY2, acquired_mono=0.0, image=img,
                  meta={"path": "/data/part77.png", "array": np.zeros(3)})
    verdict = Verdict(line="line1", frame_id=77, acquired_ns=DAY2, verdict="NG", score=9.0, raw_score=1.0,
                      threshold=4.0, latency_ms=11.0, deadline_missed=False, backend="onnxruntime-cpu",
                      bundle_id="b1", heatmap=hm)
    assert arc.submit(frame, verdict)
    assert arc.wait_idle(10)
    side = json.loads((tmp_path / "line1" / "2024-05-02" / "080000000_f0000000077.json").read_text())
    assert side["score"] == 9.0 and side["bundle_id"] == "b1" and side["meta"] == {"path": "/data/part77.png"}
    assert side["heatmap_file"] == "080000000_f0000000077_heatmap.png"


def test_archive_switches_itself_back_on_when_disk_space_returns(tiny_tmpfs, archives) -> None:
    """A real tiny tmpfs fills up: the archive goes off (metric 0). Once space returns (the tmpfs
    is grown, as an operator freeing space would), a probe record gets written and the archive is
    on again by itself (metric 1), without a restart. Needs permission to mount a tmpfs."""
    import subprocess
    import time

    mnt = tiny_tmpfs
    metrics = Metrics()
    arch = archives(mnt, 100 * 1024 * 1024, "line1", metrics=metrics, retry_s=0.3)
    arch.start()
    try:
        def enabled() -> float:
            return metrics.registry.get_sample_value("inspectd_archive_enabled", {"line": "line1"})

        n = 0
        end = time.monotonic() + 10
        while arch.enabled:  # ~12 KiB records into 64 KiB
            assert time.monotonic() < end, "the disk never filled"
            arch.save(image(n), image(n, color=False), header(n, DAY1 + n * 1_000_000))
            arch.wait_idle(5)
            n += 1
        assert enabled() == 0 and arch.errors == 1
        saved = arch.saved
        # Still full: probes fail quietly, nothing is written, it stays off.
        time.sleep(0.4)
        arch.save(image(1000), None, header(1000, DAY2))
        arch.wait_idle(5)
        assert not arch.enabled and arch.saved == saved
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True, capture_output=True, timeout=10)
        end = time.monotonic() + 5
        while not arch.enabled:
            assert time.monotonic() < end, "the archive did not come back once space returned"
            arch.save(image(2000 + n), None, header(2000 + n, DAY2 + n * 1_000_000))
            arch.wait_idle(5)
            time.sleep(0.1)
            n += 1
        assert enabled() == 1 and arch.recoveries == 1 and arch.saved == saved + 1
        for i in range(3):  # and it keeps archiving, every record again
            assert arch.save(image(3000 + i), None, header(3000 + i, DAY2 + (10_000 + i) * 1_000_000))
        assert arch.wait_idle(5) and arch.saved == saved + 4
        assert len(list(mnt.rglob("*.json"))) == saved + 4
    finally:
        arch.stop(5)


def test_a_frame_without_pixels_is_archived_as_its_record_and_the_writer_lives(tmp_path, archives):
    """A frame the camera delivered in a format that could not be converted has no image (its
    fail-safe NG verdict still reaches the archive); an empty image cannot be encoded. Neither may
    end the archive's thread: the first is kept as its sidecar, the second skipped and counted."""
    arc = archives(tmp_path, 10_000_000, "line1", queue_size=4)
    arc.start()
    broken = Frame(line="line1", frame_id=5, acquired_ns=DAY1, acquired_mono=0.0, image=None,
                   meta={"error": "pixel format Mono12p cannot be converted"})
    failsafe = Verdict(line="line1", frame_id=5, acquired_ns=DAY1, verdict="NG", score=None, raw_score=None,
                       threshold=4.0, latency_ms=1.0, deadline_missed=False, backend="onnxruntime-cpu",
                       bundle_id="b1", error="malformed frame: pixel format Mono12p cannot be converted")
    assert arc.submit(broken, failsafe)
    assert arc.save(np.zeros((0, 0, 3), np.uint8), None, header(6, DAY1 + 1_000_000))
    for i in range(8):  # more than the queue holds: the writer must still be draining it
        assert arc.save(image(i), None, header(10 + i, DAY1 + (2 + i) * 1_000_000))
        assert arc.wait_idle(10)
    assert arc.enabled and arc.saved == 9 and arc.errors == 1 and arc.dropped == 0
    side = json.loads((tmp_path / "line1" / "2024-05-01" / "235900000_f0000000005.json").read_text())
    assert side["image_file"] is None and "Mono12p" in side["error"]
    assert arc.stop(5)


@pytest.fixture
def immutable():
    """chattr +i on files (undeletable even by root), undone after the test."""
    import subprocess

    made = []

    def make(path):
        try:
            proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("chattr not installed (apt-get install e2fsprogs)")
        if proc.returncode != 0:
            pytest.skip(f"chattr +i not possible here: {proc.stderr.strip()}")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_a_record_that_cannot_be_deleted_is_left_and_the_quota_still_holds(tmp_path, archives, immutable):
    """An old evidence image someone made undeletable (chattr +i, another owner, a backup tool's
    permissions) must not switch the archive off, nor let it grow past its quota: it is left
    alone, and the quota is kept by deleting the other old records."""
    first = archives(tmp_path, 10_000_000, "line1")
    first.start()
    for i in range(3):
        first.save(image(0), None, header(i, DAY1 + i * 1_000_000_000))
        first.wait_idle(10)
    record = first.total_bytes // 3
    assert first.stop(5)
    pinned = tmp_path / "line1" / "2024-05-01" / "235900000_f0000000000.png"
    immutable(pinned)
    arc = archives(tmp_path, 4 * record + record // 2, "line1")
    arc.start()
    for i in range(12):
        assert arc.save(image(0), None, header(100 + i, DAY2 + i * 1_000_000_000))
        assert arc.wait_idle(10)
    assert arc.enabled and arc.saved == 12
    assert pinned.exists()
    on_disk = sum(p.stat().st_size for p in all_files(tmp_path))
    assert on_disk <= arc.quota_bytes + pinned.stat().st_size, (on_disk, arc.quota_bytes)
    kept = sorted(p.name for p in (tmp_path / "line1" / "2024-05-02").glob("*.json"))
    assert kept[-1] == "080011000_f0000000111.json" and len(kept) >= 3


def test_the_writer_queue_is_bounded_in_bytes_not_only_in_records(tmp_path, archives):
    """A slow archive disk and a burst of NG parts (or an engine outage: every fail-safe NG carries
    its frame) must not hold 32 full-resolution frames in memory: a 20 MP RGB camera would queue
    1.9 GB. The queue also stops at `queue_bytes`; what does not fit is dropped and counted."""
    big = np.zeros((1000, 1000, 3), np.uint8)   # 3 MB a frame
    arc = archives(tmp_path, 10_000_000_000, "line1", queue_bytes=10_000_000)   # not started: nothing drains
    accepted = [arc.save(big, None, header(i, DAY1 + i)) for i in range(8)]
    assert accepted == [True] * 3 + [False] * 5 and arc.dropped == 5
    arc.start()
    assert arc.wait_idle(10) and arc.saved == 3
    assert arc.save(big, None, header(9, DAY1 + 9))   # room again once written
    assert arc.wait_idle(10) and arc.saved == 4


def test_the_daemon_sizes_the_archive_queue_from_the_config():
    from inspectd.daemon.config import config_from_dict

    cfg = config_from_dict({"lines": [{"id": "l1", "bundle": "/b", "threshold": 1.0,
                                       "source": {"type": "replay", "path": "/p"},
                                       "archive": {"enabled": True, "queue_mb": 64}}]})
    assert cfg.lines[0].archive.queue_mb == 64
    with pytest.raises(ConfigError, match="queue_mb"):
        config_from_dict({"lines": [{"id": "l1", "bundle": "/b", "threshold": 1.0,
                                     "source": {"type": "replay", "path": "/p"}, "archive": {"queue_mb": 0}}]})


def test_the_archive_comes_back_on_with_an_undeletable_record_oldest(tmp_path, archives, immutable):
    """Switched off (here: its day folder could not be written), the archive tries one record now and
    then; an old record someone made undeletable must not make every such try look failed (it stayed
    off for good, writing one record per try)."""
    first = archives(tmp_path, 10_000_000, "line1")
    first.start()
    first.save(image(0), None, header(1, DAY1))
    first.wait_idle(10)
    record = first.total_bytes
    assert first.stop(5)
    pinned = tmp_path / "line1" / "2024-05-01" / "235900000_f0000000001.png"
    immutable(pinned)
    day2 = tmp_path / "line1" / "2024-05-02"
    day2.mkdir()
    immutable(day2)                              # nothing can be written there: the archive switches off
    arc = archives(tmp_path, record + record // 2, "line1", retry_s=0.2)
    arc.start()
    assert arc.save(image(0), None, header(2, DAY2))
    assert arc.wait_idle(10) and not arc.enabled
    subprocess.run(["chattr", "-i", str(day2)], check=True)   # writable again
    end = time.monotonic() + 10
    i = 3
    while not arc.enabled:
        assert time.monotonic() < end, (arc.errors, arc.saved)
        arc.save(image(0), None, header(i, DAY2 + i * 1_000_000_000))
        arc.wait_idle(10)
        i += 1
        time.sleep(0.1)
    assert arc.recoveries == 1 and pinned.exists()
