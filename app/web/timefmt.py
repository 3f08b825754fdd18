"""Times on the pages and in filters: shown in the configured zone (`web.timezone`, default the
machine's) with their UTC offset; filter values read with their offset, or in that zone when
they have none; a bad value is a one-line error."""

from __future__ import annotations

from datetime import datetime, time, timezone, tzinfo
from zoneinfo import ZoneInfo

FORMAT_HINT = "YYYY-MM-DDTHH:MM, optionally with seconds and an offset such as +01:00"


def zone(name: str | None) -> tzinfo:
    """The zone called `name` (IANA, e.g. Europe/Paris), or the machine's local zone."""
    if name:
        return ZoneInfo(name)
    local = datetime.now().astimezone().tzinfo
    return local if local is not None else timezone.utc


def parse_time(text: str | None, what: str, tz: tzinfo) -> datetime | None:
    """An ISO 8601 date and time as UTC; without an offset it is a time in `tz`. ValueError
    with a one-line message when `text` is not one."""
    if text is None or not text.strip():
        return None
    clean = text.strip()
    if clean.count(" ") == 1 and ":" in clean.split(" ")[1] and clean.split(" ")[0].count(":"):
        clean = clean.replace(" ", "+")  # a "+01:00" offset that a URL turned into a space
    try:
        value = datetime.fromisoformat(clean)
    except ValueError:
        try:  # a time of day alone: today, in the zone the offset or `tz` gives
            t = time.fromisoformat(clean)
        except ValueError:
            raise ValueError(f"{what}: {text.strip()[:40]!r} is not a date and time "
                             f"({FORMAT_HINT})") from None
        value = datetime.combine(datetime.now(t.tzinfo or tz).date(), t)
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    return value.astimezone(timezone.utc)


def local(value: datetime | None, tz: tzinfo, seconds: bool = True) -> str:
    """`value` in `tz` with its offset: 2026-12-06 20:10:05 +01:00."""
    if value is None:
        return "–"
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    text = value.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %z" if seconds
                                         else "%Y-%m-%d %H:%M %z")
    return f"{text[:-2]}:{text[-2:]}"
