"""The gallery's record of the models fine-tuned on its faces (`facemoe finetune --from-gallery`).

`record` writes one row per identity whose named tracks or photos a model trained on (ids and
counts only). An erasure (`Erasures.begin`, the one door) marks that person's rows erased in
the transaction that deletes their faces; `needs_retraining` then lists each model that still
carries what it learned from someone erased, for `gallery check` and the site report.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.gallery.db import TrainedFaceRow, as_utc, utcnow
from app.gallery.store import Store


@dataclass(frozen=True)
class Retrain:
    """A model trained on the faces of people erased since."""

    model: str  # name@version
    model_dir: str
    model_sha256: str
    erased: int  # identities erased after it was trained
    first_erased: datetime

    def as_json(self) -> dict:
        return {"model": self.model, "model_dir": self.model_dir,
                "model_sha256": self.model_sha256, "erased_identities": self.erased,
                "first_erased": self.first_erased.isoformat()}

    def line(self) -> str:
        return (f"{self.model} ({self.model_dir}) was trained on the faces of {self.erased} "
                f"person(s) erased since {self.first_erased:%Y-%m-%d %H:%M}: retrain it "
                f"without them and stop using it")


class TrainedFaces:
    """The `trained_faces` rows of one opened gallery (`Store`)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def record(self, model: str, model_sha256: str, model_dir: str,
               tracks: dict[int, int]) -> int:
        """Record that `model` trained on the identities `tracks` (identity id -> tracks)."""
        def work(session: Session) -> int:
            session.add_all(TrainedFaceRow(model=model, model_sha256=model_sha256,
                                           model_dir=model_dir, identity_id=int(i),
                                           tracks=int(n)) for i, n in tracks.items())
            return len(tracks)

        return self._store.db.write(f"record the faces {model} trained on", work)

    @staticmethod
    def mark_erased(session: Session, identity_id: int) -> int:
        """In the erasure's transaction: the identity's rows are erased now."""
        return session.execute(update(TrainedFaceRow)
                               .where(TrainedFaceRow.identity_id == int(identity_id))
                               .where(TrainedFaceRow.erased_at.is_(None))
                               .values(erased_at=utcnow())).rowcount

    def models_of(self, identity_id: int) -> list[str]:
        """The models trained on this identity's faces (name@version)."""
        with self._store.db.read("read trained models") as session:
            return sorted(set(session.scalars(
                select(TrainedFaceRow.model)
                .where(TrainedFaceRow.identity_id == int(identity_id)))))

    def needs_retraining(self) -> list[Retrain]:
        """Models trained on someone erased since, oldest erasure first."""
        with self._store.db.read("read trained models") as session:
            rows = session.scalars(select(TrainedFaceRow)
                                   .where(TrainedFaceRow.erased_at.is_not(None))).all()
            by_model: dict[tuple[str, str, str], list[datetime]] = {}
            for r in rows:
                by_model.setdefault((r.model, r.model_dir, r.model_sha256), []).append(
                    as_utc(r.erased_at))
        out = [Retrain(m, d, s, len(times), min(times)) for (m, d, s), times in by_model.items()]
        return sorted(out, key=lambda r: r.first_erased)
