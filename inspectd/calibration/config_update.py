"""Write a line's calibrated threshold into the daemon's YAML config, atomically.

Layout (next to the config file, relative paths as the daemon resolves them):

    lines.yaml                                 lines[i].threshold: {file: line1.calibration-<ts>.json}
    lines.yaml.bak-<UTC timestamp>             the previous config, byte for byte
    line1.calibration-<ts>.json                {"threshold": ..., "bundle_id": ..., summary, good_scores}

Each calibration gets its own file name, so the ONE commit point is the os.replace of the YAML:
a crash before it leaves the old config (and the old calibration file it points to) untouched and
effective; a crash after it leaves the new one. Every file is written as temp file in the same
folder + fsync + os.replace + fsync of the folder.

The YAML is re-dumped with yaml.safe_dump (key order kept; comments and formatting are NOT
kept — the byte-exact old file is in the .bak).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from inspectd.fileio import atomic_write
from inspectd.errors import ConfigError

log = logging.getLogger("inspectd.calibration")


@dataclass(frozen=True)
class ConfigUpdate:
    config: Path
    backup: Path
    calibration_file: Path
    old_threshold: Any
    new_threshold: float


def utc_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")


def read_config(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
    """The config's bytes and parsed mapping; ConfigError naming the file for anything unusable."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: config is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} YAML syntax error ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: config top level is not a mapping")
    return raw, data


def find_line(data: dict[str, Any], line_id: str, config_path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of line `line_id` in `lines:` (a list of {id: ...}); ConfigError listing the known ids."""
    lines = data.get("lines")
    if not isinstance(lines, list):
        raise ConfigError(f"{config_path}: no `lines:` list in the config")
    ids = [entry.get("id") for entry in lines if isinstance(entry, dict)]
    for entry in lines:
        if isinstance(entry, dict) and entry.get("id") == line_id:
            return entry
    known = ", ".join(str(i) for i in ids if i is not None) or "none"
    raise ConfigError(f"{config_path}: line {line_id!r} is not in the config (lines: {known})")


def check_line(config_path: str | os.PathLike, line_id: str) -> Any:
    """Fail early (before any scoring) when the config or the line is unusable; returns the
    line's current threshold setting."""
    _, data = read_config(config_path)
    threshold = find_line(data, line_id, config_path).get("threshold")
    _validate_with_daemon_schema(Path(config_path), data)
    return threshold


def calibration_file_name(line_id: str, stamp: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", line_id)
    return f"{safe}.calibration-{stamp}.json"


def update_line_threshold(config_path: str | os.PathLike, line_id: str, calibration: dict[str, Any],
                          now: datetime | None = None) -> ConfigUpdate:
    """Point line `line_id` at a new calibration file holding `calibration` (which must have
    `threshold` and `bundle_id`), keeping a timestamped backup of the old config."""
    config = Path(config_path)
    if not isinstance(calibration.get("threshold"), (int, float)) or not isinstance(calibration.get("bundle_id"), str):
        raise ConfigError("calibration summary needs a numeric threshold and a bundle_id")
    old_bytes, data = read_config(config)
    entry = find_line(data, line_id, config)
    _validate_with_daemon_schema(config, data)
    old_threshold = entry.get("threshold")
    stamp = utc_stamp(now)
    folder = config.parent
    cal_path = folder / calibration_file_name(line_id, stamp)
    backup = config.with_name(f"{config.name}.bak-{stamp}")
    if cal_path.exists() or backup.exists():
        raise ConfigError(f"{config}: a calibration with timestamp {stamp} already exists")

    record = dict(calibration)
    record.setdefault("line", line_id)
    record["previous_threshold"] = old_threshold
    record["config_backup"] = backup.name
    entry["threshold"] = {"file": cal_path.name}
    new_text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    if yaml.safe_load(new_text) != data:  # never write a config that does not read back as intended
        raise ConfigError(f"{config}: the updated config does not round-trip through YAML; not written")
    _validate_with_daemon_schema(config, data)

    atomic_write(backup, old_bytes, mode=_mode(config))
    atomic_write(cal_path, (json.dumps(record, indent=2) + "\n").encode("utf-8"))
    try:
        atomic_write(config, new_text.encode("utf-8"), mode=_mode(config))  # the commit point
    except BaseException:
        _unlink_quietly(cal_path)  # unreferenced; the backup stays (it equals the config)
        raise
    log.info("line %s: threshold %s -> %.6g (%s); old config kept as %s", line_id, old_threshold,
             float(calibration["threshold"]), cal_path.name, backup.name)
    return ConfigUpdate(config=config, backup=backup, calibration_file=cal_path,
                        old_threshold=old_threshold, new_threshold=float(calibration["threshold"]))


def _validate_with_daemon_schema(config: Path, data: dict[str, Any]) -> None:
    """Refuse a config the daemon would reject (its schema, errors naming the file and field)."""
    try:
        from inspectd.daemon.config import config_from_dict
    except ImportError:  # daemon part not installed/built: the YAML structure checks above still hold
        return
    config_from_dict(data, source=str(config), base_dir=config.resolve().parent)


def _mode(path: Path) -> int | None:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return None


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
