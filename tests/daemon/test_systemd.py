"""SystemdNotifier against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from inspectd.daemon.systemd import SystemdNotifier


@pytest.fixture
def notify_socket(tmp_path):
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield str(path), sock
    finally:
        sock.close()


def test_messages_arrive(notify_socket):
    path, sock = notify_socket
    n = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready()
    assert sock.recv(4096) == b"READY=1"
    assert n.status("2 lines up\nline1 ok")
    assert sock.recv(4096) == b"STATUS=2 lines up line1 ok"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    n.close()


def test_abstract_namespace():
    name = f"inspectd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    try:
        n = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready(status="up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
        n.close()
    finally:
        sock.close()


def test_noop_without_notify_socket():
    n = SystemdNotifier({})
    assert not n.enabled
    assert n.ready() is False
    assert n.watchdog() is False
    assert n.watchdog_interval_s() is None


def test_missing_socket_does_not_raise(tmp_path):
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert n.ready() is False  # logged, not raised
    assert n.watchdog() is False


def test_watchdog_interval():
    pid = str(os.getpid())
    assert SystemdNotifier({"WATCHDOG_USEC": "10000000"}).watchdog_interval_s() == 5.0
    assert SystemdNotifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": pid}).watchdog_interval_s() == 2.0
    # Meant for another process (e.g. a parent shell): not ours to feed.
    assert SystemdNotifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_interval_s() is None
    assert SystemdNotifier({"WATCHDOG_USEC": "soon"}).watchdog_interval_s() is None
    assert SystemdNotifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s() is None


def test_reads_process_environment(notify_socket, monkeypatch):
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = SystemdNotifier()
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    n.close()
