"""`inspectd keys --owner USER[:GROUP]`: key files made by root end up readable by the service
user (checked by loading the secret key as that user in a real child process), and a wrong owner
is a one-line error before anything is written."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

INSPECTD = [sys.executable, "-m", "inspectd"]
SERVICE_USER = "nobody"  # stands in for the `inspectd` service user: exists everywhere, unprivileged

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.fixture()
def world_dir() -> Iterator[Path]:
    # pytest's tmp_path is 0700 root: the service user could not even reach a file in it.
    folder = Path(tempfile.mkdtemp(prefix="inspectd-keys-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _keys(*args: str, user: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(INSPECTD + ["keys", *args], capture_output=True, text=True, timeout=60, user=user,
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))


@needs_root
def test_owner_makes_the_secret_key_loadable_by_the_service_user(world_dir: Path) -> None:
    import pwd

    out = world_dir / "keys"
    res = _keys("--out", str(out), "--name", "server", "--owner", SERVICE_USER)
    assert res.returncode == 0, res.stderr
    assert f"owned by {SERVICE_USER}" in res.stdout
    nobody = pwd.getpwnam(SERVICE_USER)
    for path, mode in ((out / "server.key_secret", 0o600), (out / "server.key", 0o644), (out, 0o750)):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, nobody.pw_gid, mode), path
    # The service user can read its private key (the interpreter lives under /root here, so a plain
    # `cat` run as that user stands in for the daemon's open()).
    as_user = subprocess.run(["cat", str(out / "server.key_secret")], capture_output=True, text=True, timeout=10,
                             user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
    assert as_user.returncode == 0 and "secret-key" in as_user.stdout, as_user.stderr
    # Without --owner (the old behaviour) the same read fails for the service user.
    assert _keys("--out", str(world_dir / "root-only"), "--name", "server").returncode == 0
    denied = subprocess.run(["cat", str(world_dir / "root-only" / "server.key_secret")], capture_output=True,
                            text=True, timeout=10, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


@pytest.mark.parametrize("owner, message", [
    ("no-such-user-xyz", "--owner: no user 'no-such-user-xyz' on this machine"),
    (f"{SERVICE_USER}:no-such-group-xyz", "--owner: no group 'no-such-group-xyz' on this machine"),
])
def test_unknown_owner_is_a_one_line_error_and_nothing_is_written(world_dir: Path, owner: str, message: str) -> None:
    res = _keys("--out", str(world_dir / "k"), "--name", "server", "--owner", owner)
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("inspectd keys: error: " + message), line
    assert not (world_dir / "k").exists()


def test_owner_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    from inspectd.errors import ConfigError
    from inspectd.keys import parse_owner

    monkeypatch.setattr(os, "geteuid", lambda: 4242)  # an unprivileged caller
    monkeypatch.setattr(os, "getegid", lambda: 4242)
    monkeypatch.setattr(os, "getgroups", lambda: [4242])
    with pytest.raises(ConfigError) as err:
        parse_owner("root")
    assert str(err.value) == "--owner root: giving files to another user needs root (run with sudo)"
