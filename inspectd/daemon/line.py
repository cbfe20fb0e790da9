"""What one line needs besides its threads: its settings and its threshold (a value or a
calibration file, reloaded atomically on SIGHUP)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inspectd.daemon.config import finite_number
from inspectd.errors import ConfigError

log = logging.getLogger("inspectd.line")

FAIL_SAFE_VERDICTS = ("NG", "OK", "SKIP")
HEATMAP_MODES = ("none", "ng", "all")
# A replay source has no fetch timeout or reconnect setting in the schema: a file read returns at
# once, so its read timeout only paces an idle loop, and "reconnect" is reopening a folder.
REPLAY_READ_TIMEOUT_S = 0.2
_REPLAY_RECONNECT_S = (0.5, 10.0)


def options_dict(options: Any) -> dict[str, dict[str, Any]]:
    """Backend options as plain dicts, whether the config holds dicts or typed models."""
    out: dict[str, dict[str, Any]] = {}
    for name, value in dict(options or {}).items():
        if hasattr(value, "model_dump"):
            value = value.model_dump(exclude_none=True)
        out[name] = dict(value or {})
    return out


@dataclass(frozen=True)
class LineSettings:
    """The pipeline's view of one line's configuration. Built from the validated config only
    (`from_config`): the config schema (daemon/config.py) is the one place defaults live, so
    no field here has a default of its own."""

    line: str
    latency_budget_ms: float
    on_deadline_miss: str                 # fail-safe verdict: deadline miss, engine error, malformed, dropped
    roi: tuple[int, int, int, int] | None
    backend_preference: tuple[str, ...]
    backend_options: dict[str, dict[str, Any]]
    heatmap_mode: str                     # none | ng | all (published heatmaps)
    archive_enabled: bool
    archive_save: str                     # ng | all: which verdicts go to the archive, if enabled
    queue_size: int
    # Replay "as fast as the pipeline takes": read the next frame only when the queue has room
    # (a camera is never held back: it drops the oldest instead).
    backpressure: bool
    read_timeout_s: float                 # one source read waits at most this long
    reconnect_min_s: float
    reconnect_max_s: float

    @classmethod
    def from_config(cls, cfg: Any, backend_options: dict[str, dict[str, Any]] | None = None) -> "LineSettings":
        """From a validated LineConfig. `backend_options` replaces the config's (the daemon adds
        computed defaults such as the ONNX Runtime thread share)."""
        src = cfg.source
        is_camera = src.type == "genicam"
        low, high = src.reconnect_backoff_s if is_camera else _REPLAY_RECONNECT_S
        return cls(line=cfg.id, latency_budget_ms=float(cfg.latency_budget_ms),
                   on_deadline_miss=cfg.on_deadline_miss, roi=tuple(cfg.roi) if cfg.roi else None,
                   backend_preference=tuple(cfg.backends),
                   backend_options=(backend_options if backend_options is not None
                                    else options_dict(cfg.backend_options)),
                   heatmap_mode=cfg.heatmap.publish, archive_enabled=bool(cfg.archive.enabled),
                   archive_save=cfg.archive.save, queue_size=int(cfg.queue_size),
                   backpressure=not is_camera and getattr(src, "fps", None) is None,
                   # A camera read waits up to its fetch timeout: that is how fast a lost camera shows.
                   read_timeout_s=float(src.fetch_timeout_s) if is_camera else REPLAY_READ_TIMEOUT_S,
                   reconnect_min_s=float(low), reconnect_max_s=float(high))

    def __post_init__(self) -> None:
        if self.on_deadline_miss not in FAIL_SAFE_VERDICTS:
            raise ConfigError(f"line {self.line}: on_deadline_miss {self.on_deadline_miss!r} "
                              f"(expected one of {', '.join(FAIL_SAFE_VERDICTS)})")
        if self.heatmap_mode not in HEATMAP_MODES:
            raise ConfigError(f"line {self.line}: heatmap mode {self.heatmap_mode!r} "
                              f"(expected one of {', '.join(HEATMAP_MODES)})")
        if not self.latency_budget_ms > 0:
            raise ConfigError(f"line {self.line}: latency_budget_ms must be > 0")
        if self.queue_size < 1:
            raise ConfigError(f"line {self.line}: queue size must be >= 1")


def read_calibration(path: Path, bundle_id: str | None = None) -> dict[str, Any]:
    """A calibration JSON file with a finite `threshold`; ConfigError naming the file and what is wrong.
    With `bundle_id` (the bundle the threshold will judge), a file calibrated for another bundle is
    refused: its threshold and good scores are on that bundle's scale (`inspectd calibrate --bundle
    <candidate> --line L` writes L's own file). Files that name no bundle are accepted."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: threshold file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable threshold file ({exc})") from None
    if not isinstance(data, dict) or "threshold" not in data:
        raise ConfigError(f"{path}: no \"threshold\" field (expected a calibration JSON object)")
    value = data["threshold"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite_number(value):
        raise ConfigError(f"{path}: threshold {repr(value)[:40]} is not a finite number")
    made_for = data.get("bundle_id")
    if bundle_id is not None and isinstance(made_for, str) and made_for != bundle_id:
        raise ConfigError(f"{path}: calibrated for bundle {made_for}, not for bundle {bundle_id} that it would "
                          f"judge (calibrate that bundle, or use the file calibrated for it)")
    return data


def drift_watch(line: str, calibration: dict[str, Any], path: Path) -> Any:
    """A DriftWatch on a calibration's good scores (read once with its threshold, so both come from
    the same version of the file), or None (a file without them: drift is a diagnostic, its absence
    never stops a line)."""
    from inspectd.stats import DriftWatch

    try:
        return DriftWatch.from_calibration_data(calibration, path)
    except Exception as exc:  # a malformed good_scores list included: never stops a line
        log.info("line %s: no score drift metric (%s)", line, exc)
        return None


class LineThreshold:
    """The threshold on the normalized score. Readers get one float (a single attribute read, so
    a reload is atomic for them); `reload()` re-reads the calibration file and keeps the old
    value if the new one is bad."""

    def __init__(self, line: str, value: float | None = None, path: str | Path | None = None,
                 bundle_id: str | None = None) -> None:
        if (value is None) == (path is None):
            raise ConfigError(f"line {line}: threshold needs exactly one of a value or a calibration file")
        self.line = line
        self.path = Path(path) if path is not None else None
        self.bundle_id = bundle_id  # the bundle it judges: calibration files made for another are refused
        self._lock = threading.Lock()  # one reload at a time
        # The score-drift reference: the calibration file's good scores (a number has none).
        self.drift: Any = None
        if self.path is not None:
            data = read_calibration(self.path, bundle_id)
            self._value = float(data["threshold"])
            self.drift = drift_watch(self.line, data, self.path)
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite_number(value):
                raise ConfigError(f"line {line}: threshold {value!r} is not a finite number")
            self._value = float(value)

    @classmethod
    def from_config(cls, line: str, spec: float | str | Path, bundle_id: str | None = None) -> "LineThreshold":
        """A number, or a path to a calibration JSON file; with `bundle_id` (the bundle it will
        judge) a file calibrated for another bundle is refused."""
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(line, value=float(spec), bundle_id=bundle_id)
        return cls(line, path=spec, bundle_id=bundle_id)

    @property
    def value(self) -> float:
        return self._value

    def reload(self, spec: float | str | Path | None = None) -> bool:
        """Re-read the threshold. `spec` is the line's threshold as the re-read config now gives it
        (a number or a calibration file: `inspectd calibrate` may have repointed the config); None
        re-reads the current file. A bad value keeps the old threshold (one log line). True if the
        threshold changed."""
        if spec is None and self.path is None:
            return False
        with self._lock:
            path = self.path if spec is None else (
                None if isinstance(spec, (int, float)) and not isinstance(spec, bool) else Path(spec))
            data = None
            try:
                if path is not None:
                    data = read_calibration(path, self.bundle_id)
                    new = float(data["threshold"])
                elif isinstance(spec, bool) or not finite_number(spec):  # type: ignore[arg-type]
                    raise ConfigError(f"threshold {spec!r} is not a finite number")
                else:
                    new = float(spec)  # type: ignore[arg-type]
            except ConfigError as exc:
                log.error("line %s: threshold reload failed, keeping %.4g: %s", self.line, self._value, exc)
                return False
            old, self._value = self._value, new
            moved = path != self.path
            self.path = path
            # A re-read file may hold a new calibration (new good scores) even at the same threshold.
            self.drift = drift_watch(self.line, data, path) if data is not None else None
        where = f"from {path}" if path is not None else "from the config"
        if new != old:
            log.info("line %s: threshold %.4g -> %.4g (%s)", self.line, old, new, where)
            return True
        log.info("line %s: threshold unchanged at %.4g (%s)%s", self.line, new, where,
                 "; source changed" if moved else "")
        return False
