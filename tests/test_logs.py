"""`app.logs`: repeated log lines collapse into one with a count."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.unit


def test_repeated_log_lines_are_collapsed() -> None:
    import logging

    from app.logs import RepeatFilter

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("test.repeat")
    handler = Keep()
    repeat = RepeatFilter(window_s=0.2)
    handler.addFilter(repeat)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(1000):
            logger.error("camera %s: down", "a")
        logger.error("camera %s: down", "b")
        time.sleep(0.25)
        logger.error("camera %s: down", "a")
    finally:
        logger.removeHandler(handler)
    assert records == ["camera a: down", "camera b: down",
                       "camera a: down (repeated 999 more time(s) before)"]
