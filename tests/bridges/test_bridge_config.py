"""Bridge configs: every problem is one line naming the file and the field (exit 2 from the CLI);
the status record says offline / blind / engine_failed; verdict headers carry chunks and the camera
timestamp, and the GenTL simulator's real chunk data (viky.cti: NrBounces) passes through."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import genicam
import pytest
import yaml

from inspectd.bridges.common import load_settings, status_payload, subscribe_endpoint
from inspectd.client import LineStatus, line_status_from_heartbeat
from inspectd.daemon.config import config_from_dict
from inspectd.daemon.frame import Verdict
from inspectd.daemon.publish import verdict_header
from inspectd.errors import ConfigError
from tests.bridges.conftest import BRIDGE

CTI = Path(genicam.__file__).parent / "viky.cti"


def _config(tmp_path: Path, bridges: Any, **top: Any) -> Path:
    raw = {"zmq": {"endpoint": "tcp://127.0.0.1:5555"},
           "lines": [{"id": "line1", "source": {"type": "replay", "path": str(tmp_path)}, "bundle": str(tmp_path),
                      "threshold": 3.0}], **top}
    if bridges is not None:
        raw["bridges"] = bridges
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


CASES = {
    "bridges.mqtt.hots": {"mqtt": {"hots": "broker"}},
    "bridges.mqtt.qos": {"mqtt": {"qos": 3}},
    "bridges.mqtt.topic_prefix": {"mqtt": {"topic_prefix": "inspectd/#"}},
    "bridges.mqtt.tls": {"mqtt": {"tls": {"cert": "client.pem"}}},
    "bridges.mqtt.password": {"mqtt": {"username": "u", "password": "inline"}},
    "bridges.opcua.endpoint": {"opcua": {"endpoint": "http://127.0.0.1:4840"}},
    "bridges.opcua.set_recipe_timeout_s": {"opcua": {"set_recipe_timeout_s": 0.5}},
    "bridges.opcua.security.private_key": {"opcua": {"security": {"certificate": "s.pem",
                                                                  "trusted_clients_dir": "."}}},
    "bridges.opcua.security.policy": {"opcua": {"security": {"policy": "Basic128Rsa15", "certificate": "s.pem",
                                                             "private_key": "k.pem", "trusted_clients_dir": "."}}},
    "bridges.stale_after_s": {"stale_after_s": 0, "mqtt": {}},
    "bridges.mqtt": {"opcua": {}},                       # the mqtt bridge with no mqtt section
}


@pytest.mark.parametrize("field", CASES)
def test_bad_bridge_config_is_one_line_naming_field_and_file(tmp_path: Path, field: str) -> None:
    path = _config(tmp_path, CASES[field])
    kind = "opcua" if field.startswith("bridges.opcua") else "mqtt"
    with pytest.raises(ConfigError) as err:
        load_settings(path, kind)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and field in msg, msg


def test_curve_needs_bridge_keys_and_private_password_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    from inspectd.keys import generate
    generate(keys, "server")
    path = _config(tmp_path, {"mqtt": {}}, zmq={"endpoint": "tcp://0.0.0.0:5555",
                                                 "curve": {"server_secret_key_file": str(keys / "server.key_secret")}})
    with pytest.raises(ConfigError, match=r"bridges\.curve: required because zmq\.curve is set"):
        load_settings(path, "mqtt")
    generate(keys, "bridge")
    raw = yaml.safe_load(path.read_text())
    raw["bridges"]["curve"] = {"client_secret_key_file": str(keys / "bridge.key_secret")}
    path.write_text(yaml.safe_dump(raw))
    settings = load_settings(path, "mqtt")
    assert settings.curve is not None and settings.endpoint == "tcp://127.0.0.1:5555"  # wildcard bind -> loopback
    assert settings.stale_after_s == 2.0   # 2 heartbeat intervals by default

    from inspectd.bridges.mqtt import read_password_file
    pw = tmp_path / "mqtt.password"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by group/others"):
        read_password_file(pw, "x.yaml")
    pw.chmod(0o600)
    assert read_password_file(pw, "x.yaml") == "secret"


def test_cli_exit_2_with_one_line(tmp_path: Path) -> None:
    path = _config(tmp_path, {"mqtt": {"hots": "x"}})
    proc = subprocess.run(BRIDGE + ["mqtt", "--config", str(path)], capture_output=True, text=True, timeout=60)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("inspectd bridge: error:") and "bridges.mqtt.hots" in err[0] and str(path) in err[0]


def test_status_record_for_blind_engine_failed_and_lost_heartbeat() -> None:
    """Crafted heartbeat status dicts (what the daemon sends) through the client's own parser."""
    ok = status_payload(line_status_from_heartbeat("l", {"state": "ok", "camera_connected": True,
                                                         "engine_ready": True}))
    assert ok["status"] == "ok" and ok["healthy"] and ok["online"]
    blind = status_payload(line_status_from_heartbeat("l", {"state": "blind", "camera_connected": False,
                                                            "engine_ready": True}))
    assert blind["status"] == "blind" and not blind["healthy"] and blind["reason"] == "camera lost"
    failed = status_payload(line_status_from_heartbeat("l", {"state": "engine_failed", "failed": "boom"}))
    assert failed["status"] == "engine_failed" and not failed["healthy"]
    lost = status_payload(LineStatus("l", state="ok", camera_connected=True, engine_ready=True, heartbeat=False,
                                     heartbeat_seen=True))
    assert lost["status"] == "offline" and not lost["healthy"] and lost["reason"] == "heartbeat lost"
    # nothing is known of a line whose daemon is silent: not its last state, camera or engine (a PLC
    # reading those fields instead of `healthy` saw a working line after the daemon died)
    assert (lost["state"], lost["camera_connected"], lost["engine_ready"]) == ("unknown", None, None), lost


def test_subscribe_endpoint_defaults() -> None:
    base = {"lines": [{"id": "l", "source": {"type": "replay", "path": "/x"}, "bundle": "/x", "threshold": 1}]}
    assert subscribe_endpoint(config_from_dict({**base, "zmq": {"endpoint": "ipc:///run/x.sock"}})) == "ipc:///run/x.sock"
    assert subscribe_endpoint(config_from_dict({**base, "bridges": {"endpoint": "tcp://10.0.0.1:1"}})) == \
        "tcp://10.0.0.1:1"


def test_verdict_header_carries_camera_timestamp_and_chunks() -> None:
    v = Verdict(line="l", frame_id=7, acquired_ns=1, verdict="OK", score=0.1, raw_score=0.1, threshold=3.0,
                latency_ms=1.0, deadline_missed=False, backend="onnxruntime", bundle_id="b",
                meta={"camera_timestamp": 123456789, "chunks": {"EncoderValue": 4242, "Missing": None}})
    h = verdict_header(v, "verdict.l", 0, 2, 3)
    assert h["frame_id"] == 7 and h["camera_timestamp"] == 123456789
    assert h["chunks"] == {"EncoderValue": 4242, "Missing": None}
    bare = verdict_header(Verdict(line="l", frame_id=1, acquired_ns=1, verdict="OK", score=0.0, raw_score=0.0,
                                  threshold=3.0, latency_ms=1.0, deadline_missed=False, backend="x", bundle_id="b"),
                          "verdict.l", 0, 2, 3)
    assert bare["chunks"] == {} and bare["camera_timestamp"] is None


def test_genicam_chunks_from_the_simulator(caplog: pytest.LogCaptureFixture) -> None:
    """viky.cti offers chunk data (ChunkSelector: NrBounces, Scan3dData): NrBounces is read from each
    buffer's chunk data; EncoderValue, which it lacks, is null with exactly one warning."""
    from inspectd.daemon.sources.genicam import GenicamSource

    source = GenicamSource("line1", CTI, {"index": 0})
    source.chunk_names = ("NrBounces", "EncoderValue")
    with caplog.at_level(logging.WARNING):
        with source:
            frames = [source.read(3.0) for _ in range(3)]
    frames = [f for f in frames if f is not None]
    assert len(frames) >= 2
    for f in frames:
        assert set(f.meta["chunks"]) == {"NrBounces", "EncoderValue"}
        assert isinstance(f.meta["chunks"]["NrBounces"], int) and f.meta["chunks"]["EncoderValue"] is None
        assert "camera_timestamp" in f.meta   # None: the simulator keeps no buffer timestamps
    warnings = [r for r in caplog.records if "EncoderValue" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
