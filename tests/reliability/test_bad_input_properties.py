"""Property-based bad input (hypothesis, bounded): arbitrary YAML/JSON and mutations of valid
files given to the config loader and to the bundle manifest loader always end in ConfigError /
BundleError with a one-line message (or, for a harmless mutation, a valid result) -- never another
exception. At the CLI, `inspectd check-config` exits 2 without a traceback."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspectd.daemon.config import DaemonConfig, config_from_dict, load_config
from inspectd.engines.bundle import MANIFEST, Bundle, load_bundle
from inspectd.errors import BundleError, ConfigError

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)

VALID: dict[str, Any] = {
    "zmq": {"endpoint": "tcp://127.0.0.1:5555", "sndhwm": 1000, "linger_ms": 0, "curve": None},
    "metrics": {"host": "127.0.0.1", "port": 9108},
    "heartbeat_interval_s": 1.0,
    "log_level": "INFO",
    "lines": [
        {"id": "press1", "bundle": "/b1", "threshold": 3.0, "latency_budget_ms": 50, "on_deadline_miss": "NG",
         "backends": ["tensorrt", "onnxruntime"], "roi": [0, 0, 64, 64], "queue_size": 4,
         "heatmap": {"publish": "ng", "width": 64, "height": 64, "encoding": "png"},
         "archive": {"enabled": True, "dir": "/tmp/a", "quota_mb": 10, "save": "ng"},
         "source": {"type": "genicam", "cti": "/x.cti", "device": {"serial": "2"}, "pixel_format": "Mono8",
                    "trigger": {"mode": "On", "source": "Line0"}, "features": {"Gain": 2.0},
                    "reconnect_backoff_s": [0.5, 10.0]}},
        {"id": "press2", "bundle": "/b2", "threshold": {"file": "/c.json"},
         "source": {"type": "replay", "path": "/imgs", "fps": 10, "loop": True}},
    ],
}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path inside a nested dict/list."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@st.composite
def mutated(draw: Any, base: dict) -> Any:
    """A valid document with 1-3 mutations: replace a value, delete a key/item, add an unknown key."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths or not isinstance(doc, dict):
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        kind = draw(st.sampled_from(["replace", "delete", "add"]))
        if kind == "replace":
            parent[path[-1]] = draw(json_values)
        elif kind == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    return doc


def _one_clear_line(exc: Exception) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


def _check_config(raw: Any) -> None:
    try:
        cfg = config_from_dict(raw, source="prop.yaml")
    except ConfigError as exc:
        _one_clear_line(exc)
        return
    assert isinstance(cfg, DaemonConfig)  # accepted: a complete, frozen config, never a partial one


def test_valid_document_is_valid() -> None:
    assert config_from_dict(copy.deepcopy(VALID)).lines[1].id == "press2"


@SETTINGS
@given(json_values)
def test_arbitrary_json_values_give_config_error(raw: Any) -> None:
    _check_config(raw)


@SETTINGS
@given(mutated(VALID))
def test_mutated_valid_config_gives_config_error_or_a_valid_config(raw: Any) -> None:
    _check_config(raw)


@SETTINGS
@given(st.one_of(st.text(max_size=300), mutated(VALID).map(lambda d: yaml.safe_dump(d)),
                 st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_yaml_text_through_load_config(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lines.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path, validate_paths=True)
        except ConfigError as exc:
            _one_clear_line(exc)


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_through_load_config(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lines.yaml"
        path.write_bytes(data)
        try:
            load_config(path)
        except ConfigError as exc:
            _one_clear_line(exc)


# ---- bundle manifest ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work_bundle(toy_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("prop") / "toy"
    shutil.copytree(toy_path, dst)
    return dst


def _check_bundle(path: Path, manifest_text: str | bytes) -> None:
    target = path / MANIFEST
    original = target.read_bytes()
    try:
        target.write_bytes(manifest_text if isinstance(manifest_text, bytes) else
                           manifest_text.encode("utf-8", "surrogatepass"))
        try:
            bundle = load_bundle(path)
        except BundleError as exc:
            _one_clear_line(exc)
            return
        assert isinstance(bundle, Bundle)
        # Accepted: the parts the daemon reads at start must work too.
        spec = bundle.input_spec
        assert spec.height > 0 and spec.width > 0 and all(d > 0 for d in bundle.map_shape)
    finally:
        target.write_bytes(original)


@SETTINGS
@given(data=st.data())
def test_mutated_manifest_gives_bundle_error(work_bundle: Path, data: st.DataObject) -> None:
    base = json.loads((work_bundle / MANIFEST).read_text())
    doc = data.draw(mutated(base))
    _check_bundle(work_bundle, json.dumps(doc, allow_nan=True))


@SETTINGS
@given(st.one_of(json_values.map(lambda v: json.dumps(v, allow_nan=True)), st.binary(max_size=200)))
def test_arbitrary_manifest_gives_bundle_error(work_bundle: Path, text: str | bytes) -> None:
    _check_bundle(work_bundle, text)


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", ".", "a\x00b", "x" * 5000,
                                   "golden/../../outside", "golden/" + "y" * 300 + "/z"])
def test_hostile_file_entries_in_manifest(work_bundle: Path, entry: str) -> None:
    doc = json.loads((work_bundle / MANIFEST).read_text())
    doc["files"][entry] = "0" * 64
    with pytest.raises(BundleError) as err:
        _check_bundle_raising(work_bundle, json.dumps(doc))
    _one_clear_line(err.value)


def _check_bundle_raising(path: Path, text: str) -> None:
    target = path / MANIFEST
    original = target.read_bytes()
    try:
        target.write_text(text)
        load_bundle(path)
    finally:
        target.write_bytes(original)


# ---- CLI: a handful of real subprocess runs ---------------------------------------------------

CLI_CASES = {
    "empty": "",
    "list": "- 1\n- 2\n",
    "syntax": "zmq: {endpoint: [\n",
    "tabs": "lines:\n\t- id: x\n",
    "unknown_key": yaml.safe_dump(dict(VALID, latency_budget=5)),
    "bad_value": yaml.safe_dump(dict(VALID, heartbeat_interval_s=float("nan"))),
    "binary": "\x00\x01\x02garbage",
    "duplicate": "log_level: INFO\nlog_level: DEBUG\n",
}


@pytest.mark.parametrize("name", sorted(CLI_CASES))
def test_check_config_cli_exits_2_without_traceback(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(CLI_CASES[name])
    proc = subprocess.run([sys.executable, "-m", "inspectd", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("inspectd check-config: error: ") and str(path) in lines[0]


def test_odd_keys_keep_errors_on_one_line(work_bundle: Path) -> None:
    """Regression (found by the properties above): keys with newlines made multi-line errors."""
    for key in ("a\nb", "", " spaced key "):
        with pytest.raises(ConfigError) as err:
            config_from_dict(dict(copy.deepcopy(VALID), **{key: 1}))
        _one_clear_line(err.value)
        doc = json.loads((work_bundle / MANIFEST).read_text())
        doc["flow"][key] = 1
        with pytest.raises(BundleError) as berr:
            _check_bundle_raising(work_bundle, json.dumps(doc))
        _one_clear_line(berr.value)
        assert repr(key) in str(berr.value)
