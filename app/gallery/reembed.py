"""Model upgrades: rebuild every template from its stored aligned crop with a new embedder.

Crops are stored unless the gallery's `store_crops` setting is off; templates without one
cannot be re-embedded (they are refused, or deleted with `drop_missing`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.gallery.codec import decode_crop, unit_vectors, vector_checksum
from app.gallery.db import IN_CHUNK, IdentityRow, TemplateRow, stamp_bindings
from app.gallery.errors import GalleryError, names_preview, plural
from app.gallery.seal import CROP, VECTOR
from app.gallery.store import Store

log = logging.getLogger(__name__)


class EmbedderLike(Protocol):
    """What `reembed` and `import_file(embedder=...)` need (app.embed.Embedder has it)."""

    model_name: str
    model_version: str

    def embed_kept(self, crops: list[np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class ReembedReport:
    model_from: str
    model_to: str
    templates: int
    dropped: list[str]  # "name: source" of templates without a crop (removed)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def embed_crops(embedder: EmbedderLike, jpegs: list[tuple[bytes, str]],
                batch_size: int = 64) -> np.ndarray:
    """L2-normalised little-endian float32[N, D] embeddings of (JPEG crop, what) pairs."""
    out = []
    for i in range(0, len(jpegs), batch_size):
        batch = [decode_crop(jpeg, what) for jpeg, what in jpegs[i:i + batch_size]]
        vecs = np.asarray(embedder.embed_kept(batch), dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(batch):
            raise GalleryError(f"the embedder returned shape {list(vecs.shape)} "
                               f"for {len(batch)} crops")
        out.append(unit_vectors(vecs, "re-embedded"))
    return np.concatenate(out) if out else np.zeros((0, 0), "<f4")


def reembed(store: Store, embedder: EmbedderLike, *, drop_missing: bool = False,
            batch_size: int = 64) -> ReembedReport:
    """Rebuild every template from its stored aligned crop with `embedder`; the gallery
    then belongs to the embedder's model. Templates without a crop are refused (nothing
    changes) unless `drop_missing`, which deletes them. One transaction."""
    db, sealer = store.db, store.sealer
    start_version = db.version()
    with db.read("read crops") as session:
        rows = session.execute(
            select(TemplateRow.id, IdentityRow.name, TemplateRow.source, TemplateRow.crop)
            .join(TemplateRow.identity).order_by(TemplateRow.id)
        ).all()
    have = [(tid, name, crop) for tid, name, _, crop in rows if crop is not None]
    missing = [(tid, f"{name}: {source}") for tid, name, source, crop in rows if crop is None]
    if missing and not drop_missing:
        owners = {m.split(": ", 1)[0] for _, m in missing}
        raise GalleryError(
            f"no stored crop for {plural(len(missing), 'template')} of "
            f"{plural(len(owners), 'identity')} ({names_preview(owners)}): "
            f"re-enroll them, or re-embed with "
            f"--drop-missing to delete those templates"
        )
    vectors = embed_crops(
        embedder, [(sealer.unseal(crop, CROP), f"{name!r}") for _, name, crop in have],
        batch_size)
    old, new = store.model, f"{embedder.model_name}@{embedder.model_version}"
    dim = vectors.shape[1] if len(vectors) else 0

    def work(session: Session) -> None:
        if int(db.get_meta(session, "version") or 0) != start_version:
            raise GalleryError(
                f"gallery {store.location} changed while re-embedding; run it again")
        if have:
            session.execute(update(TemplateRow), [
                {"id": tid, "vector": (blob := sealer.seal(vec.tobytes(), VECTOR)),
                 "checksum": vector_checksum(blob), "dim": dim,
                 "model_name": embedder.model_name, "model_version": embedder.model_version}
                for (tid, _, _), vec in zip(have, vectors, strict=True)
            ])
            for i in range(0, len(have), IN_CHUNK):
                stamp_bindings(session, TemplateRow.id.in_([t for t, _, _ in have[i:i + IN_CHUNK]]))
        for i in range(0, len(missing), IN_CHUNK):
            ids = [tid for tid, _ in missing[i:i + IN_CHUNK]]
            session.execute(delete(TemplateRow).where(TemplateRow.id.in_(ids)))
        db.set_meta(session, "model_name", embedder.model_name)
        db.set_meta(session, "model_version", embedder.model_version)
        store.audit.record(session, "reembed", None,
                           f"{old} -> {new}: {plural(len(have), 'template')} re-embedded, "
                           f"{len(missing)} without a crop deleted")
        db.bump_version(session)

    db.write("re-embed", work)
    store.model_name, store.model_version = embedder.model_name, embedder.model_version
    log.info("re-embedded %d template(s) of %s with %s (was %s)", len(have), store.location,
             new, old)
    if missing:
        db.compact()
    return ReembedReport(old, new, len(have), [m for _, m in missing])
