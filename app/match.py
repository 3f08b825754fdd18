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


def _unit_rows(mat: np.ndarray) -> np.ndarray:
    """float32 C-contiguous copy of `mat` with L2-normalised rows (one pass, in place)."""
    out = np.array(mat, dtype=np.float32, order="C", copy=True)
    if out.size:
        norms = np.sqrt(np.einsum("ij,ij->i", out, out, dtype=np.float32))
        out /= np.maximum(norms, 1e-12)[:, None]
    return out


class Matcher:
    """Nearest-identity search over a fixed snapshot of gallery templates.

    The score of an identity is the maximum cosine similarity over its templates (an
    identity enrolled from several poses matches on its closest one), so the best
    identity is the owner of the single most similar template. A probe is `identity`
    when that score is >= `threshold`, else unknown (None); `candidate` always names the
    best identity. `version` is the gallery version the snapshot was read at, if known.

    Search is one matrix-vector product over a pre-normalised C-contiguous float32 [M, D]
    matrix followed by an argmax over template rows: the per-identity max needs no
    separate reduction, because the identity with the highest max-over-templates score is
    exactly the owner of the highest-scoring template (and its score is that template's).
    The cost is therefore bounded by reading the matrix once (M * D * 4 bytes per probe).
    `normalised=True` promises the rows are already unit length (as `Gallery.matrix()`
    returns them), so a float32 C-contiguous matrix is used as is, without a copy.
    """

    def __init__(
        self,
        names: list[str],
        matrix: np.ndarray,
        threshold: float,
        *,
        version: int | None = None,
        normalised: bool = False,
    ) -> None:
        mat = np.asarray(matrix)
        if mat.ndim != 2 or mat.shape[0] != len(names):
            raise ValueError(f"{len(names)} names but a matrix of shape {list(mat.shape)}")
        self.names = list(names)
        self.threshold = float(threshold)
        self.version = version
        if normalised and mat.dtype == np.float32 and mat.flags.c_contiguous:
            self._matrix = mat
        else:
            self._matrix = _unit_rows(mat)

    @classmethod
    def from_gallery(cls, gallery: Gallery, threshold: float) -> Matcher:
        """Snapshot the gallery's templates (read the version first so a race only
        causes an extra refresh, never a missed one)."""
        version = gallery.version()
        names, matrix = gallery.matrix()
        log.debug("matcher: %d templates at gallery version %d", len(names), version)
        # Gallery.matrix() returns unit-length float32 rows: no second normalisation pass.
        return cls(names, matrix, threshold, version=version, normalised=True)

    def __len__(self) -> int:
        """Number of templates."""
        return len(self.names)

    def match(self, template: np.ndarray) -> Match:
        """Decide one float32[D] template (one matrix-vector product and an argmax)."""
        probe = np.asarray(template, dtype=np.float32)
        if probe.ndim != 1:
            return self.match_many(probe[None, :])[0]  # raises the shape error
        if not self.names:
            return Match(None, -1.0, None)
        if probe.shape[0] != self._matrix.shape[1]:
            raise ValueError(
                f"template dim {probe.shape[0]} != gallery dim {self._matrix.shape[1]}"
            )
        norm = float(np.sqrt(np.dot(probe, probe)))
        scores = self._matrix @ (probe / max(norm, 1e-12))  # [M] gemv
        j = int(np.argmax(scores))
        score, name = float(scores[j]), self.names[j]
        return Match(name if score >= self.threshold else None, score, name)

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
        scores = _normalise(probes) @ self._matrix.T  # [K, M]; argmax over templates
        # is argmax over identities of the per-identity max (see the class docstring)
        best = np.argmax(scores, axis=1)
        out = []
        for k, j in enumerate(best):
            score = float(scores[k, j])
            name = self.names[int(j)]
            out.append(Match(name if score >= self.threshold else None, score, name))
        return out
