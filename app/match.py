"""Open-set matching of track templates against the gallery (cosine similarity)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from app.records import Match

if TYPE_CHECKING:
    from app.gallery import Gallery

log = logging.getLogger(__name__)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Matcher:
    """Nearest-identity search over a fixed snapshot of gallery templates.

    The score of an identity is the maximum cosine similarity over its templates (an
    identity enrolled from several poses matches on its closest one), so the best
    identity is the owner of the single most similar template. A probe is `identity`
    when that score is >= `threshold`, else unknown (None); `candidate` always names the
    best identity. `version` is the gallery version the snapshot was read at, if known.
    """

    def __init__(
        self,
        names: list[str],
        matrix: np.ndarray,
        threshold: float,
        *,
        version: int | None = None,
    ) -> None:
        mat = np.asarray(matrix, dtype=np.float32)
        if mat.ndim != 2 or mat.shape[0] != len(names):
            raise ValueError(f"{len(names)} names but a matrix of shape {list(mat.shape)}")
        self.names = list(names)
        self.threshold = float(threshold)
        self.version = version
        self._matrix = _normalise(mat).astype(np.float32)

    @classmethod
    def from_gallery(cls, gallery: Gallery, threshold: float) -> Matcher:
        """Snapshot the gallery's templates (read the version first so a race only
        causes an extra refresh, never a missed one)."""
        version = gallery.version()
        names, matrix = gallery.matrix()
        log.debug("matcher: %d templates at gallery version %d", len(names), version)
        return cls(names, matrix, threshold, version=version)

    def __len__(self) -> int:
        """Number of templates."""
        return len(self.names)

    def match(self, template: np.ndarray) -> Match:
        """Decide one float32[D] template."""
        return self.match_many(np.asarray(template)[None, :])[0]

    def match_many(self, templates: np.ndarray) -> list[Match]:
        """Decide float32[K, D] templates with one matrix product."""
        probes = np.asarray(templates, dtype=np.float32)
        if probes.ndim != 2:
            raise ValueError(f"templates must be [K, D], got shape {list(probes.shape)}")
        if not self.names:
            return [Match(None, -1.0, None) for _ in range(probes.shape[0])]
        if probes.shape[1] != self._matrix.shape[1]:
            raise ValueError(
                f"template dim {probes.shape[1]} != gallery dim {self._matrix.shape[1]}"
            )
        scores = _normalise(probes) @ self._matrix.T  # [K, M]
        best = np.argmax(scores, axis=1)
        out = []
        for k, j in enumerate(best):
            score = float(scores[k, j])
            name = self.names[int(j)]
            out.append(Match(name if score >= self.threshold else None, score, name))
        return out
