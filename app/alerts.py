"""When an open track is announced: the `recognized` message and its per-person cooldown.

A track is announced once, as soon as its running template matches an enrolled person
above the threshold, or, for a face nobody matches, after `unknown_after` good embeddings
(a single blurred crop is not enough to call a person a stranger). A track first announced
as unknown is announced again if it later matches someone. Within `cooldown_s` of media
time after a person was last seen on this camera, new tracks of that person are not
announced again: someone standing in view whose track is split by an occlusion or a shot
cut produces one alert, not a flood. Every track still gets its final event.
"""

from __future__ import annotations

import logging

from app.config import AlertsConfig
from app.records import Match

log = logging.getLogger(__name__)


class Announcer:
    """The announcement decisions of one camera (pure bookkeeping, no I/O)."""

    def __init__(self, cfg: AlertsConfig) -> None:
        self.cfg = cfg
        # track id -> the identity it was announced as (None: as unknown)
        self._announced: dict[int, str | None] = {}
        self._last_seen: dict[str, float] = {}  # identity -> media time it was last announced/seen

    def decide(self, track_id: int, match: Match, good: int, pts: float) -> bool:
        """Whether to announce `track_id` now, given its running `match`, its count of `good`
        embeddings and the media time `pts`."""
        if not self.cfg.enabled:
            return False
        name = match.identity
        if name is None:
            if track_id in self._announced or good < self.cfg.unknown_after:
                return False
            self._announced[track_id] = None
            return True
        if self._announced.get(track_id) is not None:
            self._last_seen[name] = pts
            return False
        last = self._last_seen.get(name)
        self._last_seen[name] = pts
        self._announced[track_id] = name
        if last is not None and pts - last < self.cfg.cooldown_s:
            log.debug("track %d: %s seen %.1f s ago, not announced again", track_id, name,
                      pts - last)
            return False
        return True

    def finish(self, track_id: int, end: float) -> None:
        """Forget a finished track; its person was seen until `end` (the cooldown runs from
        then)."""
        name = self._announced.pop(track_id, None)
        if name is not None:
            self._last_seen[name] = max(self._last_seen.get(name, end), end)
