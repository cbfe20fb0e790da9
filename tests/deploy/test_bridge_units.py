"""deploy/systemd/inspectd-bridge-{mqtt,opcua}@.service: verified by the real systemd-analyze
(verify and security), and held to the bridge's contract (restart forever, the right command)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy.deployfiles import DEPLOY
from tests.deploy.test_systemd_unit import _inspectd_script, _systemd_analyze

KINDS = ("mqtt", "opcua")


def _unit(kind: str) -> Path:
    return DEPLOY / "systemd" / f"inspectd-bridge-{kind}@.service"


def _copy(tmp_path: Path, kind: str) -> Path:
    text = _unit(kind).read_text(encoding="utf-8")
    assert "ExecStart=/usr/local/bin/inspectd " in text
    (tmp_path / f"inspectd-bridge-{kind}@.service").write_text(
        text.replace("ExecStart=/usr/local/bin/inspectd ", f"ExecStart={_inspectd_script()} "), encoding="utf-8")
    return tmp_path / f"inspectd-bridge-{kind}@line1.service"


@pytest.mark.parametrize("kind", KINDS)
def test_bridge_unit_verifies_and_is_hardened(tmp_path: Path, kind: str) -> None:
    tool = _systemd_analyze()
    instance = _copy(tmp_path, kind)
    verify = subprocess.run([tool, "verify", "--man=no", str(instance)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    out = (verify.stdout + verify.stderr).strip()
    assert verify.returncode == 0 and out == "", out
    security = subprocess.run([tool, "security", "--offline=true", "--no-pager", "--threshold=20", str(instance)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_bridge_unit_contract(kind: str) -> None:
    settings: dict[str, list[str]] = {}
    for raw in _unit(kind).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    assert settings["ExecStart"] == [f"/usr/local/bin/inspectd bridge {kind} --config /etc/inspectd/%i.yaml"]
    assert settings["Type"] == ["simple"] and settings["Restart"] == ["always"]
    assert settings["StartLimitIntervalSec"] == ["0"]
    assert settings["User"] == ["inspectd"] and settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"] and "ReadWritePaths" not in settings
