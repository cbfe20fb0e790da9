"""Fixtures for the reliability suite: the toy bundle (real ONNX graph, verified by load_bundle,
loads in well under a second) and a folder of frames to replay through it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from inspectd.daemon.config import config_from_dict
from inspectd.daemon.line import LineSettings
from inspectd.engines.bundle import Bundle, load_bundle
from tests.engines.test_runtime_toybundle import make_toy_bundle
from tests.helpers import Collector, sample  # noqa: F401  (used by the reliability tests)


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


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def grey(h: int, w: int, value: int = 128) -> np.ndarray:
    return np.full((h, w), value, np.uint8)


def line_settings(line: str, **fields: object) -> LineSettings:
    """LineSettings the way the daemon makes them (from a validated config: the schema's defaults),
    then `fields` replaced (test-only values such as a double's backend name or backpressure)."""
    import dataclasses

    cfg = config_from_dict({"lines": [{"id": line, "source": {"type": "replay", "path": "/nonexistent", "fps": 10},
                                       "bundle": "/nonexistent", "threshold": 5.0}]}).lines[0]
    return dataclasses.replace(LineSettings.from_config(cfg), **fields)  # type: ignore[arg-type]
