"""CurveZMQ on the verdict socket: `inspectd keys` writes key pairs (secret 0600), the daemon's
loaders refuse a secret key readable by group/others, and the real Publisher with a ZAP
allow-list delivers everything to a listed client and nothing to an unlisted one (real sockets
on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from inspectd.client import CurveClientKeys, VerdictSubscriber
from inspectd.daemon.config import config_from_dict
from inspectd.daemon.frame import Verdict
from inspectd.daemon.publish import Publisher
from inspectd.daemon.run import _curve_keys
from inspectd.errors import ConfigError
from inspectd.keys import allowed_client_keys, generate, load_secret_key_file

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CURVE")


def _verdict(i: int) -> Verdict:
    return Verdict(line="L1", frame_id=i, acquired_ns=time.time_ns(), verdict="OK", score=0.1, raw_score=0.2,
                   threshold=3.0, latency_ms=1.0, deadline_missed=False, backend="onnxruntime", bundle_id="b")


def _keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    out = {name: generate(tmp_path / "keys", name) for name in ("server", "listed", "unlisted")}
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(out["listed"][0], allowed / "listed.key")  # public half only
    return out


def _config(tmp_path: Path, keys: dict[str, tuple[Path, Path]], allowed: bool = True) -> dict:
    curve = {"server_secret_key_file": str(keys["server"][1])}
    if allowed:
        curve["allowed_clients_dir"] = str(tmp_path / "allowed")
    return {"zmq": {"endpoint": "tcp://127.0.0.1:0", "curve": curve},
            "lines": [{"id": "L1", "source": {"type": "replay", "path": str(tmp_path)},
                       "bundle": str(tmp_path), "threshold": 3.0}]}


def test_keys_command_writes_a_private_secret_and_refuses_to_overwrite(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; from inspectd.cli import main; sys.exit(main())"]
    if "inspectd.keys" not in __import__("inspectd.cli").cli.COMMAND_MODULES:
        # Until inspectd.cli lists the module, drive its register() through a parser of our own.
        cmd = [sys.executable, "-c",
               "import argparse, sys, inspectd.keys as k; p = argparse.ArgumentParser(prog='inspectd');"
               "s = p.add_subparsers(dest='command'); k.register(s); a = p.parse_args();"
               "from inspectd.errors import InspectdError\n"
               "try:\n sys.exit(a.func(a))\n"
               "except InspectdError as e:\n print(f'inspectd keys: error: {e}', file=sys.stderr); "
               "sys.exit(e.exit_code)"]
    out = tmp_path / "k"
    proc = subprocess.run(cmd + ["keys", "--out", str(out), "--name", "gate1"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    pub, sec = out / "gate1.key", out / "gate1.key_secret"
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) & 0o077 == 0o044  # the public half may be shared
    public, secret = load_secret_key_file(sec)
    assert public == zmq.auth.load_certificate(str(pub))[0] and len(secret) == 40
    assert zmq.auth.load_certificate(str(pub))[1] is None  # no secret in the shareable file
    again = subprocess.run(cmd + ["keys", "--out", str(out), "--name", "gate1"], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "exists (use --force" in again.stderr and "Traceback" not in again.stderr
    assert load_secret_key_file(sec) == (public, secret)  # nothing was replaced


def test_secret_key_readable_by_others_or_bad_allow_list_is_refused(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    server_secret = keys["server"][1]
    cfg = config_from_dict(_config(tmp_path, keys))
    assert _curve_keys(cfg).allowed_clients_dir == str(tmp_path / "allowed")
    for mode in (0o640, 0o604, 0o644):
        os.chmod(server_secret, mode)
        with pytest.raises(ConfigError, match=r"server_secret_key_file: .* accessible by group/others"):
            _curve_keys(cfg)
    os.chmod(server_secret, 0o600)
    # A public-only file where the secret is expected
    with pytest.raises(ConfigError, match="holds no secret key"):
        os.chmod(keys["server"][0], 0o600)
        load_secret_key_file(keys["server"][0])
    garbage = tmp_path / "garbage.key_secret"
    garbage.write_text("not a certificate\n")
    os.chmod(garbage, 0o600)
    with pytest.raises(ConfigError, match="no valid public key|not a ZeroMQ certificate"):
        load_secret_key_file(garbage)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no client public keys"):
        allowed_client_keys(empty)
    shutil.copy(keys["unlisted"][1], tmp_path / "allowed")
    with pytest.raises(ConfigError, match="holds secret keys"):
        allowed_client_keys(tmp_path / "allowed")


def _subscriber(endpoint: str, server_public: bytes, client: tuple[Path, Path]) -> VerdictSubscriber:
    public, secret = zmq.auth.load_certificate(str(client[1]))
    return VerdictSubscriber(endpoint, lines=["L1"], heartbeat_timeout_s=None,
                             curve=CurveClientKeys(server_public, public, secret))


def test_listed_client_receives_everything_unlisted_receives_nothing(tmp_path: Path) -> None:
    keys = _keys(tmp_path)
    curve = _curve_keys(config_from_dict(_config(tmp_path, keys)))
    pub = Publisher("tcp://127.0.0.1:*", heartbeat_interval_s=0.1, curve=curve)
    pub.register_line("L1")
    pub.start()
    listed = _subscriber(pub.bound_endpoint, curve.public_key, keys["listed"])
    unlisted = _subscriber(pub.bound_endpoint, curve.public_key, keys["unlisted"])
    plain = VerdictSubscriber(pub.bound_endpoint, lines=["L1"], heartbeat_timeout_s=None)  # no CURVE at all
    try:
        got: dict[str, list] = {"listed": [], "unlisted": [], "plain": []}
        subs = {"listed": listed, "unlisted": unlisted, "plain": plain}
        # Wait until the listed client hears heartbeats (handshake done), polling all three.
        end = time.monotonic() + 10
        while not got["listed"] and time.monotonic() < end:
            for name, sub in subs.items():
                msg = sub.poll_once(0.02)
                if msg is not None:
                    got[name].append(msg)
        assert got["listed"], "the allow-listed client never connected"
        for i in range(50):
            pub.publish_verdict(_verdict(i))
        end = time.monotonic() + 3
        while time.monotonic() < end:
            for name, sub in subs.items():
                msg = sub.poll_once(0.01)
                if msg is not None:
                    got[name].append(msg)
        verdicts = [m.header["frame_id"] for m in got["listed"] if m.kind == "verdict"]
        assert verdicts == list(range(50))  # everything, in order
        assert listed.lost == 0
        assert got["unlisted"] == [] and got["plain"] == []  # nothing at all, not even heartbeats
    finally:
        for sub in (listed, unlisted, plain):
            sub.close()
        assert pub.stop(timeout=5.0)


def test_watch_command_speaks_curve(tmp_path: Path) -> None:
    """`inspectd watch --server-key --client-key` as a child process: the listed client's watch
    prints the verdicts, the unlisted one's only that heartbeats never came."""
    import threading

    keys = _keys(tmp_path)
    curve = _curve_keys(config_from_dict(_config(tmp_path, keys)))
    pub = Publisher("tcp://127.0.0.1:*", heartbeat_interval_s=0.1, curve=curve)
    pub.register_line("L1")
    pub.start()
    stop = threading.Event()

    def feed() -> None:
        i = 0
        while not stop.wait(0.05):
            pub.publish_verdict(_verdict(i))
            i += 1

    feeder = threading.Thread(target=feed)
    feeder.start()
    watch = [sys.executable, "-m", "inspectd", "watch", "--endpoint", pub.bound_endpoint, "--line", "L1",
             "--duration", "4", "--heartbeat-timeout", "1", "--server-key", str(keys["server"][0])]
    try:
        procs = {name: subprocess.Popen(watch + ["--client-key", str(keys[name][1])], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for name in ("listed", "unlisted")}
        out = {name: p.communicate(timeout=60) for name, p in procs.items()}
    finally:
        stop.set()
        feeder.join(5)
        assert pub.stop(timeout=5.0)
    for name, p in procs.items():  # a client whose keys the daemon refuses hears nothing: exit 1, saying why
        assert p.returncode == (0 if name == "listed" else 1), (name, out[name][1])
    assert "CURVE" in out["unlisted"][1] or "keys" in out["unlisted"][1], out["unlisted"][1]
    listed = out["listed"][0].splitlines()
    unlisted = out["unlisted"][0].splitlines()
    assert sum(" frame " in ln and " OK " in ln for ln in listed) >= 10, listed
    assert not any("heartbeat lost" in ln for ln in listed), listed
    assert not any(" frame " in ln for ln in unlisted), unlisted
    assert any(ln.startswith("!! heartbeat lost: L1") for ln in unlisted), unlisted
    # A secret key file that others can read is refused before connecting (exit 2, one line).
    os.chmod(keys["listed"][1], 0o644)
    bad = subprocess.run(watch + ["--client-key", str(keys["listed"][1])], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "accessible by group/others" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
