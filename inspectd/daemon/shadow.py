"""Shadow bundle: a candidate scored on the same frames as the active recipe, off the critical path.

The line's worker hands each judged frame to `ShadowScorer.offer()` AFTER its verdict went to the
sinks; `offer()` never blocks: the shadow has its own thread and a small bounded queue, and when
the queue is full the oldest waiting frame is dropped (inspectd_shadow_dropped_total). The shadow
thread runs at the lowest CPU priority (nice 19 for that thread) with its own engine (ONNX Runtime
with one intra-op thread unless the line says otherwise), so under load it is the first thing
to give way. Its verdicts go out on `shadow.<line>` through the publisher's low-priority queue
(after every queued active verdict); agreement with the active verdict is counted
(inspectd_shadow_agreement_total{agree}) and a rolling Pearson correlation of the two
normalized scores over the last `window` pairs is a gauge (inspectd_shadow_score_correlation).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from typing import Any

import numpy as np

from inspectd.daemon.frame import Frame, Verdict
from inspectd.engines import preprocess

log = logging.getLogger("inspectd.shadow")

SHADOW_NICE = 19
SHADOW_STALL_S = 10.0


def pearson(pairs: collections.deque) -> float | None:
    if len(pairs) < 3:
        return None
    a = np.asarray(pairs, dtype=np.float64)
    x, y = a[:, 0] - a[:, 0].mean(), a[:, 1] - a[:, 1].mean()
    den = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else None


class ShadowScorer:
    """`recipe` is a warm ActiveRecipe (pipeline.open_recipe_engine) for the candidate bundle."""

    def __init__(self, line: str, recipe: Any, publisher: Any = None, metrics: Any = None,
                 queue_size: int = 2, window: int = 200) -> None:
        self.line = line
        self.recipe = recipe
        self.publisher = publisher
        self.metrics = metrics
        self.queue_size = max(1, int(queue_size))
        self._queue: collections.deque[tuple[Frame, Verdict]] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._pairs: collections.deque[tuple[float, float]] = collections.deque(maxlen=max(3, int(window)))
        self._stop = False
        self.scored = 0
        self.dropped = 0
        self.agree = 0
        self.disagree = 0
        self.errors = 0
        self.correlation: float | None = None
        if metrics is not None:
            metrics.shadow_dropped.labels(line=line)
            for agree in ("true", "false"):
                metrics.shadow_agreement.labels(line=line, agree=agree)
        self._thread = threading.Thread(target=self._run, name=f"shadow-{line}", daemon=True)
        self._thread.start()

    @property
    def bundle_id(self) -> str:
        return self.recipe.bundle.bundle_id

    def offer(self, frame: Frame, verdict: Verdict) -> None:
        """Called by the line's worker after the active verdict was delivered: O(1), never waits."""
        dropped = False
        with self._cond:
            if self._stop:
                return
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()   # the shadow gives way first: oldest waiting frame dropped
                dropped = True
            self._queue.append((frame, verdict))
            self._cond.notify()
        if dropped:
            self.dropped += 1
            if self.metrics is not None:
                self.metrics.shadow_dropped.labels(line=self.line).inc()

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join(timeout_s)
        runner = self.recipe.runner
        if runner is not None:
            runner.close(0.0 if runner.busy else timeout_s)
        if self.metrics is not None:  # promoted, cleared or replaced: its correlation describes no candidate now
            try:
                self.metrics.shadow_correlation.remove(self.line)
            except KeyError:
                pass

    def _run(self) -> None:
        try:  # this thread only (Linux: a thread is a task with its own nice value)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHADOW_NICE)
        except (OSError, AttributeError) as exc:
            log.debug("line %s: shadow thread priority unchanged: %s", self.line, exc)
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                frame, active = self._queue.popleft()
            try:
                self._score(frame, active)
            except Exception as exc:  # a failing candidate never touches the line
                self.errors += 1
                if self.errors == 1 or self.errors % 100 == 0:
                    log.warning("line %s: shadow bundle %s failed on frame %s (%d so far): %s", self.line,
                                self.bundle_id, frame.frame_id, self.errors, exc)

    def _score(self, frame: Frame, active: Verdict) -> None:
        r = self.recipe
        t0 = time.monotonic()
        batch = preprocess.prepare(frame.image, r.bundle.input_spec, r.roi)[None]
        raw_scores, _maps = r.runner.infer(batch, SHADOW_STALL_S, lambda: None)
        raw = float(raw_scores[0])
        score = float(r.bundle.normalize(raw))
        threshold = r.threshold.value
        verdict = "NG" if score > threshold else "OK"
        self.scored += 1
        agree = verdict == active.verdict
        if agree:
            self.agree += 1
        else:
            self.disagree += 1
        if active.score is not None and math.isfinite(score):
            self._pairs.append((float(active.score), score))
            self.correlation = pearson(self._pairs)
        if self.metrics is not None:
            self.metrics.shadow_agreement.labels(line=self.line, agree="true" if agree else "false").inc()
            if self.correlation is not None:
                self.metrics.shadow_correlation.labels(line=self.line).set(self.correlation)
        if self.publisher is not None:
            shadow = Verdict(line=self.line, frame_id=frame.frame_id, acquired_ns=frame.acquired_ns, verdict=verdict,
                             score=score, raw_score=raw, threshold=threshold,
                             latency_ms=(time.monotonic() - frame.acquired_mono) * 1000.0, deadline_missed=False,
                             backend=r.backend, bundle_id=r.bundle.bundle_id, meta=dict(frame.meta or {}),
                             recipe="shadow")
            self.publisher.publish_shadow(shadow, active={
                "verdict": active.verdict, "score": active.score, "bundle_id": active.bundle_id,
                "recipe": active.recipe, "agree": agree, "shadow_ms": (time.monotonic() - t0) * 1000.0})

    def stats(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "threshold": self.recipe.threshold.value, "scored": self.scored,
                "dropped": self.dropped, "agree": self.agree, "disagree": self.disagree,
                "correlation": self.correlation, "errors": self.errors}
