"""Daemon config: schema, one-line errors naming file + field path, path resolution, and the
`inspectd check-config` command run as a real subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from inspectd.daemon.config import (GenicamSourceConfig, ReplaySourceConfig, ThresholdFile, load_config)
from inspectd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """\
lines:
  - id: line1
    source: {type: replay, path: parts}
    bundle: bundle
    threshold: 3.0
"""

FULL = """\
zmq: {endpoint: "ipc:///tmp/x.sock", sndhwm: 10, linger_ms: 5,
      curve: {server_secret_key_file: keys/server.key_secret}}
metrics: {host: 0.0.0.0, port: 0}
heartbeat_interval_s: 0.5
log_level: DEBUG
lines:
  - id: cam-A_1
    source:
      type: genicam
      cti: producer.cti
      device: {serial: "0"}
      pixel_format: BayerRG8
      exposure_us: 800
      trigger: {mode: "On", source: Line0}
      features: {Gain: 1.5, ReverseX: true}
      fetch_timeout_s: 0.5
      reconnect_backoff_s: [0.25, 4]
    roi: [10, 20, 300, 200]
    bundle: /abs/bundle
    backends: [onnxruntime]
    backend_options: {onnxruntime: {intra_op_threads: 1}}
    threshold: {file: calib/line.json}
    latency_budget_ms: 35.5
    on_deadline_miss: SKIP
    queue_size: 2
    heatmap: {publish: all, width: 32, height: 16, encoding: raw}
    archive: {enabled: true, dir: archive, quota_mb: 10, save: all}
  - id: line2
    source: {type: replay, path: video.mp4, fps: 25, loop: true}
    bundle: b2
    threshold: -1
"""


def _write(tmp_path: Path, text: str, name: str = "lines.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _error(path: Path, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and info.value.exit_code == 2
    return msg


def test_minimal_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg.zmq.endpoint == "tcp://127.0.0.1:5555" and cfg.zmq.sndhwm == 1000 and cfg.zmq.curve is None
    assert cfg.metrics.host == "127.0.0.1" and cfg.metrics.port == 9108
    assert cfg.heartbeat_interval_s == 1.0 and cfg.log_level == "INFO"
    line = cfg.lines[0]
    assert isinstance(line.source, ReplaySourceConfig)
    assert line.source.path == tmp_path / "parts"          # relative to the config file, not the cwd
    assert line.bundle == tmp_path / "bundle"
    assert line.threshold == 3.0 and line.backends == ["tensorrt", "onnxruntime"]
    assert line.latency_budget_ms == 50 and line.on_deadline_miss == "NG" and line.queue_size == 4
    assert line.heatmap.publish == "ng" and line.archive.enabled is False
    assert line.source.fps is None and line.source.loop is False


def test_full_config(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, FULL))
    a, b = cfg.lines
    assert isinstance(a.source, GenicamSourceConfig)
    assert a.source.cti == tmp_path / "producer.cti" and a.source.device.serial == "0"
    assert a.source.trigger.mode == "On" and a.source.trigger.source == "Line0"
    assert a.source.features == {"Gain": 1.5, "ReverseX": True}
    assert a.source.reconnect_backoff_s == (0.25, 4.0)
    assert a.roi == (10, 20, 300, 200) and a.bundle == Path("/abs/bundle")
    assert isinstance(a.threshold, ThresholdFile) and a.threshold.file == tmp_path / "calib" / "line.json"
    assert a.archive.dir == tmp_path / "archive" and a.heatmap.encoding == "raw"
    assert cfg.zmq.curve.server_secret_key_file == tmp_path / "keys" / "server.key_secret"
    assert b.threshold == -1.0 and b.source.fps == 25 and cfg.line("line2") is b
    with pytest.raises(ConfigError, match="no line 'x'"):
        cfg.line("x")


@pytest.mark.parametrize("edit, expected", [
    (("latency_budget_ms: 35.5", "latency_budget_ms: 0"), r"lines\[0\]\.latency_budget_ms: .*greater than 0"),
    (("queue_size: 2", "queue_sise: 2"), r"lines\[0\]\.queue_sise: unknown key"),
    (("exposure_us: 800", "exposure_us: -3"), r"lines\[0\]\.source\.exposure_us: .*greater than 0"),
    (("type: genicam", "type: usb"), r"lines\[0\]\.source: expected type: genicam or replay \(got 'usb'\)"),
    (("device: {serial: \"0\"}", "device: {serial: \"0\", index: 1}"),
     r"lines\[0\]\.source\.device: expected exactly one of serial, id, index"),
    (("on_deadline_miss: SKIP", "on_deadline_miss: MAYBE"), r"lines\[0\]\.on_deadline_miss: .*'NG'"),
    (("backends: [onnxruntime]", "backends: [onnxruntime, cuda]"), r"lines\[0\]\.backends: unknown backend 'cuda'"),
    (("backend_options: {onnxruntime: {intra_op_threads: 1}}", "backend_options: {tensorrt: {}}"),
     r"lines\[0\]: backend_options for tensorrt"),
    (("roi: [10, 20, 300, 200]", "roi: [10, 20, 300]"), r"lines\[0\]\.roi: expected \[x, y, w, h\]"),
    (("roi: [10, 20, 300, 200]", "roi: [10, 20, 0, 200]"), r"lines\[0\]\.roi: .*w, h > 0"),
    (("threshold: -1", "threshold: high"), r"lines\[1\]\.threshold: expected a number or \{file: calib.json\}"),
    (("threshold: {file: calib/line.json}", "threshold: {fil: calib/line.json}"),
     r"lines\[0\]\.threshold\.fil: unknown key"),
    (("fps: 25", "fps: -25"), r"lines\[1\]\.source\.fps: .*greater than 0 \(got -25\)"),
    (("id: line2", "id: cam-A_1"), r"lines: line id 'cam-A_1' is used by lines\[0\] and lines\[1\]"),
    (("id: line2", "id: 'line 2'"), r"lines\[1\]\.id: .*pattern"),
    (("reconnect_backoff_s: [0.25, 4]", "reconnect_backoff_s: [5, 1]"),
     r"lines\[0\]\.source\.reconnect_backoff_s: expected \[min, max\]"),
    (("reconnect_backoff_s: [0.25, 4]", "reconnect_backoff_s: [0.25, 4]\n      poll_ms: 0.1"),
     r"lines\[0\]\.source\.poll_ms: .*greater than or equal to 0\.5"),
    (("encoding: raw", "encoding: jpeg"), r"lines\[0\]\.heatmap\.encoding"),
    (('endpoint: "ipc:///tmp/x.sock"', 'endpoint: "localhost:5555"'), r"zmq\.endpoint: expected a ZeroMQ endpoint"),
    (("port: 0", "port: 70000"), r"metrics\.port: .*less than or equal to 65535"),
    (("log_level: DEBUG", "log_level: LOUD"), r"log_level: "),
    (("heartbeat_interval_s: 0.5", "heartbeat: 0.5"), r"heartbeat: unknown key"),
    (("features: {Gain: 1.5, ReverseX: true}", "features: {Gain: [1]}"), r"source\.features: feature 'Gain'"),
])
def test_bad_values_name_file_and_field(tmp_path: Path, edit: tuple[str, str], expected: str) -> None:
    old, new = edit
    assert old in FULL
    path = _write(tmp_path, FULL.replace(old, new, 1))
    msg = _error(path)
    assert msg.startswith(f"{path}: ")
    assert re.search(expected, msg), msg


def test_missing_required_fields(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, MINIMAL.replace("    threshold: 3.0\n", "")))
    assert r"lines[0].threshold: required field is missing" in msg
    msg = _error(_write(tmp_path, "zmq: {}\n"))
    assert "lines: required field is missing" in msg
    msg = _error(_write(tmp_path, "lines: []\n"))
    assert "lines: " in msg and "at least 1" in msg


def test_a_misspelt_required_key_is_named_with_the_key_it_should_be(tmp_path: Path) -> None:
    """`treshold:` makes `threshold` missing AND is an unknown key: the typo is the one problem to
    show (before: "threshold: required field is missing (and 1 more error)", the typo never named)."""
    msg = _error(_write(tmp_path, MINIMAL.replace("    threshold: 3.0\n", "    treshold: 3.0\n")))
    assert "lines[0].treshold: unknown key" in msg and "did you mean threshold?" in msg, msg
    assert "more error" not in msg, msg
    msg = _error(_write(tmp_path, MINIMAL.replace("    threshold: 3.0\n", "    treshold: 3.0\n").replace(
        "    bundle:", "    bundel:")))
    assert "lines[0].bundel: unknown key" in msg and "did you mean bundle?" in msg and "(and 1 more error)" in msg, msg


def test_several_errors_are_counted(tmp_path: Path) -> None:
    text = FULL.replace("queue_size: 2", "queue_size: 0").replace("fps: 25", "fps: 0")
    msg = _error(_write(tmp_path, text))
    assert "lines[0].queue_size" in msg and "(and 1 more error)" in msg


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "lines:\n  - id: a\n    source: {type: replay\n    bundle: x\n")
    msg = _error(path)
    assert msg.startswith(f"{path}: line ") and "YAML syntax error" in msg


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL + "    threshold: 4.0\n")
    msg = _error(path)
    assert "duplicate key 'threshold'" in msg and "line 6" in msg


def test_missing_empty_and_non_mapping_files(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope.yaml")
    assert "is empty" in _error(_write(tmp_path, ""))
    assert "is empty" in _error(_write(tmp_path, "# only a comment\n"))
    assert "not a mapping" in _error(_write(tmp_path, "- a\n- b\n"))
    assert "is a folder" in _error(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert "UTF-8" in _error(binary)


def test_two_lines_on_one_camera_rejected(tmp_path: Path) -> None:
    text = FULL.replace("source: {type: replay, path: video.mp4, fps: 25, loop: true}",
                        "source: {type: genicam, cti: producer.cti, device: {serial: \"0\"}}")
    msg = _error(_write(tmp_path, text))
    assert "use the same camera" in msg


def test_validate_paths(tmp_path: Path) -> None:
    path = _write(tmp_path, MINIMAL)
    assert "lines[0].bundle" in _error(path, validate_paths=True)
    (tmp_path / "bundle").mkdir()
    assert "not a bundle (no manifest.json)" in _error(path, validate_paths=True)
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    assert "lines[0].source.path" in _error(path, validate_paths=True)
    (tmp_path / "parts").mkdir()
    assert load_config(path, validate_paths=True).lines[0].id == "line1"
    cam = _write(tmp_path, MINIMAL.replace("{type: replay, path: parts}",
                                           "{type: genicam, cti: x.cti, device: {index: 0}}"), "cam.yaml")
    assert "lines[0].source.cti" in _error(cam, validate_paths=True)
    calib = _write(tmp_path, MINIMAL.replace("threshold: 3.0", "threshold: {file: c.json}"), "c.yaml")
    assert "lines[0].threshold.file" in _error(calib, validate_paths=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspectd.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def test_check_config_command(tmp_path: Path) -> None:
    good = _write(tmp_path, FULL)
    ok = _cli("check-config", "--skip-paths", str(good))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{good}: OK (2 lines: cam-A_1 (genicam), line2 (replay))"
    bad = _write(tmp_path, FULL.replace("latency_budget_ms: 35.5", "latency_budget_ms: -1"), "bad.yaml")
    res = _cli("check-config", str(bad))
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert lines[0].startswith(f"inspectd check-config: error: {bad}: lines[0].latency_budget_ms")
    missing = _cli("check-config", str(good))  # paths are checked by default
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_deploy_examples_are_valid() -> None:
    for name in ("lines.example.yaml", "lines.replay.yaml"):
        cfg = load_config(REPO / "deploy" / name)
        assert cfg.lines


def test_check_config_checks_paths_of_a_replay_line(tmp_path: Path, synthetic_parts) -> None:
    # A bundle folder is recognised by its manifest (load_bundle verifies it fully at daemon start;
    # training the shared tiny_bundle here would cost minutes for no extra check).
    tiny_bundle = tmp_path / "bundle"
    tiny_bundle.mkdir()
    (tiny_bundle / "manifest.json").write_text("{}")
    path = _write(tmp_path, f"""\
lines:
  - id: parts
    source: {{type: replay, path: "{synthetic_parts.test_good}", fps: 10, loop: true}}
    bundle: "{tiny_bundle}"
    backends: [onnxruntime]
    threshold: 3.0
""")
    res = _cli("check-config", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{path}: OK (1 line: parts (replay))"


# ---------------------------------------------------------------------------------------- backend options
@pytest.mark.parametrize("options, field, expected", [
    ("{onnxruntime: {thread: 2}}", "backend_options.onnxruntime.thread", "unknown key"),
    ("{onnxruntime: {intra_op_threads: -1}}", "backend_options.onnxruntime.intra_op_threads", "greater than or equal to 0"),
    ("{onnxruntime: {intra_op_threads: two}}", "backend_options.onnxruntime.intra_op_threads", "valid integer"),
    ("{onnxruntime: {device: gpu}}", "backend_options.onnxruntime.device", "'cpu' or 'cuda'"),
    ("{tensorrt: {precision: fp8}}", "backend_options.tensorrt.precision", "'fp32', 'fp16' or 'int8'"),
    ("{tensorrt: {build: true}}", "backend_options.tensorrt.build", "unknown key"),  # the daemon never builds
    ("{tensorrt: {max_batch: 0}}", "backend_options.tensorrt.max_batch", "greater than or equal to 1"),
    ("{torch: {device: gpu0}}", "backend_options.torch.device", "pattern"),
    ("{cuda: {}}", "backend_options.cuda", "unknown key"),
])
def test_backend_option_mistakes_name_file_and_field(tmp_path: Path, options: str, field: str, expected: str) -> None:
    text = FULL.replace("backends: [onnxruntime]", "backends: [tensorrt, onnxruntime, torch]").replace(
        "backend_options: {onnxruntime: {intra_op_threads: 1}}", f"backend_options: {options}")
    path = _write(tmp_path, text)
    msg = _error(path)
    assert msg.startswith(f"{path}: lines[0].{field}: "), msg
    assert expected in msg, msg


def test_backend_options_are_typed_and_passed_as_set(tmp_path: Path) -> None:
    text = FULL.replace("backends: [onnxruntime]", "backends: [tensorrt, onnxruntime]").replace(
        "backend_options: {onnxruntime: {intra_op_threads: 1}}",
        "backend_options: {onnxruntime: {intra_op_threads: 2}, tensorrt: {precision: int8, device: 1}}")
    opts = load_config(_write(tmp_path, text)).lines[0].backend_options
    # Only the options written reach the backend (None = the backend's own default).
    assert opts.as_dict() == {"onnxruntime": {"intra_op_threads": 2}, "tensorrt": {"precision": "int8", "device": 1}}
    assert dict(opts) == opts.as_dict()  # reads like the plain dict it replaced
    assert load_config(_write(tmp_path, MINIMAL, "min.yaml")).lines[0].backend_options.as_dict() == {}


def test_backend_option_schemas_match_what_the_backends_take() -> None:
    """Every typed option is a keyword argument of its backend class (ONNX Runtime's
    intra_op_threads, the name the daemon's thread sharing reads, may also be its `threads`)."""
    import importlib
    import inspect

    from inspectd.daemon.config import BackendOptions
    from inspectd.engines.runtime import BACKENDS

    renamed = {("onnxruntime", "intra_op_threads"): "threads"}
    assert set(BackendOptions.model_fields) == set(BACKENDS)
    for name, (module, cls_name) in BACKENDS.items():
        params = inspect.signature(getattr(importlib.import_module(module), cls_name).__init__).parameters
        model = BackendOptions.model_fields[name].annotation.__args__[0]
        for option in model.model_fields:
            assert option in params or renamed.get((name, option)) in params, f"{name}.{option} is not taken by {cls_name}"


def test_check_config_rejects_an_option_typo_and_warns_loudly_on_fail_open(tmp_path: Path) -> None:
    typo = _write(tmp_path, MINIMAL + "    backends: [onnxruntime]\n    backend_options: {onnxruntime: {thread: 2}}\n",
                  "typo.yaml")
    res = _cli("check-config", "--skip-paths", str(typo))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == (f"inspectd check-config: error: {typo}: lines[0].backend_options.onnxruntime.thread: "
                                  f"unknown key (not part of the schema; check the spelling)")

    fail_open = _write(tmp_path, MINIMAL + "    on_deadline_miss: OK\n", "open.yaml")
    res = _cli("check-config", "--skip-paths", str(fail_open))
    assert res.returncode == 0 and res.stdout.strip() == f"{fail_open}: OK (1 line: line1 (replay))"
    (warning,) = res.stderr.strip().splitlines()
    assert warning.startswith(f"WARNING: {fail_open}: lines[0].on_deadline_miss: OK FAILS OPEN on line line1")
    assert "PASSED UNINSPECTED" in warning
    quiet = _cli("check-config", "--skip-paths", str(_write(tmp_path, MINIMAL, "ng.yaml")))
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_public_endpoint_without_curve_warns(tmp_path: Path) -> None:
    from inspectd.daemon.config import config_warnings

    public = load_config(_write(tmp_path, 'zmq: {endpoint: "tcp://0.0.0.0:5555"}\n' + MINIMAL))
    (warning,) = config_warnings(public, "x.yaml")
    assert warning.startswith("x.yaml: zmq.endpoint: tcp://0.0.0.0:5555 is reachable from other machines without CURVE")
    assert config_warnings(load_config(_write(tmp_path, MINIMAL, "m.yaml")), "m.yaml") == []


def test_daemon_logs_the_fail_open_warning_at_start(tmp_path: Path) -> None:
    # A folder with a manifest passes the path checks; the daemon logs the warning, then refuses
    # the (fake) bundle: the warning is in the log before anything else can go wrong.
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    (tmp_path / "parts").mkdir()
    path = _write(tmp_path, MINIMAL + "    on_deadline_miss: OK\n")
    res = _cli("run", "--config", str(path))
    assert res.returncode != 0
    assert re.search(r"WARNING.*lines\[0\]\.on_deadline_miss: OK FAILS OPEN on line line1", res.stderr), res.stderr


def test_metrics_endpoint_defaults_come_from_the_config_schema() -> None:
    """Metrics.serve() without arguments binds what a config without `metrics:` binds."""
    import inspect

    from inspectd.daemon.config import MetricsConfig
    from inspectd.daemon.metrics import Metrics
    from inspectd.errors import InspectdError

    params = inspect.signature(Metrics.serve).parameters
    assert params["host"].default is None and params["port"].default is None  # no second set of defaults
    schema = MetricsConfig()
    try:
        server = Metrics().serve()
    except InspectdError as exc:  # another test holds the default port right now
        pytest.skip(f"default metrics port busy: {exc}")
    try:
        assert (server.host, server.port) == (schema.host, schema.port) == ("127.0.0.1", 9108)
    finally:
        server.shutdown()


def test_trigger_mode_is_exported_for_the_no_frames_alert(tmp_path: Path, tiny_bundle: Path) -> None:
    """inspectd_source_triggered (used by the InspectdNoFrames alert) follows the line's trigger mode."""
    import genicam

    from inspectd.daemon.config import config_from_dict
    from inspectd.daemon.run import Daemon

    cti = Path(genicam.__file__).parent / "viky.cti"
    if not cti.is_file():
        pytest.skip("genicam wheel without viky.cti")

    def line(line_id: str, index: int, mode: str) -> dict:
        return {"id": line_id, "source": {"type": "genicam", "cti": str(cti), "device": {"index": index},
                                          "trigger": {"mode": mode}},
                "bundle": str(tiny_bundle), "backends": ["onnxruntime"], "threshold": 5.0}

    config = config_from_dict({"zmq": {"endpoint": f"ipc://{tmp_path}/t.sock"}, "metrics": {"port": 0},
                               "state_dir": str(tmp_path / "state"),  # never the machine's /var/lib/inspectd
                               "lines": [line("trig", 0, "On"), line("free", 1, "Off")]})
    daemon = Daemon(config)
    daemon.build()  # no camera is opened before start()
    try:
        value = daemon.metrics.registry.get_sample_value
        assert value("inspectd_source_triggered", {"line": "trig"}) == 1
        assert value("inspectd_source_triggered", {"line": "free"}) == 0
    finally:
        daemon.stop(budget_s=1.0)


def test_check_config_reads_the_threshold_file(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    (tmp_path / "parts").mkdir()
    path = _write(tmp_path, MINIMAL.replace("threshold: 3.0", "threshold: {file: line1.threshold.json}"))
    calib = tmp_path / "line1.threshold.json"
    for content, expected in (("{broken", "unreadable threshold file"), ('{"thresh": 3}', 'no "threshold" field'),
                              ('{"threshold": "high"}', "is not a finite number"),
                              ('{"threshold": 1' + '0' * 400 + '}', "is not a finite number")):  # no float holds it
        calib.write_text(content)
        msg = _error(path, validate_paths=True)
        assert msg.startswith(f"{path}: lines[0].threshold.file: {calib}: ") and expected in msg, msg
    calib.write_text('{"threshold": 4.5}')
    assert load_config(path, validate_paths=True).lines[0].threshold.file == calib


@pytest.mark.parametrize("where", ["line", "recipe"])
def test_check_config_refuses_a_threshold_file_calibrated_for_another_bundle(tmp_path: Path, tiny_bundle: Path,
                                                                             where: str) -> None:
    """What `inspectd run` refuses at start, `check-config` (install.sh's gate) must refuse too: a
    threshold file whose bundle_id is not the bundle it would judge from the start (the bundle was
    updated, the file kept) — the line's own, or the recipe its config starts with. A recipe that
    only waits is refused when it is asked for (the daemon runs the other recipes meanwhile)."""
    from inspectd.engines.bundle import load_bundle

    own = load_bundle(tiny_bundle).bundle_id
    (tmp_path / "parts").mkdir()
    (tmp_path / "old.json").write_text(json.dumps({"threshold": 3.0, "bundle_id": "0123456789ab"}))
    line = {"id": "line1", "source": {"type": "replay", "path": "parts"}, "bundle": str(tiny_bundle),
            "threshold": 3.0}
    recipe = {"name": "B", "bundle": str(tiny_bundle), "threshold": {"file": "old.json"}}
    if where == "line":
        line["threshold"], field = {"file": "old.json"}, "lines[0].threshold.file"
    else:
        line["recipes"], line["recipe"], field = [recipe], "B", "lines[0].recipes[0].threshold.file"
    path = _write(tmp_path, yaml.safe_dump({"lines": [line]}))
    msg = _error(path, validate_paths=True)
    assert msg.startswith(f"{path}: {field}: ") and "0123456789ab" in msg and own in msg, msg
    if where == "recipe":  # the same recipe waiting, not started with: accepted here, refused when asked for
        del line["recipe"]
        load_config(_write(tmp_path, yaml.safe_dump({"lines": [line]})), validate_paths=True)


def test_a_threshold_no_float_can_hold_is_a_config_error(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, MINIMAL.replace("threshold: 3.0", "threshold: 1" + "0" * 400)))
    assert msg.startswith(f"{tmp_path / 'lines.yaml'}: lines[0].threshold: "), msg


RECIPE_AND_SHADOW = MINIMAL + """\
    recipes:
      - {name: A, bundle: b, threshold: THRESHOLD_A}
    shadow: {bundle: cand, threshold: THRESHOLD_S}
"""


@pytest.mark.parametrize("where, field", [("A", "lines[0].recipes[0].threshold"), ("S", "lines[0].shadow.threshold")])
@pytest.mark.parametrize("spec, expected", [
    ("{fil: x.json}", ".fil: unknown key"),                    # the typo itself, not "valid number"
    ("{}", ".file: required field is missing"),
    ("{file: x.json, fil: y.json}", ".fil: unknown key"),
    ("{file: [1]}", ".file: "),
    ("high", ": expected a number or {file: calib.json}"),
])
def test_a_threshold_mistake_in_a_recipe_or_shadow_names_the_key_like_on_the_line(
        tmp_path: Path, where: str, field: str, spec: str, expected: str) -> None:
    """Recipes and shadows hold the same number-or-{file:} threshold as the line: a mistake there
    names the key the operator wrote (never pydantic's union member `float`) and counts as one error."""
    text = RECIPE_AND_SHADOW.replace(f"THRESHOLD_{where}", spec).replace("THRESHOLD_A", "1.0").replace(
        "THRESHOLD_S", "1.0")
    path = _write(tmp_path, text)
    msg = _error(path)
    assert msg.startswith(f"{path}: {field}{expected}"), msg
    assert "float" not in msg and "ThresholdFile" not in msg and "more error" not in msg, msg
    # Another mistake elsewhere is counted once, however many union members the threshold failed.
    msg = _error(_write(tmp_path, text.replace("threshold: 3.0", "threshold: 3.0\n    queue_size: 0")))
    assert "(and 1 more error)" in msg and "float" not in msg, msg


def test_union_member_tags_are_never_part_of_a_field_path(tmp_path: Path) -> None:
    """The source's member (`genicam`) and the threshold's (`float`, `ThresholdFile`) are pydantic's
    names, not keys in the file; keys that happen to be spelt like them still show."""
    from inspectd.daemon.config import config_from_dict

    line = {"id": "l1", "source": {"type": "genicam", "cti": "x.cti", "device": {"index": 0}, "float": 1},
            "bundle": "b", "threshold": 1.0,
            "recipes": [{"name": "A", "bundle": "b", "threshold": {"file": "a.json", "float": 2}}]}
    with pytest.raises(ConfigError) as info:
        config_from_dict({"lines": [line]}, source="lines.yaml")
    assert str(info.value) == ("lines.yaml: lines[0].source.float: unknown key (not part of the schema; check the "
                               "spelling) (and 1 more error)")
    del line["source"]["float"]
    with pytest.raises(ConfigError) as info:
        config_from_dict({"lines": [line]}, source="lines.yaml")
    assert str(info.value).startswith("lines.yaml: lines[0].recipes[0].threshold.float: unknown key"), info.value


def _camera_line(bundle: Path, **source: object) -> dict:
    """A line on the GenTL simulator camera (the genicam wheel's viky.cti) with `source` keys added."""
    import genicam

    cti = Path(genicam.__file__).parent / "viky.cti"
    return {"id": "cam1", "bundle": str(bundle), "threshold": 5.0,
            "source": {"type": "genicam", "cti": str(cti), "device": {"index": 0}, **source}}


def _check_config_error(cfg: Path, line: dict) -> str:
    """check-config on a config of this one line: refused (exit 2) with one line, returned."""
    cfg.write_text(yaml.safe_dump({"lines": [line]}))
    res = _cli("check-config", str(cfg))
    said = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(said) == 1, res.stderr
    return said[0]


def test_check_config_refuses_a_camera_width_or_height_other_than_the_frames_the_bundle_learned(
        tmp_path: Path, tiny_camera_bundle: Path) -> None:
    """The bundle learned 400x400 frames: a camera told to deliver 320 px wide ones would have every
    frame refused at run time (fail-safe verdicts); check-config and the daemon say so before the start."""
    cfg = tmp_path / "lines.yaml"
    line = _camera_line(tiny_camera_bundle, features={"Width": 320})
    assert _check_config_error(cfg, line) == (
        f"inspectd check-config: error: {cfg}: lines[0].source.features.Width: 320, but the bundle "
        f"{tiny_camera_bundle} was trained on 400x400 frames: every frame would get the fail-safe "
        f"verdict; set Width: 400 or train on frames of this size")
    line["source"]["features"] = {"Width": 400, "Height": 400, "AcquisitionFrameRate": 20.0}
    cfg.write_text(yaml.safe_dump({"lines": [line]}))
    assert _cli("check-config", str(cfg)).returncode == 0


def test_check_config_refuses_a_mono_pixel_format_for_a_bundle_trained_on_colour(
        tmp_path: Path, synthetic_parts) -> None:
    """Mono8 frames to a bundle trained on colour ones would all get the fail-safe verdict at run time
    (preprocess.convert_color): check-config and the daemon say so before the start, for the source's
    pixel_format and for a PixelFormat feature alike."""
    from tests.helpers import train_colour_bundle

    train_colour_bundle(synthetic_parts.test_good, tmp_path / "rgb")
    cfg = tmp_path / "lines.yaml"
    for key, source in (("pixel_format", {"pixel_format": "Mono8"}),
                        ("features.PixelFormat", {"features": {"PixelFormat": "Mono8"}})):
        assert _check_config_error(cfg, _camera_line(tmp_path / "rgb", **source)) == (
            f"inspectd check-config: error: {cfg}: lines[0].source.{key}: Mono8, but the bundle "
            f"{tmp_path / 'rgb'} was trained on colour frames: every frame would get the fail-safe "
            f"verdict; set a colour pixel format or train on mono frames")
