"""The fleet: every daemon of a site sharing this gallery writes a heartbeat (its box name, when
it started and was last heard of, its state and each camera's counters) to the `boxes` table;
`facemoe fleet` lists them and flags a box that has gone silent. A camera name is unique on a
site: a heartbeat reports the cameras that another live box also claims."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.gallery.db import BoxRow, as_utc, utcnow
from app.gallery.store import Store


@dataclass(frozen=True)
class BoxInfo:
    """One box's last heartbeat."""

    box: str
    started_at: datetime  # UTC
    seen_at: datetime  # UTC
    state: str  # ok | degraded | stopped
    cameras: list[dict[str, Any]]  # name, state, fps, frames, dropped, reconnects, last_event
    reasons: list[str]

    def age_s(self, now: datetime | None = None) -> float:
        """Seconds since the box was last heard of."""
        return ((now or utcnow()) - self.seen_at).total_seconds()

    def as_json(self, silent_after_s: float) -> dict[str, Any]:
        age = self.age_s()
        return {"box": self.box, "state": self.state,
                "silent": self.state != "stopped" and age > silent_after_s,
                "last_seen_s": round(age, 1), "started_at": self.started_at.isoformat(),
                "seen_at": self.seen_at.isoformat(), "cameras": self.cameras,
                "reasons": self.reasons}


def _info(row: BoxRow) -> BoxInfo:
    detail = json.loads(row.detail or "{}")
    return BoxInfo(row.box, as_utc(row.started_at), as_utc(row.seen_at), row.state,
                   list(detail.get("cameras", [])), list(detail.get("reasons", [])))


class Fleet:
    """The `boxes` table of an opened gallery (`Store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def beat(self, box: str, started_at: datetime, state: str, cameras: list[dict[str, Any]],
             reasons: list[str], *, live_s: float = 60.0) -> dict[str, str]:
        """Record `box`'s heartbeat; returns {camera: other box} for each of its cameras that
        another box, heard of in the last `live_s` seconds and not stopped, also has."""
        detail = json.dumps({"cameras": cameras, "reasons": reasons}, ensure_ascii=False,
                            default=str)
        names = {c["name"] for c in cameras}

        def work(session: Session) -> dict[str, str]:
            now = utcnow()
            row = session.get(BoxRow, box)
            if row is None:
                session.add(BoxRow(box=box, started_at=started_at, seen_at=now, state=state,
                                   detail=detail))
            else:
                row.started_at, row.seen_at, row.state, row.detail = (started_at, now, state,
                                                                      detail)
            others = session.scalars(
                select(BoxRow).where(BoxRow.box != box)
                .where(BoxRow.seen_at >= now - timedelta(seconds=live_s))
                .where(BoxRow.state != "stopped")).all()
            return {c["name"]: o.box for o in others for c in _info(o).cameras
                    if c["name"] in names}

        return self._store.db.write(f"heartbeat of box {box}", work)

    def boxes(self) -> list[BoxInfo]:
        """Every box's last heartbeat, by name."""
        with self._store.db.read("read boxes") as session:
            rows = session.scalars(select(BoxRow).order_by(BoxRow.box)).all()
            return [_info(r) for r in rows]


def site_view(boxes: list[BoxInfo], silent_after_s: float) -> dict[str, Any]:
    """The fleet as the CLI, the fleet page and /api/boxes show it: every box with its
    cameras (each camera with its box, `silent` when its box is, and `clash`: the other live
    boxes that claim its name), and one line per camera name claimed by several live boxes."""
    out = [b.as_json(silent_after_s) for b in boxes]
    owners: dict[str, list[str]] = {}
    for b in out:
        if b["state"] != "stopped" and not b["silent"]:
            for c in b["cameras"]:
                owners.setdefault(c["name"], []).append(b["box"])
    for b in out:
        b["cameras"] = [{**c, "box": b["box"], "silent": b["silent"],
                         "clash": [o for o in owners.get(c["name"], []) if o != b["box"]]}
                        for c in b["cameras"]]
    clashes = [f"camera {name!r} is claimed by boxes {', '.join(sorted(who))}: camera names "
               f"must be unique on a site (rename it on all but one box)"
               for name, who in sorted(owners.items()) if len(who) > 1]
    return {"boxes": out, "clashes": clashes}
