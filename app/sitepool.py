"""A site's training pool from its gallery: the faces the review UI named, for a site fine-tune.

Sources (all stored in the gallery, in the kept 192 px canonical geometry):
- named events: each is one track of one identity, with its kept crops (best 3);
- templates enrolled from photos: labelled faces that are no track (training only); templates
  enrolled from an event are that event's crops again and are left out (the event counts);
- unknown events: unlabelled faces (`split` UNLABELLED), for recipes that can use them.

Whole tracks are held out per identity for the before/after check (`split` HELDOUT): never a
crop of a held-out track in training. An identity needs `min_tracks` named tracks to take part
in the check; too few such identities and the pool is refused (`SitePoolError`, one line that
says what is missing). Crops are re-cut onto the model's crop template. The file is private
(0600, `app.fsutil.atomic_write`): it holds faces.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import select

from app.align import recut
from app.fsutil import atomic_write
from app.gallery import Gallery
from app.gallery.codec import decode_crop
from app.gallery.db import EventCropRow, EventRow, IdentityRow, TemplateRow
from app.gallery.seal import CROP
from trainer.preprocess import CropTemplate

log = logging.getLogger(__name__)

TRAIN, HELDOUT, UNLABELLED = 0, 1, 2


class SitePoolError(ValueError):
    """Too little labelled data in the gallery for a fine-tune; the message says what."""


@dataclass(frozen=True)
class PoolRules:
    min_identities: int = 3  # identities with enough named tracks to hold one out
    min_tracks: int = 2  # named tracks an identity needs (one is held out)
    holdout_fraction: float = 0.34  # of each eligible identity's tracks (at least one)
    max_unlabelled: int = 2000
    seed: int = 0


@dataclass(frozen=True)
class SitePool:
    """crops uint8[N,S,S,3] BGR on the model's template; labels int64[N] (-1: unlabelled);
    split uint8[N]; track int64[N] (event id; -template id for a photo)."""

    crops: np.ndarray
    labels: np.ndarray
    split: np.ndarray
    track: np.ndarray
    label_names: list[str]
    identity_ids: list[int]  # per label
    gallery: str  # where it came from (location, no password)

    def summary(self) -> dict:
        lab = self.labels >= 0
        return {
            "gallery": self.gallery,
            "identities": len(self.label_names),
            "train_faces": int(((self.split == TRAIN) & lab).sum()),
            "train_tracks": int(len(np.unique(self.track[(self.split == TRAIN) & lab]))),
            "heldout_faces": int((self.split == HELDOUT).sum()),
            "heldout_tracks": int(len(np.unique(self.track[self.split == HELDOUT]))),
            "heldout_identities": int(len(np.unique(self.labels[self.split == HELDOUT]))),
            "unlabelled_faces": int((self.split == UNLABELLED).sum()),
        }


def _crop(sealer, blob: bytes, what: str, template: CropTemplate) -> np.ndarray:
    return recut(decode_crop(sealer.unseal(blob, CROP), what), template)


def build_site_pool(gallery: Gallery, template: CropTemplate,
                    rules: PoolRules | None = None) -> SitePool:
    """The pool of `gallery` (see the module); SitePoolError when there is too little."""
    rules = rules or PoolRules()
    store = gallery.store
    tracks: dict[str, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    photos: dict[str, list[tuple[int, np.ndarray]]] = defaultdict(list)
    unknown: list[tuple[int, np.ndarray]] = []
    with store.db.read("read the site's named faces") as session:
        ids = dict(session.execute(select(IdentityRow.name, IdentityRow.id)).all())
        rows = session.execute(
            select(EventRow.id, EventRow.identity, EventCropRow.crop)
            .join(EventCropRow, EventCropRow.event_id == EventRow.id)
            .order_by(EventRow.id, EventCropRow.quality.desc(), EventCropRow.id)).all()
        for eid, name, blob in rows:
            if name is not None and name not in ids:
                continue  # a name no identity carries any more: not a label
            face = _crop(store.sealer, blob, f"event {eid}", template)
            if name is None:
                unknown.append((eid, face))
            else:
                tracks[name][eid].append(face)
        for tid, name, blob in session.execute(
                select(TemplateRow.id, IdentityRow.name, TemplateRow.crop)
                .join(IdentityRow, IdentityRow.id == TemplateRow.identity_id)
                .where(TemplateRow.crop.is_not(None))
                .where(~TemplateRow.source.like("event %"))).all():
            photos[name].append((tid, _crop(store.sealer, blob, f"template {tid}", template)))
    eligible = sorted(n for n, t in tracks.items() if len(t) >= rules.min_tracks)
    if len(eligible) < rules.min_identities:
        short = sorted((n for n in tracks if n not in eligible), key=lambda n: -len(tracks[n]))
        detail = "; ".join(f"{n!r} has {len(tracks[n])}" for n in short[:5])
        raise SitePoolError(
            f"too little to fine-tune on in gallery {gallery.location}: "
            f"{len(eligible)} identities have {rules.min_tracks}+ named tracks (events with "
            f"kept crops), {rules.min_identities} are needed"
            + (f" ({detail})" if detail else " (no event is named yet)")
            + ": name more events of more people in the review UI")
    rng = np.random.default_rng(rules.seed)
    names = sorted(set(tracks) | set(photos))
    crops, labels, split, track = [], [], [], []

    def add(face: np.ndarray, label: int, part: int, key: int) -> None:
        crops.append(face)
        labels.append(label)
        split.append(part)
        track.append(key)

    for label, name in enumerate(names):
        events = sorted(tracks.get(name, {}))
        held: set[int] = set()
        if name in eligible:
            n_held = min(len(events) - 1, max(1, round(rules.holdout_fraction * len(events))))
            held = set(rng.choice(events, n_held, replace=False).tolist())
        for eid in events:
            for face in tracks[name][eid]:
                add(face, label, HELDOUT if eid in held else TRAIN, eid)
        for tid, face in photos.get(name, []):
            add(face, label, TRAIN, -tid)
    if len(unknown) > rules.max_unlabelled:
        keep = rng.choice(len(unknown), rules.max_unlabelled, replace=False)
        unknown = [unknown[i] for i in sorted(keep)]
    for eid, face in unknown:
        add(face, -1, UNLABELLED, eid)
    pool = SitePool(np.stack(crops), np.array(labels, np.int64), np.array(split, np.uint8),
                    np.array(track, np.int64), names, [int(ids[n]) for n in names],
                    gallery.location)
    log.info("site pool from %s: %s", gallery.location, pool.summary())
    return pool


def save_pool(pool: SitePool, out: str | Path) -> Path:
    out = Path(out)
    with atomic_write(out) as fh:  # faces: 0600, written whole
        np.savez(fh, crops=pool.crops, labels=pool.labels, split=pool.split, track=pool.track,
                 label_names=np.array(pool.label_names),
                 identity_ids=np.array(pool.identity_ids, np.int64),
                 gallery=np.array(pool.gallery), summary=np.array(json.dumps(pool.summary())))
    return out
