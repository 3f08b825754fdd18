"""Log helpers for long runs: identical lines repeated in a burst are collapsed."""

from __future__ import annotations

import logging
import threading
import time


class RepeatFilter(logging.Filter):
    """Pass a record unless the same (logger, level, message) passed less than `window_s` ago.

    A camera that fails the same way on every reconnect would otherwise fill the disk; the
    first line of a burst is kept and the next one after the window says how many were hidden.
    """

    def __init__(self, window_s: float = 60.0, max_keys: int = 1024) -> None:
        super().__init__()
        self.window_s = window_s
        self.max_keys = max_keys
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        now = time.monotonic()
        with self._lock:
            last, hidden = self._seen.get(key, (-float("inf"), 0))
            if now - last < self.window_s:
                self._seen[key] = (last, hidden + 1)
                return False
            if len(self._seen) >= self.max_keys:
                self._seen.clear()
            self._seen[key] = (now, 0)
        if hidden:
            record.msg = f"{record.getMessage()} (repeated {hidden} more time(s) before)"
            record.args = ()
        return True


def install_repeat_filter(handlers: list[logging.Handler], window_s: float = 60.0) -> RepeatFilter:
    """Attach one RepeatFilter to `handlers` (the entry point's own: never to handlers another
    program, e.g. a test runner's log capture, put on the root logger)."""
    repeat = RepeatFilter(window_s)
    for handler in handlers:
        handler.addFilter(repeat)
    return repeat
