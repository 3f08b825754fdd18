"""Open-set matching of track templates against the gallery (cosine similarity)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from app.openset import OpenSet
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


# Galleries with at least this many templates are searched in two passes (Int8Index);
# smaller ones with one exact float32 matrix-vector product.
COARSE_MIN_TEMPLATES = 20_000
COARSE_CANDIDATES = 64  # templates the int8 pass hands to the exact float32 re-score


class Int8Index:
    """First pass of a large 1:N search: an int8 copy of the unit template matrix.

    One float32 matrix-vector product over M x D templates reads M * D * 4 bytes and is
    bound by memory bandwidth (7.6 ms at 100,000 x 512 on the 2-core machine). This index
    keeps each row quantised to int8 with its own scale (127 / max |row|), a quarter of
    the bytes, and scores probes with ONNX Runtime's MatMulInteger (uint8 x int8 -> int32,
    the VNNI kernels of MLAS), rescales each row's integer dot product by its scale and
    returns the `candidates` best rows. The caller re-scores those rows exactly in float32,
    so the reported score is exact; the int8 pass only has to keep the best template among
    its candidates. Its error is about 1e-3 in cosine, far below the gap to the 64th
    candidate in practice (tests/test_match.py checks the same answers as the exact search).
    """

    def __init__(self, matrix: np.ndarray, candidates: int = COARSE_CANDIDATES) -> None:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        m, d = matrix.shape
        peak = np.maximum(np.abs(matrix).max(axis=1), 1e-12)
        q8 = np.rint(matrix * (127.0 / peak)[:, None]).astype(np.int8)
        self.candidates = min(int(candidates), m)
        inits = [
            numpy_helper.from_array(np.ascontiguousarray(q8.T), "B"),  # [D, M]
            numpy_helper.from_array(np.array(128, np.uint8), "zero"),
            numpy_helper.from_array((peak / 127.0).astype(np.float32), "scale"),  # [M]
            numpy_helper.from_array(np.array([self.candidates], np.int64), "k"),
        ]
        nodes = [
            helper.make_node("MatMulInteger", ["q", "B", "zero"], ["dots"]),
            helper.make_node("Cast", ["dots"], ["dotsf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["dotsf", "scale"], ["approx"]),
            helper.make_node("TopK", ["approx", "k"], ["values", "rows"], axis=-1, sorted=0),
        ]
        graph = helper.make_graph(
            nodes,
            "int8_search",
            [helper.make_tensor_value_info("q", TensorProto.UINT8, ["K", d])],
            [helper.make_tensor_value_info("rows", TensorProto.INT64, ["K", self.candidates])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8  # what every supported onnxruntime reads
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # no busy-waiting between searches: idle spinning threads would take the cores from
        # the rest of the pipeline (and from NumPy's BLAS threads) after every search
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def search(self, probes: np.ndarray) -> np.ndarray:
        """int64[K, candidates] row indices (unordered) for unit float32[K, D] probes."""
        peak = np.maximum(np.abs(probes).max(axis=1, keepdims=True), 1e-12)
        q = (np.rint(probes * (127.0 / peak)) + 128).astype(np.uint8)
        return self._session.run(["rows"], {"q": q})[0]


class Matcher:
    """Nearest-identity search over a fixed snapshot of gallery templates.

    The score of an identity is the maximum cosine similarity over its templates (an
    identity enrolled from several poses matches on its closest one), so the best
    identity is the owner of the single most similar template. A probe is `identity`
    when that score is >= the threshold, else unknown (None); `candidate` always names the
    best identity. `threshold` is a number, or an `OpenSet` rule whose threshold follows
    from the number of people in this snapshot and the probe's face resolution (`face_px`
    of `match`). `version` is the gallery version the snapshot was read at, if known.

    Search is one matrix-vector product over a pre-normalised C-contiguous float32 [M, D]
    matrix followed by an argmax over template rows: the per-identity max needs no
    separate reduction, because the identity with the highest max-over-templates score is
    exactly the owner of the highest-scoring template (and its score is that template's).
    The cost is therefore bounded by reading the matrix once (M * D * 4 bytes per probe).
    From `coarse_min_templates` templates on, an `Int8Index` first pass (a quarter of the
    bytes) picks candidates that are re-scored exactly, which keeps 100,000 templates
    under 5 ms per probe on two cores (benchmarks/gallery_scale.py).
    `normalised=True` promises the rows are already unit length (as `Gallery.matrix()`
    returns them), so a float32 C-contiguous matrix is used as is, without a copy.
    """

    def __init__(
        self,
        names: list[str],
        matrix: np.ndarray,
        threshold: float | OpenSet,
        *,
        version: int | None = None,
        normalised: bool = False,
        coarse_min_templates: int = COARSE_MIN_TEMPLATES,
    ) -> None:
        mat = np.asarray(matrix)
        if mat.ndim != 2 or mat.shape[0] != len(names):
            raise ValueError(f"{len(names)} names but a matrix of shape {list(mat.shape)}")
        self.names = list(names)
        self.open_set = (threshold if isinstance(threshold, OpenSet)
                         else OpenSet(fixed=float(threshold)))
        self.identities = len(set(self.names))  # a stranger's chances: one per person
        self.threshold = self.open_set.threshold(self.identities)  # for sharp faces
        self._by_px: dict[int | None, tuple[float, float]] = {}
        # identity index of each template row (the margin rule's second-best person)
        _, self._owner = np.unique(np.asarray(self.names, dtype=object), return_inverse=True)
        self.version = version
        if normalised and mat.dtype == np.float32 and mat.flags.c_contiguous:
            self._matrix = mat
        else:
            self._matrix = _unit_rows(mat)
        self._coarse = (
            Int8Index(self._matrix)
            if len(self.names) >= max(coarse_min_templates, 1) and self._matrix.shape[1]
            else None
        )

    @classmethod
    def from_gallery(cls, gallery: Gallery, threshold: float | OpenSet) -> Matcher:
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

    def threshold_at(self, face_px: float | None) -> float:
        """The threshold for a probe whose face has this resolution (None: a sharp photo)."""
        return self._rule(face_px)[0]

    def _rule(self, face_px: float | None) -> tuple[float, float]:
        """(threshold, margin) for a face at this resolution (`app.openset`)."""
        if not self.open_set.calibrated:
            return self.threshold, float("inf")
        px = None if face_px is None else int(round(face_px))
        if px not in self._by_px:
            self._by_px[px] = (self.open_set.threshold(self.identities, px),
                               self.open_set.margin(self.identities, px))
        return self._by_px[px]

    def match(self, template: np.ndarray, face_px: float | None = None) -> Match:
        """Decide one float32[D] template (one matrix-vector product and an argmax); its
        face resolution `face_px` (None: sharp) chooses the threshold of a calibrated rule."""
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
        probe = probe / max(norm, 1e-12)
        rule = self._rule(face_px)
        if self._coarse is not None:
            return self._rescore(probe[None, :], self._coarse.search(probe[None, :]), rule)[0]
        scores = self._matrix @ probe  # [M] gemv
        j = int(np.argmax(scores))
        return self._decide(j, float(scores[j]), scores, self._owner, rule)

    def _decide(self, row: int, score: float, scores: np.ndarray, owners: np.ndarray,
                rule: tuple[float, float]) -> Match:
        """The match of template `row` (its `score`): named at `rule`'s threshold, or at the
        floor with `rule`'s margin over the best template of any other person (`scores` of the
        templates searched, `owners` their identity indices; read only in that case)."""
        name = self.names[row]
        threshold, margin = rule
        named = score >= threshold
        if not named and np.isfinite(margin) and score >= self.open_set.floor:
            others = scores[owners != self._owner[row]]
            named = score - (float(others.max()) if len(others) else -1.0) >= margin
        return Match(name if named else None, score, name)

    def _rescore(self, probes: np.ndarray, rows: np.ndarray,
                 rule: tuple[float, float]) -> list[Match]:
        """Exact float32 scores of each probe's candidate rows; the best one decides."""
        out = []
        for probe, cand in zip(probes, rows, strict=True):
            scores = self._matrix[cand] @ probe
            # the lowest row index among equal scores, as np.argmax over all rows would pick
            best = np.flatnonzero(scores == scores.max())
            out.append(self._decide(int(cand[best].min()), float(scores[best[0]]), scores,
                                    self._owner[cand], rule))
        return out

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
        probes = _normalise(probes)
        rule = self._rule(None)
        if self._coarse is not None:
            return self._rescore(probes, self._coarse.search(probes), rule)
        scores = probes @ self._matrix.T  # [K, M]; argmax over templates
        # is argmax over identities of the per-identity max (see the class docstring)
        best = np.argmax(scores, axis=1)
        return [self._decide(int(j), float(scores[k, j]), scores[k], self._owner, rule)
                for k, j in enumerate(best)]
