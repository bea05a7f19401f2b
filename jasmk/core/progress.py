"""Progress on stderr: a tqdm bar on a terminal or in a notebook, plain whole lines anywhere else (a log file,
a pipe), so a log never ends in a half-drawn bar or glues the next message onto one."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

__all__ = ["LineProgress", "bar"]


class LineProgress:
    """A tqdm-like counter that writes a line at every quarter of the way and one when it closes."""

    def __init__(self, total: int, desc: str, unit: str, stream=None, steps: int = 4):
        self.total, self.desc, self.unit, self.n = max(int(total), 0), desc, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        self.steps, self._shown, self._start, self._closed = int(steps), 0, time.perf_counter(), False

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self.total and self.n < self.total:
            step = self.n * self.steps // self.total
            if step > self._shown:
                self._shown = step
                self._write(f"{self.n}/{self.total} {self.unit} ({100 * self.n // self.total} %)")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(f"{self.n}/{self.total} {self.unit} in {time.perf_counter() - self._start:.1f} s")

    def _write(self, text: str) -> None:
        self.stream.write(f"jasmk: {self.desc}: {text}\n")
        self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _interactive(stream) -> bool:
    if "ipykernel" in sys.modules:  # a notebook draws tqdm's bars in place
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar(total: int, desc: str, *, enabled: bool, unit: str = "img"):
    """A progress counter over ``total`` steps on stderr (a no-op when not ``enabled``): a tqdm bar where stderr
    is a terminal or a notebook, :class:`LineProgress` lines elsewhere."""
    if not enabled:
        return _Off()
    if _interactive(sys.stderr):
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
    return LineProgress(total, desc, unit)
