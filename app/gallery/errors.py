"""The gallery's one exception, and the wording helpers of its one-line messages."""

from __future__ import annotations

from collections.abc import Iterable


class GalleryError(Exception):
    """A user-facing gallery failure; str() is a single line."""


def one_line(exc: BaseException) -> str:
    """The first line of a (possibly DBAPI-wrapped) exception message."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def plural(n: int, word: str) -> str:
    """`1 template`, `2 templates`, `3 identities`."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word[:-1]}ies" if word.endswith("y") else f"{n} {word}s"


def names_preview(names: Iterable[str], limit: int = 3) -> str:
    """The first `limit` names, sorted and quoted, and how many more."""
    items = sorted(set(names))
    shown = ", ".join(repr(n) for n in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
