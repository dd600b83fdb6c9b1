"""Progress bars for the commands: tqdm on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time
from typing import Any


class LogProgress:
    """A training progress bar for logs. Where stderr is no terminal (``nohup ... > log``, CI, a pipe), tqdm's
    carriage-return redraws pile up into one endless line; this writes a plain line at most every ``interval``
    seconds, and one when it closes: ``train-lora: 500/2500 steps (20%), loss=0.0412, 2.13 steps/s, 15:39 left``."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "step", interval: float = 30.0,
                 file=None):
        self.total, self.n, self.desc, self.unit, self.interval = total, initial, desc, unit, interval
        self.file = file if file is not None else sys.stderr
        self.postfix: dict[str, Any] = {}
        self.started, self.first, self.last_written = time.monotonic(), initial, None
        self.closed, self.written_at = False, initial

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - (self.last_written if self.last_written is not None else self.started) >= self.interval:
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed and self.n != self.written_at:  # (the last update may have written this line)
            self._write(time.monotonic())
        self.closed = True

    def _write(self, now: float) -> None:
        done = self.n - self.first
        elapsed = max(now - self.started, 1e-9)
        parts = [f"{self.n}/{self.total} {self.unit}s" + (f" ({100 * self.n // self.total}%)" if self.total else "")]
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        if done > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {self.unit}s/s")
            if self.total and self.n < self.total:
                left = int((self.total - self.n) / rate)
                parts.append(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left" if left >= 3600
                             else f"{left // 60}:{left % 60:02d} left")
        print(f"{self.desc}: " + ", ".join(parts) if self.desc else ", ".join(parts), file=self.file, flush=True)
        self.last_written, self.written_at = now, self.n


def progress_bar(total: int, initial: int = 0, desc: str = "", unit: str = "step", disable: bool = False,
                 leave: bool = True):
    """tqdm on a terminal; plain log lines every 30 s where stderr is redirected (``LogProgress``). ``leave=False``
    clears a terminal's bar when it closes (a log keeps its last line)."""
    from tqdm.auto import tqdm

    if disable or sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc or None, unit=unit, disable=disable, dynamic_ncols=True,
                    leave=leave, file=sys.stderr)
    return LogProgress(total, initial, desc, unit)
