"""deploy/install.sh: syntax, shellcheck, and what it would do (--dry-run prints every command)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.deployfiles import INSTALL_SH, REPO


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL_SH), *args], capture_output=True, text=True, timeout=60)


def _needs_systemctl() -> None:
    if shutil.which("systemctl") is None:
        reason = "systemctl not installed (the installer refuses non-systemd machines)"
        print(reason)
        pytest.skip(reason)


def test_install_script_syntax() -> None:
    result = subprocess.run(["bash", "-n", str(INSTALL_SH)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_install_script_shellcheck() -> None:
    tool = shutil.which("shellcheck")
    if tool is None:
        reason = "shellcheck not installed (apt-get install shellcheck)"
        print(reason)
        pytest.skip(reason)
    result = subprocess.run([tool, "--severity=style", str(INSTALL_SH)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout


def test_dry_run_plans_the_whole_install_and_changes_nothing() -> None:
    _needs_systemctl()
    unit_target = Path("/etc/systemd/system/inspectd@.service")
    existed = unit_target.exists()
    result = _run("--dry-run", "--line", "press1")
    assert result.returncode == 0, result.stderr
    planned = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    text = "\n".join(planned)
    assert "usermod --append --groups video\\,plugdev inspectd" in planned
    assert "install -d -o inspectd -g inspectd -m 0750 /var/lib/inspectd" in planned
    assert "install -d -o root -g inspectd -m 0750 /etc/inspectd" in planned
    assert "python3 -m venv /opt/inspectd/venv" in planned          # no --jetson: isolated venv
    # The bridge units are installed with the daemon's: their libraries come with it (a bridge unit
    # without paho-mqtt / asyncua restart-looped every 2 s for good).
    assert f"/opt/inspectd/venv/bin/python -m pip install --upgrade {REPO}\\[bridges\\]" in planned
    assert "ln -sfn /opt/inspectd/venv/bin/inspectd /usr/local/bin/inspectd" in planned
    assert (f"install -m 0644 {REPO}/deploy/systemd/inspectd@.service "
            "/etc/systemd/system/inspectd@.service") in planned
    # Order matters: unit installed, systemd reloaded, config checked, then the line enabled.
    reload_at = planned.index("systemctl daemon-reload")
    check_at = planned.index("runuser -u inspectd -- /usr/local/bin/inspectd check-config "
                             "/etc/inspectd/press1.yaml")
    enable_at = planned.index("systemctl enable --now inspectd@press1.service")
    assert reload_at < check_at < enable_at
    # An upgrade restarts what runs the old code (enable --now starts only what is stopped).
    restart = ("systemctl try-restart inspectd@\\*.service inspectd-bridge-mqtt@\\*.service "
               "inspectd-bridge-opcua@\\*.service")
    assert planned.index(f"/opt/inspectd/venv/bin/python -m pip install --upgrade {REPO}\\[bridges\\]") \
        < reload_at < planned.index(restart) < check_at
    assert "useradd" in text or subprocess.run(["id", "-u", "inspectd"], capture_output=True).returncode == 0
    assert unit_target.exists() == existed


def test_dry_run_jetson_venv_sees_system_packages() -> None:
    _needs_systemctl()
    result = _run("--dry-run", "--jetson", "--extras", "report")
    assert result.returncode == 0, result.stderr
    planned = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert "python3 -m venv --system-site-packages /opt/inspectd/venv" in planned
    assert f"/opt/inspectd/venv/bin/python -m pip install --upgrade {REPO}\\[bridges\\,report\\]" in planned
    assert not any(line.startswith("systemctl enable") for line in planned)


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown option: --frobnicate"),
    (["--line", "press 1"], "--line press 1: use letters, digits"),
    (["--line"], "--line needs a value"),
    (["--src", "/nonexistent"], "/nonexistent is not an inspectd checkout"),
])
def test_bad_arguments_give_one_clear_error(args: list[str], message: str) -> None:
    result = _run("--dry-run", *args)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
