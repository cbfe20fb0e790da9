"""inspectd.progress (tqdm): with output to a pipe (a log, journald) each refresh is its own line
and there are many of them, also with batched updates; on a terminal it is a redrawn bar."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = ("import time; from inspectd.progress import Progress\n"
          "p = Progress(200, 'scoring good')\n"
          "for i in range(25):\n"
          "    p.update(8, loss=0.123456)\n"  # batches of 8: never a multiple of the old 10 % step (20)
          "p.close()\n")


def test_piped_output_shows_periodic_progress_lines() -> None:
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "\r" not in res.stderr  # no carriage-return redraws in a log
    lines = [line for line in res.stderr.splitlines() if line.startswith("scoring good")]
    assert len(lines) >= 10, res.stderr
    assert "200/200" in lines[-1] and "loss=0.123" in lines[-1]
    done = [int(line.split("|")[2].split("/")[0]) for line in lines]
    assert done == sorted(done) and done[0] < 100  # progress shows early, not only at the end


def test_terminal_output_is_a_redrawn_bar() -> None:
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    try:
        proc = subprocess.run([sys.executable, "-c", SCRIPT], stderr=slave, stdout=subprocess.DEVNULL, timeout=60)
        assert proc.returncode == 0
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    text = out.decode(errors="replace")
    assert "\r" in text and "scoring good" in text and "200/200" in text
