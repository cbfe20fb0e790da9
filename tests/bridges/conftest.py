"""Real components for the bridge tests: a Mosquitto broker on a free port (temp config), test
certificates made with `cryptography`, a replay daemon config with a bridges section."""

from __future__ import annotations

import datetime
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon.test_run import _MODULE, _write_config

BRIDGE = [sys.executable, "-m", _MODULE, "bridge"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s} s")


class Mosquitto:
    """A real mosquitto broker (no persistence: a restart forgets retained messages)."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            pytest.fail("mosquitto is not installed (apt-get install mosquitto; listed in .ci/apt-packages)")
        self.exe = exe
        self.port = port or free_port()
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                             f"log_dest stderr\n")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture()
def mosquitto(tmp_path: Path):
    broker = Mosquitto(tmp_path)
    yield broker
    broker.stop()


class Child:
    """A bridge child process; its stderr is collected by a thread."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    def stop(self) -> int:
        """Terminate (kill after 10 s); once it has exited, every line it wrote is in `lines`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)   # the pipe's end: the reader has taken the last lines
        return self.proc.returncode


class SubscriberTap:
    """What a bridge's ZeroMQ subscriber has handed to the bridge so far: the number of verdicts and
    each line status, counted after the bridge's own callback has run (so the bridge has taken it).
    Lets a test wait for a message to reach the bridge instead of sleeping for it."""

    def __init__(self, subscriber: Any) -> None:
        self.verdicts = 0
        self.statuses: list[Any] = []     # LineStatus, in the order the bridge got them
        self._cond = threading.Condition()
        on_verdict, on_status = subscriber.on_verdict, subscriber.on_line_status

        def verdict(msg: Any) -> None:
            on_verdict(msg)
            with self._cond:
                self.verdicts += 1
                self._cond.notify_all()

        def status(line: str, st: Any) -> None:
            on_status(line, st)
            with self._cond:
                self.statuses.append(st)
                self._cond.notify_all()

        subscriber.on_verdict, subscriber.on_line_status = verdict, status

    def wait(self, pred: Any, timeout_s: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: pred(self), timeout_s):
                raise AssertionError(f"{what}: not within {timeout_s} s (verdicts {self.verdicts}, statuses "
                                     f"{[s.state if s.heartbeat else 'offline' for s in self.statuses[-5:]]})")


def replay_config(tmp_path: Path, tiny_bundle: Path, synthetic_parts: Any, bridges: dict[str, Any],
                  heartbeat_interval_s: float = 0.2) -> tuple[Path, str]:
    """A daemon config: one replay line (line1, 10 fps, looping) on a tcp endpoint, plus `bridges`."""
    replay = tmp_path / "replay"
    if not replay.exists():
        shutil.copytree(synthetic_parts.test_good, replay / "good")
        shutil.copytree(synthetic_parts.test_bad, replay / "bad")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = _write_config(tmp_path / "lines.yaml", [{
        "id": "line1", "source": {"type": "replay", "path": str(replay), "fps": 10, "loop": True},
        "bundle": str(tiny_bundle), "backends": ["onnxruntime"], "threshold": 3.0, "latency_budget_ms": 1000,
        "heatmap": {"publish": "none"}, "chunks": ["EncoderValue"],
    }], endpoint)
    raw = yaml.safe_load(cfg.read_text())
    raw["heartbeat_interval_s"] = heartbeat_interval_s
    raw["bridges"] = bridges
    cfg.write_text(yaml.safe_dump(raw))
    return cfg, endpoint


def make_cert(folder: Path, name: str, uri: str, key_mode: int = 0o600) -> tuple[Path, Path]:
    """A self-signed OPC UA application certificate (PEM) with `uri` in subjectAltName, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri),
                                                        x509.DNSName(socket.gethostname()),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(key_mode)
    return cert_path, key_path


class StallingRelay:
    """A TCP relay in front of a broker that can stall: while stalled it holds everything both ways
    (a network path that stops moving: the connection stays up, nothing is acknowledged). On resume
    it passes on what it holds, in order, and a side's close only after what that side sent, so the
    broker sees exactly the bytes (and the clean DISCONNECT or the bare close) the client wrote."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = threading.Event()
        self.flowing.set()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = self._listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._done: list[threading.Event] = []   # per connection: both directions passed on, both ends closed
        threading.Thread(target=self._accept, daemon=True).start()

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            broker = socket.create_connection(("127.0.0.1", self.target_port))
            self._conns += [client, broker]
            done = [threading.Event(), threading.Event()]
            closed = threading.Event()
            self._done.append(closed)
            threading.Thread(target=self._pump, args=(client, broker, done[0]), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, done[1]), daemon=True).start()
            threading.Thread(target=self._close_when_done, args=(client, broker, done, closed), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Event) -> None:
        writable = True
        try:
            while True:
                data = src.recv(65536)
                self.flowing.wait()
                if not data:
                    break
                if writable:
                    try:
                        dst.sendall(data)
                    except OSError:   # that side is gone: keep reading so this side is not reset
                        writable = False
            if writable:
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            done.set()

    @staticmethod
    def _close_when_done(a: socket.socket, b: socket.socket, done: list[threading.Event],
                         closed: threading.Event) -> None:
        for event in done:
            event.wait()
        a.close()
        b.close()
        closed.set()

    def wait_drained(self, timeout_s: float) -> None:
        """After resume(): wait until every connection made so far has been passed on to its end and
        closed by both sides. The broker closes its side only once it has read everything the client
        sent and the client's close (then a will it owed is published), so what the broker retains
        from that connection is final."""
        end = time.monotonic() + timeout_s
        for closed in list(self._done):
            if not closed.wait(max(0.0, end - time.monotonic())):
                raise AssertionError(f"a relayed connection was still open {timeout_s} s after resume()")

    def close(self) -> None:
        self.flowing.set()
        self._listener.close()
        for conn in self._conns:
            try:
                conn.close()
            except OSError:
                pass
