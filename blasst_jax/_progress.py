"""A small text progress bar for long sweeps (no third-party dependency).

    bar = ProgressBar(total=40, desc="λ sweep")
    for ...:
      ...
      bar.update()
    bar.close()

On a terminal the bar is redrawn in place; in a log file (not a TTY) one
line is written per tenth of the work, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBar:
  """`[#######.......] 7/14 desc 0:03<0:03` on `stream` (stderr)."""

  def __init__(self, total: int, desc: str = "", *, width: int = 30,
               stream: TextIO | None = None, enabled: bool = True):
    """Starts the clock; nothing is drawn until the first `update`.

    Args:
      total: units of work, >= 0.
      desc: label after the counts.
      width: characters of the bar.
      stream: where to draw, default stderr.
      enabled: False counts silently (callers keep one code path).

    Raises:
      ValueError: for a negative `total`.
    """
    if total < 0:
      raise ValueError(f"`total` must be >= 0, got {total}.")
    self.total = total
    self.desc = desc
    self.width = width
    self.stream = sys.stderr if stream is None else stream
    self.enabled = enabled
    self.count = 0
    self._start = time.monotonic()
    self._last_decile = -1
    self._closed = False
    self._is_tty = bool(getattr(self.stream, "isatty", lambda: False)())

  def line(self) -> str:
    """The bar as text, without a line ending."""
    fraction = self.count / self.total if self.total else 1.0
    filled = int(round(self.width * fraction))
    elapsed = time.monotonic() - self._start
    remaining = elapsed / self.count * (self.total - self.count) \
        if self.count else 0.0
    return (f"[{'#' * filled}{'.' * (self.width - filled)}] "
            f"{self.count}/{self.total} {self.desc} "
            f"{_format_seconds(elapsed)}<{_format_seconds(remaining)}")

  def update(self, n: int = 1) -> None:
    """Advances by `n` units (capped at `total`) and redraws."""
    self.count = min(self.count + n, self.total)
    if not self.enabled:
      return
    if self._is_tty:
      self.stream.write("\r" + self.line())
      self.stream.flush()
      return
    decile = 10 * self.count // max(self.total, 1)
    if decile != self._last_decile:
      self._last_decile = decile
      self.stream.write(self.line() + "\n")
      self.stream.flush()

  def close(self) -> None:
    """Ends the bar's line on a terminal; later calls do nothing."""
    if self._closed:
      return
    self._closed = True
    if self.enabled and self._is_tty:
      self.stream.write("\n")
      self.stream.flush()

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
