"""sd_notify without libsystemd: READY, WATCHDOG, STATUS, STOPPING datagrams to $NOTIFY_SOCKET.

Only the stdlib is used so the daemon runs the same under systemd (Type=notify, WatchdogSec=)
and outside it, where every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends sd_notify messages. A send failure is logged once and never raised: losing a status
    message must not take the line down (systemd's watchdog will notice a real hang)."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = self._parse_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self._lock = threading.Lock()  # one datagram socket, used from several threads
        self._sock: socket.socket | None = None
        self._warned = False

    @staticmethod
    def _parse_address(value: str) -> str | bytes | None:
        if not value:
            return None
        if value.startswith("@"):
            # Abstract namespace: the leading '@' stands for a NUL byte.
            return b"\0" + value[1:].encode()
        if value.startswith("/"):
            return value
        log.warning("ignoring NOTIFY_SOCKET=%r: not a unix socket path", value)
        return None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, message: str) -> bool:
        """Send one raw sd_notify message; True when it was sent."""
        if self._address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(message.encode(), self._address)
                return True
            except OSError as exc:
                if not self._warned:
                    log.warning("systemd notify failed (%s); further failures are not logged", exc)
                    self._warned = True
                return False

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        # STATUS is one line in systemctl status; a newline would start a new assignment.
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half of WatchdogSec, as sd_watchdog_enabled advises), or
        None when the watchdog is off or meant for another process."""
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not an integer", self._watchdog_usec)
            return None
        if usec <= 0:
            return None
        return usec / 1e6 / 2

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
