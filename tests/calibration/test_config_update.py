"""Atomic threshold update: the first calibration writes <line>.threshold.json (0644) and repoints
the YAML with ruamel.yaml round-trip (comments kept, byte-exact backup); later ones replace that
file and leave the YAML alone. A crash at the commit point (in-process failure, and a real SIGKILL
of a child process) leaves the old config intact and loadable by the daemon's own config loader."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from inspectd.calibration import config_update as cu
from inspectd.daemon.config import load_config
from inspectd.errors import ConfigError

CONFIG = """\
# production lines: this comment must survive a calibration
zmq: {endpoint: "tcp://127.0.0.1:5555"}   # loopback only
lines:
  - id: line1
    source: {type: replay, path: frames/}
    bundle: bundles/tiny
    threshold: 3.0            # set by inspectd calibrate
    latency_budget_ms: 50
  - id: line2
    source: {type: replay, path: frames2/}
    bundle: bundles/tiny
    threshold: 2.5
"""

CALIBRATION = {"threshold": 1.75, "bundle_id": "abc123def456", "n_good": 600, "target_false_reject": 0.005,
               "false_reject_bound": 0.00499, "good_scores": [0.1, 0.2]}


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "lines.yaml"
    path.write_text(CONFIG)
    return path


def _siblings(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_first_calibration_repoints_the_config_keeping_comments(config: Path) -> None:
    old_umask = os.umask(0o077)  # root's sudo umask: the file must still be readable by the service
    try:
        upd = cu.update_line_threshold(config, "line1", CALIBRATION)
    finally:
        os.umask(old_umask)
    assert upd.config_changed and upd.calibration_file == config.parent / "line1.threshold.json"
    assert stat.S_IMODE(upd.calibration_file.stat().st_mode) == 0o644
    # The daemon's loader accepts the new config and resolves the file next to it.
    line1 = load_config(config, validate_paths=False).line("line1")
    assert Path(line1.threshold.file) == upd.calibration_file
    record = json.loads(upd.calibration_file.read_text())
    assert record["threshold"] == 1.75 and record["bundle_id"] == "abc123def456"
    assert record["previous_threshold"] == 3.0 and record["n_good"] == 600
    # Only the threshold line changed; every comment is still there.
    new = config.read_text().splitlines()
    old = CONFIG.splitlines()
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(new) == len(old) and changed == [("    threshold: 3.0            # set by inspectd calibrate",
                                                 "    threshold: {file: line1.threshold.json} # set by inspectd calibrate")]
    # Backup is the old file byte for byte.
    assert upd.backup is not None and upd.backup.read_text() == CONFIG
    assert upd.backup.name.startswith("lines.yaml.bak-")
    assert not [n for n in _siblings(config.parent) if n.endswith(".tmp")]


def test_recalibration_replaces_the_file_and_leaves_the_yaml_alone(config: Path, tmp_path: Path) -> None:
    first = cu.update_line_threshold(config, "line1", CALIBRATION)
    yaml_bytes = config.read_bytes()
    history = tmp_path / "report"
    second = cu.update_line_threshold(config, "line1", {**CALIBRATION, "threshold": 2.0}, history_dir=history)
    assert not second.config_changed and second.backup is None
    assert second.calibration_file == first.calibration_file and config.read_bytes() == yaml_bytes
    assert second.old_threshold == 1.75 and json.loads(first.calibration_file.read_text())["threshold"] == 2.0
    assert stat.S_IMODE(first.calibration_file.stat().st_mode) == 0o644
    assert json.loads((history / "previous-threshold.json").read_text())["threshold"] == 1.75
    assert len(list(config.parent.glob("lines.yaml.bak-*"))) == 1  # only the first one changed the YAML


def test_a_threshold_file_shared_with_another_line_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "lines.yaml"
    path.write_text(CONFIG.replace("threshold: 3.0", "threshold: {file: shared.json}").replace(
        "threshold: 2.5", "threshold: {file: ./shared.json}"))
    (tmp_path / "shared.json").write_text(json.dumps({"threshold": 4.0}))
    upd = cu.update_line_threshold(path, "line1", CALIBRATION)
    assert upd.config_changed and upd.calibration_file.name == "line1.threshold.json"
    assert json.loads((tmp_path / "shared.json").read_text()) == {"threshold": 4.0}  # line2 unchanged
    assert load_config(path).line("line2").threshold.file == tmp_path / "shared.json"


def test_another_lines_threshold_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "lines.yaml"
    text = CONFIG.replace("threshold: 2.5", "threshold: {file: line1.threshold.json}")
    path.write_text(text)
    (tmp_path / "line1.threshold.json").write_text(json.dumps({"threshold": 4.0}))
    with pytest.raises(ConfigError, match="line1.threshold.json is the threshold file of line 'line2'"):
        cu.update_line_threshold(path, "line1", CALIBRATION)
    assert path.read_text() == text and json.loads((tmp_path / "line1.threshold.json").read_text()) == {"threshold": 4.0}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_repointed_config_keeps_its_owner_group_and_mode(config: Path) -> None:
    os.chown(config, 0, 65534)  # root:<service group>, as deploy/install.sh installs configs
    config.chmod(0o640)
    upd = cu.update_line_threshold(config, "line1", CALIBRATION)
    for path in (config, upd.backup):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 65534, 0o640), path


def test_repointing_the_shipped_example_changes_one_line(tmp_path: Path) -> None:
    """The deploy example (comments, flow mappings, quoted strings, `null`, 4-space sequences)."""
    example = Path(__file__).resolve().parents[2] / "deploy" / "lines.example.yaml"
    path = tmp_path / "lines.yaml"
    path.write_text(example.read_text())
    cu.update_line_threshold(path, "press2", CALIBRATION)
    old, new = example.read_text().splitlines(), path.read_text().splitlines()
    assert len(old) == len(new)
    assert [(a, b) for a, b in zip(old, new) if a != b] == [("    threshold: 3.0",
                                                             "    threshold: {file: press2.threshold.json}")]


def test_failure_at_commit_point_leaves_old_config_intact(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def failing_replace(src: str, dst: str | os.PathLike) -> None:
        if Path(dst) == config:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)  # only this test: simulate the crash
    with pytest.raises(OSError):
        cu.update_line_threshold(config, "line1", CALIBRATION)
    monkeypatch.setattr(os, "replace", real_replace)
    assert config.read_text() == CONFIG
    assert load_config(config).line("line1").threshold == 3.0
    names = _siblings(config.parent)
    assert not [n for n in names if n.endswith(".tmp")]            # temp file cleaned up
    assert "line1.threshold.json" not in names                     # unreferenced record removed


def test_sigkill_of_writer_at_commit_point_leaves_old_config_intact(config: Path) -> None:
    """A real crash: a child process is SIGKILLed right before the config rename."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        from inspectd.calibration import config_update as cu
        config = Path({str(config)!r})
        real = os.replace
        def dying_replace(src, dst):
            if Path(dst) == config:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        os.replace = dying_replace
        cu.update_line_threshold(config, "line1", {{"threshold": 9.0, "bundle_id": "x"}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert config.read_text() == CONFIG
    assert load_config(config).line("line1").threshold == 3.0
    # The complete new YAML sat in a temp file (fsynced) that never replaced the config.
    temps = [p for p in config.parent.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and yaml.safe_load(temps[0].read_text())["lines"][0]["threshold"]["file"]


def test_unknown_line_is_refused_with_known_ids_and_nothing_written(config: Path) -> None:
    before = _siblings(config.parent)
    with pytest.raises(ConfigError, match=r"line 'line9' is not in the config \(lines: line1, line2\)"):
        cu.update_line_threshold(config, "line9", CALIBRATION)
    assert _siblings(config.parent) == before and config.read_text() == CONFIG


@pytest.mark.parametrize("text,match", [
    ("lines: [\n  - id: x\n", "YAML syntax error"),
    ("- just\n- a list\n", "not a mapping"),
    ("zmq: {}\n", "no `lines:` list"),
])
def test_broken_configs_give_one_line_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "lines.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        cu.check_line(path, "x")
    assert "\n" not in str(err.value)
    assert path.read_text() == text


def test_config_the_daemon_rejects_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "lines.yaml"
    text = CONFIG.replace("latency_budget_ms: 50", "latency_budget: 50")  # typo: daemon rejects it
    path.write_text(text)
    with pytest.raises(ConfigError, match="latency_budget"):
        cu.update_line_threshold(path, "line1", CALIBRATION)
    assert path.read_text() == text and _siblings(tmp_path) == {"lines.yaml"}


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        cu.check_line(tmp_path / "nope.yaml", "line1")


@pytest.mark.parametrize("user", ["recipe", "shadow", "own recipe"])
def test_a_recipes_or_shadows_threshold_file_is_never_overwritten(tmp_path: Path, user: str) -> None:
    """A second product came to line1: its first bundle moved into a recipe that keeps the file
    calibrated for it (line1.threshold.json), the line's default got the new bundle. Calibrating the
    default must not overwrite the recipe's file (nor a shadow's, nor the same file shared by the
    line's own threshold and one of its recipes): that recipe would be refused, or judge wrongly."""
    path = tmp_path / "lines.yaml"
    keep = "threshold: {file: line1.threshold.json}"
    if user == "recipe":
        text = CONFIG.replace("    latency_budget_ms: 50\n", "    latency_budget_ms: 50\n    recipes:\n"
                              f"      - {{name: productA, bundle: bundles/a, {keep}}}\n")
        who = "line 'line1' recipe 'productA'"
    elif user == "shadow":
        text = CONFIG.replace("    threshold: 2.5\n", "    threshold: 2.5\n"
                              f"    shadow: {{bundle: bundles/cand, {keep}}}\n")
        who = "line 'line2' shadow"
    else:
        text = CONFIG.replace("threshold: 3.0 ", keep + " ").replace(
            "    latency_budget_ms: 50\n", "    latency_budget_ms: 50\n    recipes:\n"
            f"      - {{name: productA, bundle: bundles/a, {keep}}}\n")
        who = "line 'line1' recipe 'productA'"
    path.write_text(text)
    load_config(path)  # a valid config
    (tmp_path / "line1.threshold.json").write_text(json.dumps({"threshold": 4.0}))
    with pytest.raises(ConfigError, match=f"line1.threshold.json is the threshold file of {who}"):
        cu.update_line_threshold(path, "line1", CALIBRATION)
    assert path.read_text() == text and json.loads((tmp_path / "line1.threshold.json").read_text()) == {"threshold": 4.0}


def test_a_duplicated_key_is_refused_like_the_daemon_does_before_anything_is_written(tmp_path: Path) -> None:
    """YAML keeps the last of two `threshold:` keys, so calibrate would write b.json and ask for a
    SIGHUP that the daemon refuses ("duplicate key"): calibrate refuses the config up front, with
    the daemon's own one-line error."""
    path = tmp_path / "lines.yaml"
    text = CONFIG.replace("    threshold: 3.0            # set by inspectd calibrate\n",
                          "    threshold: {file: a.json}\n    threshold: {file: b.json}\n")
    path.write_text(text)
    with pytest.raises(ConfigError) as daemon:
        load_config(path)
    for call in (lambda: cu.check_line(path, "line1"), lambda: cu.state_dir(path),
                 lambda: cu.update_line_threshold(path, "line1", CALIBRATION)):
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value) == str(daemon.value), err.value
        assert str(err.value).startswith(f"{path}: line ") and "duplicate key 'threshold'" in str(err.value)
        assert "\n" not in str(err.value)
    assert _siblings(tmp_path) == {"lines.yaml"} and path.read_text() == text  # no threshold file, no backup


def test_calibrate_cli_refuses_a_duplicated_key_before_scoring(tmp_path: Path, tiny_bundle: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`inspectd calibrate --config F`: exit 2 with the daemon's one line, no threshold file, no
    report (nothing scored), no SIGHUP advice."""
    from inspectd.cli import main

    path = tmp_path / "lines.yaml"
    text = (f"state_dir: {tmp_path / 'state'}\nlines:\n  - id: line1\n    source: {{type: replay, path: frames}}\n"
            f"    bundle: {tiny_bundle}\n    threshold: {{file: a.json}}\n    threshold: {{file: b.json}}\n")
    path.write_text(text)
    (tmp_path / "good").mkdir()  # empty: would fail later, after the config check, if that let it through
    rc = main(["calibrate", "--bundle", str(tiny_bundle), "--good", str(tmp_path / "good"), "--line", "line1",
               "--target-false-reject", "5%", "--config", str(path)])
    out, err = capsys.readouterr()
    assert rc == 2 and "SIGHUP" not in out, (out, err)
    assert err.strip() == f"inspectd calibrate: error: {path}: line 7, column 5: YAML syntax error: duplicate key " \
                          f"'threshold'", err
    assert _siblings(tmp_path) == {"lines.yaml", "good"} and path.read_text() == text


def test_replacing_a_threshold_file_keeps_the_previous_one_as_bak(config: Path) -> None:
    first = cu.update_line_threshold(config, "line1", CALIBRATION)
    bak = first.calibration_file.with_name("line1.threshold.json.bak")
    assert not bak.exists()
    before = first.calibration_file.read_bytes()
    cu.update_line_threshold(config, "line1", {**CALIBRATION, "threshold": 2.0})
    assert bak.read_bytes() == before and stat.S_IMODE(bak.stat().st_mode) == 0o644
    assert json.loads(first.calibration_file.read_text())["threshold"] == 2.0
    cu.update_line_threshold(config, "line1", {**CALIBRATION, "threshold": 2.5})
    assert json.loads(bak.read_text())["threshold"] == 2.0  # the one just replaced
    assert not [n for n in _siblings(config.parent) if n.endswith(".tmp")]


def test_a_bak_that_cannot_be_written_leaves_the_threshold_file_as_it_was(config: Path) -> None:
    first = cu.update_line_threshold(config, "line1", CALIBRATION)
    before = first.calibration_file.read_bytes()
    (config.parent / "line1.threshold.json.bak").mkdir()  # in the way: a folder of that name
    with pytest.raises(ConfigError, match=r"line1\.threshold\.json\.bak: cannot keep the previous threshold file"):
        cu.update_line_threshold(config, "line1", {**CALIBRATION, "threshold": 2.0})
    assert first.calibration_file.read_bytes() == before


def test_a_threshold_file_in_a_missing_folder_names_the_folder(tmp_path: Path) -> None:
    path = tmp_path / "lines.yaml"
    path.write_text(CONFIG.replace("threshold: 3.0", "threshold: {file: thresholds/line1.json}"))
    with pytest.raises(ConfigError) as info:
        cu.update_line_threshold(path, "line1", CALIBRATION)
    assert f"folder {tmp_path / 'thresholds'} does not exist" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "thresholds").exists()


def test_a_bak_name_another_line_judges_with_is_never_overwritten(config: Path) -> None:
    first = cu.update_line_threshold(config, "line1", CALIBRATION)
    text = config.read_text().replace("threshold: 2.5", "threshold: {file: line1.threshold.json.bak}")
    config.write_text(text)
    (config.parent / "line1.threshold.json.bak").write_text(json.dumps({"threshold": 4.0}))
    before = first.calibration_file.read_bytes()
    with pytest.raises(ConfigError, match="line1.threshold.json.bak is the threshold file of line 'line2'"):
        cu.update_line_threshold(config, "line1", {**CALIBRATION, "threshold": 2.0})
    assert json.loads((config.parent / "line1.threshold.json.bak").read_text()) == {"threshold": 4.0}
    assert first.calibration_file.read_bytes() == before and config.read_text() == text
