"""Write a line's calibrated threshold where the daemon reads it, atomically.

One stable threshold file per line, which the config points to:

    lines.yaml                      lines[i].threshold: {file: line1.threshold.json}
    line1.threshold.json            {"threshold": ..., "bundle_id": ..., summary, good_scores}  (mode 0644)
    lines.yaml.bak-<UTC timestamp>  the previous config, byte for byte (only when the YAML changed)

- The line already points at a threshold file (used by no other line): that file is replaced
  (temp file + fsync + os.replace), the YAML is not touched. `systemctl reload` (SIGHUP) applies it.
  A threshold file that is replaced is first kept as `<file>.bak` (written like the config backup).
- The line has a number (first calibration) or shares its file with another line: a new
  `<line>.threshold.json` next to the config is written first, then the YAML is repointed to it.
  The YAML is edited with ruamel.yaml round-trip, so comments, order and quoting are kept; the
  rename of the YAML is the commit point (a crash before it leaves the old config effective).

Threshold files are written 0644 whatever the umask: the service user (not root, who runs
`inspectd calibrate`) must read them at every start and reload. A threshold is not a secret.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from inspectd.errors import ConfigError
from inspectd.fileio import atomic_write, fsync_dir, make_dirs

log = logging.getLogger("inspectd.calibration")

THRESHOLD_FILE_MODE = 0o644


@dataclass(frozen=True)
class ConfigUpdate:
    config: Path
    calibration_file: Path          # the line's threshold file (what the daemon reads)
    old_threshold: Any              # the previous number, or the previous file's threshold (None if unreadable)
    new_threshold: float
    config_changed: bool            # False: only the threshold file was replaced
    backup: Path | None = None      # the old config, when the YAML was rewritten
    threshold_backup: Path | None = None  # <threshold file>.bak: the file this update replaced


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
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: config is not UTF-8 text") from None
    from inspectd.daemon.config import parse_config_text

    # The daemon's parser, not yaml.safe_load: a duplicated key (two `threshold:`) must stop calibrate
    # before it writes the file YAML's last-key-wins picks, which the daemon would then refuse.
    data = parse_config_text(text, p)
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


def check_line(config_path: str | os.PathLike, line_id: str, bundle_id: str | None = None) -> Any:
    """Fail early (before any scoring) when the config or the line is unusable, or (with
    `bundle_id`, the bundle being calibrated) when the line's own threshold file would be written
    for another bundle than the line's: the daemon would refuse it (daemon/line.read_calibration).
    Returns the line's current threshold setting."""
    config = Path(config_path)
    _, data = read_config(config)
    threshold = find_line(data, line_id, config).get("threshold")
    validated = _validate_with_daemon_schema(config, data)
    threshold_target(config, data, line_id)  # a file clash fails now, not after scoring
    if bundle_id is not None:
        from inspectd.engines.bundle import read_bundle_id

        from inspectd.daemon.recipes import promoted_over_config, state_path, threshold_json

        line = next(c for c in validated.lines if c.id == line_id)
        promoted = promoted_over_config(line, validated.state_dir)
        if promoted is not None:
            running = read_bundle_id(promoted.bundle) or "?"
            where = f"--config {config} --line {line_id}"
            raise ConfigError(
                f"{config}: line {line_id}'s own recipe ({promoted.name}) runs bundle {running} ({promoted.bundle}) "
                f"with threshold {threshold_json(promoted.threshold)}, promoted over the config's (recorded in "
                f"{state_path(validated.state_dir, line_id)}): a threshold written to the line's own file would "
                f"judge no part until a rollback; to recalibrate that bundle add --dry-run --report DIR, then, with "
                f"recipe {promoted.name} active, `inspectd shadow {where} --bundle {promoted.bundle} "
                f"--threshold-file DIR/report.json` and `inspectd promote {where}`")
        # Its manifest's id is all the comparison needs (verifying every file of the line's bundle
        # would hash it again); one that does not read is the daemon's to report: nothing to compare.
        own = read_bundle_id(line.bundle)
        if own is not None and own != bundle_id:
            raise ConfigError(f"{config}: line {line_id} runs bundle {own} ({line.bundle}), not bundle {bundle_id}: "
                              f"its threshold file would be refused there; for a candidate use --dry-run --report "
                              f"DIR and give DIR/report.json to `inspectd shadow --threshold-file`")
    return threshold


def state_dir(config_path: str | os.PathLike) -> Path:
    """The config's `state_dir` (reports go under it), from the daemon's own schema."""
    config = Path(config_path)
    _, data = read_config(config)
    from inspectd.daemon.config import config_from_dict

    return config_from_dict(data, source=str(config), base_dir=config.resolve().parent).state_dir


def threshold_file_name(line_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", line_id) + ".threshold.json"


def _threshold_file_users(folder: Path, data: dict[str, Any]) -> list[tuple[str, Path]]:
    """Every threshold file the config names, with who judges with it: ("line 'l1'", path),
    ("line 'l1' recipe 'A'", path), ("line 'l1' shadow", path)."""
    users: list[tuple[str, Path]] = []

    def add(who: str, threshold: Any) -> None:
        if isinstance(threshold, dict) and isinstance(threshold.get("file"), str):
            users.append((who, _resolve(folder, threshold["file"])))

    for entry in data["lines"]:
        if not isinstance(entry, dict):
            continue
        line = f"line {entry.get('id')!r}"
        add(line, entry.get("threshold"))
        for recipe in entry.get("recipes") or []:
            if isinstance(recipe, dict):
                add(f"{line} recipe {recipe.get('name')!r}", recipe.get("threshold"))
        if isinstance(entry.get("shadow"), dict):
            add(f"{line} shadow", entry["shadow"].get("threshold"))
    return users


def threshold_target(config_path: str | os.PathLike, data: dict[str, Any], line_id: str) -> tuple[Path, bool]:
    """(the file the line's threshold goes to, whether the YAML must be repointed to it). A file that
    anything else judges with (another line, a recipe, a shadow) is never written."""
    config = Path(config_path)
    folder = config.resolve().parent
    own_user = f"line {line_id!r}"
    others = [(who, path) for who, path in _threshold_file_users(folder, data) if who != own_user]
    own = find_line(data, line_id, config).get("threshold")
    if isinstance(own, dict) and isinstance(own.get("file"), str):
        current = _resolve(folder, own["file"])
        shared = [who for who, path in others if path == current]
        if not shared:
            return current, False
        log.info("line %s shares %s with %s: giving it its own threshold file", line_id, current, ", ".join(shared))
    target = folder / threshold_file_name(line_id)
    users = [who for who, path in others if path == target]
    if users:  # never overwrite what another line, recipe or shadow judges with
        raise ConfigError(f"{config}: {target.name} is the threshold file of {users[0]}; point line "
                          f"{line_id!r} at a file of its own (threshold: {{file: ...}}) and calibrate again")
    return target, True


def _resolve(folder: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else folder / p))


def update_line_threshold(config_path: str | os.PathLike, line_id: str, calibration: dict[str, Any],
                          now: datetime | None = None, history_dir: str | os.PathLike | None = None) -> ConfigUpdate:
    """Write `calibration` (which must have `threshold` and `bundle_id`) as line `line_id`'s
    threshold file; repoint the YAML only when the line has no file of its own yet. The previous
    threshold file, if any, is copied into `history_dir` (the calibration report folder)."""
    config = Path(config_path)
    if not isinstance(calibration.get("threshold"), (int, float)) or not isinstance(calibration.get("bundle_id"), str):
        raise ConfigError("calibration summary needs a numeric threshold and a bundle_id")
    old_bytes, data = read_config(config)
    entry = find_line(data, line_id, config)
    _validate_with_daemon_schema(config, data)
    target, repoint = threshold_target(config, data, line_id)
    old_spec = entry.get("threshold")
    old_threshold: Any = old_spec
    previous_bytes: bytes | None = None
    if isinstance(old_spec, dict):
        old_file = _resolve(config.resolve().parent, str(old_spec.get("file")))
        try:
            previous_bytes = old_file.read_bytes()
            old_threshold = json.loads(previous_bytes).get("threshold")
        except (OSError, ValueError, AttributeError):
            old_threshold = None

    record = dict(calibration)
    record.setdefault("line", line_id)
    record["previous_threshold"] = old_threshold
    new_text = None
    backup = None
    if repoint:
        name = target.name if target.parent == config.resolve().parent else os.fspath(target)
        new_text = repoint_yaml(config, old_bytes.decode("utf-8"), line_id, name)
        expected = yaml.safe_load(old_bytes.decode("utf-8"))
        find_line(expected, line_id, config)["threshold"] = {"file": name}
        if yaml.safe_load(new_text) != expected:  # never write a config that does not read back as intended
            raise ConfigError(f"{config}: the updated config does not round-trip through YAML; not written")
        _validate_with_daemon_schema(config, expected)
        backup = config.with_name(f"{config.name}.bak-{utc_stamp(now)}")
        if backup.exists():
            raise ConfigError(f"{backup}: a config backup with this timestamp already exists")
        record["config_backup"] = backup.name

    _check_threshold_folder(target, line_id)
    existed = target.exists()
    kept_as = _threshold_backup_path(config, data, target) if existed else None
    if history_dir is not None and previous_bytes is not None:
        make_dirs(history_dir)
        atomic_write(Path(history_dir) / "previous-threshold.json", previous_bytes, mode=THRESHOLD_FILE_MODE)
    threshold_backup = None
    if kept_as is not None:  # the file being replaced stays one step back, not only in the audit log
        try:
            _write_like(kept_as, target.read_bytes(), target)
        except OSError as exc:
            raise ConfigError(f"{kept_as}: cannot keep the previous threshold file ({exc.strerror or exc}); "
                              f"nothing changed: move it away or free the space, and calibrate again") from None
        threshold_backup = kept_as
    try:
        atomic_write(target, (json.dumps(record, indent=2) + "\n").encode("utf-8"), mode=THRESHOLD_FILE_MODE)
    except OSError as exc:
        _check_threshold_folder(target, line_id)  # taken away since the check: name it
        raise ConfigError(f"{target}: cannot write the threshold file ({exc.strerror or exc})") from None
    if backup is not None and new_text is not None:  # set together when repointing
        _write_like(backup, old_bytes, config)
        try:
            _write_like(config, new_text.encode("utf-8"), config)  # the commit point
        except BaseException:
            if not existed:
                _unlink_quietly(target)  # unreferenced; the backup stays (it equals the config)
            raise
    log.info("line %s: threshold %s -> %.6g (%s%s)", line_id, old_threshold, float(calibration["threshold"]),
             target, f"; config repointed, old config kept as {backup.name}" if backup else "")
    return ConfigUpdate(config=config, calibration_file=target, old_threshold=old_threshold,
                        new_threshold=float(calibration["threshold"]), config_changed=repoint, backup=backup,
                        threshold_backup=threshold_backup)


def check_threshold_folder(config_path: str | os.PathLike, line_id: str) -> Path:
    """Before scoring: the folder of the file line `line_id`'s threshold will be written to must
    exist; returns that file."""
    config = Path(config_path)
    _, data = read_config(config)
    target, _ = threshold_target(config, data, line_id)
    _check_threshold_folder(target, line_id)
    if target.exists():
        _threshold_backup_path(config, data, target)
    return target


def _check_threshold_folder(target: Path, line_id: str) -> None:
    """ConfigError naming the folder when the threshold file's folder is missing. Not created: a
    typo in the config's path would quietly get a folder of its own."""
    folder = target.parent
    if folder.is_dir():
        return
    what = "is not a folder" if folder.exists() else "does not exist"
    raise ConfigError(f"{target}: cannot write the threshold file: folder {folder} {what}; create it, or point "
                      f"the threshold of line {line_id!r} at a file in an existing folder")


def _threshold_backup_path(config: Path, data: dict[str, Any], target: Path) -> Path:
    """<threshold file>.bak, unless something in the config judges with a file of that name."""
    kept_as = target.with_name(target.name + ".bak")
    users = [who for who, path in _threshold_file_users(config.resolve().parent, data) if path == kept_as]
    if users:
        raise ConfigError(f"{config}: {kept_as.name} is the threshold file of {users[0]}, and calibrate keeps the "
                          f"file it replaces as {kept_as.name}: give that one another name")
    return kept_as


def repoint_yaml(config: Path, text: str, line_id: str, file_name: str) -> str:
    """`text` with line `line_id`'s threshold set to {file: file_name}; everything else (comments,
    key order, quoting, indentation) as it was, through ruamel.yaml's round-trip mode."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.util import load_yaml_guess_indent

    try:
        _, indent, seq_offset = load_yaml_guess_indent(text)
        rt = YAML(typ="rt")
        rt.preserve_quotes = True
        rt.width = 4096  # never re-wrap long lines
        rt.indent(mapping=(indent - seq_offset) if seq_offset else indent, sequence=indent, offset=seq_offset)
        # ruamel writes None as an empty value; keep an explicit `null` as written.
        rt.representer.add_representer(
            type(None), lambda r, _d: r.represent_scalar("tag:yaml.org,2002:null", "null"))
        doc = rt.load(text)
    except YAMLError as exc:
        raise ConfigError(f"{config}: YAML syntax error ({exc})".replace("\n", " ")) from None
    entry = find_line(doc, line_id, config)
    spec = CommentedMap()
    spec["file"] = file_name
    spec.fa.set_flow_style()
    entry["threshold"] = spec
    out = io.StringIO()
    rt.dump(doc, out)
    return out.getvalue()


def _validate_with_daemon_schema(config: Path, data: dict[str, Any]) -> Any:
    """Refuse a config the daemon would reject (its schema, errors naming the file and field);
    returns the validated DaemonConfig."""
    from inspectd.daemon.config import config_from_dict

    return config_from_dict(data, source=str(config), base_dir=config.resolve().parent)


def _write_like(path: Path, data: bytes, like: Path) -> None:
    """atomic_write keeping `like`'s mode, owner and group: the config is typically root:inspectd
    0640, and a root-owned replacement would lock the service user out of its own config."""
    st = like.stat()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), st.st_mode & 0o7777)
            if (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(fh.fileno(), st.st_uid, st.st_gid)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
