"""What travels through a line: a Frame in, a Verdict out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Frame:
    """One acquired image. `image` is owned by the frame (copied out of any camera buffer):
    H x W (mono) or H x W x 3 in RGB order, uint8."""

    line: str
    frame_id: int
    acquired_ns: int        # wall clock, time.time_ns(), for message headers
    acquired_mono: float    # time.monotonic(), for the deadline
    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. replay path, ground-truth label


@dataclass
class Verdict:
    """The line's answer for one frame, published exactly once (by result or by deadline)."""

    line: str
    frame_id: int
    acquired_ns: int
    verdict: str                 # "OK" | "NG" | "SKIP"
    score: float | None          # normalized score (None when no result)
    raw_score: float | None
    threshold: float
    latency_ms: float            # acquisition -> verdict decided
    deadline_missed: bool
    backend: str
    bundle_id: str
    heatmap: np.ndarray | None = None   # uint8 Hm x Wm, fixed display range
    error: str | None = None            # why a fail-safe verdict was given
    meta: dict[str, Any] = field(default_factory=dict)
    # The frame judged (its image, for the NG archive sink); never serialized.
    frame: Frame | None = field(default=None, repr=False, compare=False)
    # The raw anomaly map (float32 Hm x Wm, the backend's own output array: a reference, never
    # copied) for the live view's overlay, rendered on request; never serialized.
    anomaly_map: np.ndarray | None = field(default=None, repr=False, compare=False)
    recipe: str | None = None           # the line's recipe that judged the frame (header `recipe`)
    # Where the latency went (None on fail-safe verdicts): acquisition -> engine call (queue wait +
    # preprocessing), and the engine call itself.
    queue_ms: float | None = None
    infer_ms: float | None = None
