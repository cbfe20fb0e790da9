"""Small helpers shared by the daemon, reliability and method tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from inspectd.daemon.frame import Verdict


class Collector:
    """The pipeline's emit(): records each verdict with its arrival time."""

    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self.arrived_ns: list[int] = []
        self._cond = threading.Condition()

    def __call__(self, v: Verdict) -> None:
        with self._cond:
            self.verdicts.append(v)
            self.arrived_ns.append(time.time_ns())
            self._cond.notify_all()

    def wait_for(self, n: int, timeout_s: float = 20.0) -> list[Verdict]:
        end = time.monotonic() + timeout_s
        with self._cond:
            while len(self.verdicts) < n:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"only {len(self.verdicts)} of {n} verdicts within {timeout_s} s")
                self._cond.wait(left)
            return list(self.verdicts)


def sample(metrics: object, name: str, **labels: str) -> float:
    """A metric's current value in the daemon's own registry (0 when the series does not exist yet)."""
    value = metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return 0.0 if value is None else value


class NotifyListener:
    """A real unix datagram socket where systemd's NOTIFY_SOCKET would be, read by a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []  # (monotonic time received, message)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                pass

    def drain(self, seconds: float) -> list[str]:
        """Listen `seconds` more; every message received so far (texts only)."""
        time.sleep(seconds)
        return [m for _, m in list(self.messages)]

    def pings(self, since: float, until: float) -> list[float]:
        return [t for t, m in list(self.messages) if m == "WATCHDOG=1" and since <= t <= until]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def prepared_images(bundle_path: Path, folder: Path) -> np.ndarray:
    """Every image of `folder` through the bundle's shared preprocessing, as one uint8 batch."""
    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.preprocess import list_images, load_prepared

    spec = load_bundle(bundle_path).input_spec
    return np.stack([load_prepared(p, spec) for p in list_images(folder)])


def ort_session(path: Path):
    """A plain CPU ONNX Runtime session on an exported graph."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_onnx_matches_torch(bundle_path: Path, images: np.ndarray) -> None:
    """The bundle's model.onnx (ONNX Runtime) and its PyTorch rebuild (weights.npz, strict) agree on
    `images`, and a frame's score does not depend on the rest of its batch. Tolerance: 1e-3
    relative on scores (train.py's gate), 1e-3 of the map's range on maps."""
    import torch

    from inspectd.engines.bundle import load_bundle
    from inspectd.engines.model import build_from_bundle

    model = build_from_bundle(load_bundle(bundle_path))
    with torch.no_grad():
        ts, tm = (t.numpy() for t in model(torch.from_numpy(images)))
    sess = ort_session(bundle_path / "model.onnx")
    os_, om = sess.run(None, {"images": images})
    np.testing.assert_allclose(os_, ts, rtol=1e-3, atol=1e-3 * float(np.abs(ts).max()))
    assert np.abs(om - tm).max() <= 1e-3 * max(1.0, float(np.abs(tm).max()))
    one = np.concatenate([sess.run(["score"], {"images": images[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(one, os_[:3], rtol=1e-4, atol=1e-5)


def assert_bad_option_refused(method: str, option: str, message: str, good: Path, out: Path) -> None:
    """`train` with one bad `--option KEY=VALUE` for `method`: a one-line ConfigError containing
    `message`, raised before anything is written to `out`."""
    import pytest

    from inspectd.engines.model_config import ModelConfig
    from inspectd.engines.train import TrainConfig, train
    from inspectd.errors import ConfigError

    key, value = option.split("=", 1)
    cfg = TrainConfig(model=ModelConfig(image_height=128, image_width=128), method=method, options={key: value})
    with pytest.raises(ConfigError) as exc:
        train(good, out, cfg)
    text = str(exc.value)
    assert message in text and "\n" not in text, text
    assert not out.exists()


def assert_onnx_separates(bundle_path: Path, good: np.ndarray, bad: np.ndarray, minimum: float = 0.7) -> None:
    """The bundle's model.onnx scores `bad` above `good`: image AUROC >= `minimum`."""
    from inspectd.stats import roc_auc

    sess = ort_session(bundle_path / "model.onnx")
    sg = sess.run(["score"], {"images": good})[0]
    sb = sess.run(["score"], {"images": bad})[0]
    auc = roc_auc(sg, sb)
    assert auc >= minimum, f"image AUROC {auc:.3f} (good {sg}, bad {sb})"


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` (e.g. "64k") mounted at `mnt` (created) for the with-block: a disk
    that really fills. pytest.skip where mounting is not permitted."""
    import subprocess

    import pytest

    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


def fill_filesystem(folder: Path) -> Path:
    """Write into `folder` until its filesystem is full (a real tmpfs in the tests); returns the filler file."""
    import os

    filler = Path(folder) / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 1024) > 0:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def header_bomb_jpeg() -> bytes:
    """A small JPEG whose header claims about 61,000 x 61,000 pixels (two flipped bytes: a damaged
    file, or a crafted one): OpenCV refuses it with its own error rather than returning None."""
    import cv2

    ok, buf = cv2.imencode(".jpg", np.full((32, 32, 3), 128, np.uint8))
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5] = data[sof + 7] = 0xF0
    return bytes(data)


def train_colour_bundle(grey_parts: Path, out: Path) -> Path:
    """A small "rgb" bundle at `out` (64 px, one flow member, one epoch: seconds) trained on
    `grey_parts` tinted to colour; returns the folder of those colour images (beside `out`, named
    <out>-colour). For the tests of what a colour bundle does with mono frames."""
    import cv2

    from inspectd.engines.fitting import one_thread
    from inspectd.engines.model import ModelConfig
    from inspectd.engines.train import TrainConfig, train

    colour = out.parent / f"{out.name}-colour"
    colour.mkdir(parents=True)
    for p in sorted(grey_parts.glob("*.png")):
        grey = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        cv2.imwrite(str(colour / p.name), np.dstack([grey * 0.5, grey * 0.8, grey]).astype(np.uint8))
    cfg = TrainConfig(model=ModelConfig(image_height=64, image_width=64, taps=[4], members=1, color_mode="rgb"),
                      epochs=1, views=1, seed=0, select=False)
    with one_thread():
        train(colour, out, cfg)
    return colour
