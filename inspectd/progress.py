"""Progress bars (tqdm) for train, eval and calibrate, behind the small interface they use:
`Progress(total, label)`, `update(n, **postfix)`, `close()`.

On a terminal it is tqdm's redrawn bar. Anywhere else (a pipe, a log file, journald) a redrawn
bar would be one endless line of carriage returns, so each refresh is written as its own line,
at most every `LOG_EVERY` of the work and at least once at the end.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

# Share of the total between two lines when the output is not a terminal (20 lines per bar).
LOG_EVERY = 0.05


class _Lines:
    """A file for tqdm that turns each redraw ("\\r<bar>") into one complete line."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


class Progress:
    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int | None = None) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.stream = stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        common: dict[str, Any] = dict(total=self.total, desc=label, dynamic_ncols=width is None, ncols=width,
                                      leave=True, ascii=not tty, smoothing=0.1)
        if tty:
            self._bar = tqdm(file=self.stream, mininterval=0.1, **common)
        else:
            # Every LOG_EVERY of the total counted from the last line (not "when done is a multiple
            # of a step", which batched updates may never hit), with no time limit between lines.
            self._bar = tqdm(file=_Lines(self.stream), mininterval=0, miniters=max(1, int(self.total * LOG_EVERY)),
                             **common)

    @property
    def done(self) -> int:
        return int(self._bar.n)

    def update(self, n: int = 1, **fields: float | str) -> None:
        if fields:
            self._bar.set_postfix(fields, refresh=False)
        self._bar.update(min(n, self.total - self._bar.n))

    def close(self) -> None:
        self._bar.close()
