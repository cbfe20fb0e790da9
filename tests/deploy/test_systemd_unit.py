"""deploy/systemd/inspectd@.service: verified by the real systemd-analyze, and held to the
daemon's contract (Type=notify, stop budget, SIGHUP reload, hardening that keeps devices)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from inspectd.daemon.run import STOP_BUDGET_S
from tests.deploy.deployfiles import UNIT

INSTANCE = "inspectd@line1.service"


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        reason = "systemd-analyze not installed (apt-get install systemd; see .ci/apt-packages)"
        print(reason)
        pytest.skip(reason)
    return tool


def _inspectd_script() -> str:
    script = shutil.which("inspectd")
    if script is None:
        pytest.fail("the inspectd console script is not on PATH (pip install -e .)")
    return script


def _unit_copy(tmp_path: Path, extra: str = "") -> Path:
    """The unit in tmp_path with ExecStart on the real console script (verify needs it to exist)."""
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/usr/local/bin/inspectd " in text
    text = text.replace("ExecStart=/usr/local/bin/inspectd ", f"ExecStart={_inspectd_script()} ")
    if extra:
        text = text.replace("[Service]\n", "[Service]\n" + extra + "\n", 1)
    path = tmp_path / "inspectd@.service"
    path.write_text(text, encoding="utf-8")
    return path


def _verify(tool: str, unit_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, "verify", "--man=no", str(unit_dir / INSTANCE)], cwd=unit_dir,
                          capture_output=True, text=True, timeout=60)


def _unit_settings() -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values in order]}}; systemd allows repeated keys."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        if current is None:
            raise configparser.Error(f"{UNIT}: setting outside a section: {line}")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    _unit_copy(tmp_path)
    result = _verify(tool, tmp_path)
    out = (result.stdout + result.stderr).strip()
    # Unknown keys and bad values are only warnings (exit 0): any output at all is a failure.
    assert result.returncode == 0 and out == "", out


def test_verify_reports_a_bad_setting(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key shows up in systemd-analyze's output."""
    tool = _systemd_analyze()
    _unit_copy(tmp_path, extra="WatchdogSecs=30")
    result = _verify(tool, tmp_path)
    assert "Unknown key" in result.stdout + result.stderr


def test_unit_hardening_exposure_is_low(tmp_path: Path) -> None:
    tool = _systemd_analyze()
    _unit_copy(tmp_path)
    result = subprocess.run([tool, "security", "--offline=true", "--no-pager", "--threshold=30",
                             str(tmp_path / INSTANCE)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    # Exit status != 0 when the exposure score is above 3.0 (systemd's scale: 0 safe .. 10 unsafe).
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


def test_unit_matches_the_daemon_contract() -> None:
    s = _unit_settings()
    unit, service, install = s["Unit"], s["Service"], s["Install"]

    assert service["Type"] == ["notify"]               # daemon sends READY=1 after warm-up
    assert int(service["WatchdogSec"][0]) >= 10        # daemon pings at half of it while healthy
    assert service["Restart"] == ["on-failure"]
    assert int(unit["StartLimitBurst"][0]) >= 2 and int(unit["StartLimitIntervalSec"][0]) > 0
    # The daemon stops within STOP_BUDGET_S on SIGTERM; systemd must not SIGKILL it before.
    assert float(service["TimeoutStopSec"][0]) >= STOP_BUDGET_S + 5
    assert service["ExecStart"] == ["/usr/local/bin/inspectd run --config /etc/inspectd/%i.yaml"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]   # SIGHUP = reload thresholds
    assert service["EnvironmentFile"] == ["-/etc/inspectd/%i.env"]
    # The line before an operator's tools on the same PC (RESULTS.md §23), within what nice allows.
    assert -20 <= int(service["Nice"][0]) < 0

    assert service["User"] == ["inspectd"]
    assert set(service["SupplementaryGroups"][0].split()) >= {"video", "plugdev"}
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert "/var/lib/inspectd" in " ".join(service["ReadWritePaths"]).split()
    for key in ("PrivateTmp", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
                "ProtectKernelLogs", "ProtectControlGroups"):
        assert service[key] == ["yes"], key
    families = set(service["RestrictAddressFamilies"][0].split())
    assert families >= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    # A private /dev would hide GPUs and USB3 Vision cameras.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    allowed = " ".join(service["DeviceAllow"])
    for device in ("char-nvidia*", "char-nvhost*", "/dev/nvmap", "char-usb_device"):
        assert device in allowed, device
    assert install["WantedBy"] == ["multi-user.target"]
