"""Fixtures for the reliability suite: the toy bundle (real ONNX graph, verified by load_bundle,
loads in well under a second) and a folder of frames to replay through it."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from inspectd.daemon.frame import Verdict
from inspectd.engines.bundle import Bundle, load_bundle
from tests.engines.test_runtime_toybundle import make_toy_bundle


@pytest.fixture(scope="session")
def toy_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_toy_bundle(tmp_path_factory.mktemp("reliability") / "toy")


@pytest.fixture(scope="session")
def toy(toy_path: Path) -> Bundle:
    return load_bundle(toy_path)


@pytest.fixture(scope="session")
def toy_frames(tmp_path_factory: pytest.TempPathFactory, toy_path: Path) -> Path:
    """good/ and bad/ PNGs (the bundle's golden images) for a ReplaySource."""
    root = tmp_path_factory.mktemp("frames")
    for kind in ("good", "bad"):
        (root / kind).mkdir()
        for p in sorted((toy_path / "golden").glob(f"{kind}_*.png")):
            shutil.copy(p, root / kind / p.name)
    return root


class Collector:
    """A pipeline's emit(): records each verdict; wait_for(n) blocks with a timeout."""

    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self._cond = threading.Condition()

    def __call__(self, v: Verdict) -> None:
        with self._cond:
            self.verdicts.append(v)
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
    value = metrics.registry.get_sample_value(name, labels)  # type: ignore[attr-defined]
    return 0.0 if value is None else value


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def grey(h: int, w: int, value: int = 128) -> np.ndarray:
    return np.full((h, w), value, np.uint8)
