"""`facemoe enroll NAME PATH...`: best-quality aligned faces from images, folders, a video,
or the tracks of stored events (`--event ID`: the crops the daemon or `process` kept)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from app.align import STORE, align_face
from app.config import TrackerConfig
from app.detect import FaceDetector
from app.embed import Embedder
from app.gallery import Gallery, GalleryError
from app.quality import score_quality
from app.records import Detection
from app.source import open_source
from app.track import Tracker

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".gif", ".ts", ".m4v"}
OUTLIER_MARGIN = 0.3  # reject a template this far below the median similarity to the medoid
OUTLIER_MIN_TEMPLATES = 3  # with fewer templates there is no majority to judge outliers by


class EnrollError(Exception):
    """Nothing was enrolled; the message says why in one line."""


@dataclass(frozen=True)
class EnrollFace:
    crop: np.ndarray  # uint8[192,192,3] BGR in the kept geometry (app.align.STORE)
    quality: float
    source: str


@dataclass(frozen=True)
class Rejection:
    """A template left out at enrollment: its cosine to the identity's medoid template was
    below `bound` (the median similarity of the other templates minus the margin)."""

    source: str
    quality: float
    similarity: float
    bound: float

    @property
    def reason(self) -> str:
        return (f"cosine {self.similarity:.3f} to the medoid template is below "
                f"{self.bound:.3f} (the median similarity minus the margin)")

    def as_json(self) -> dict:
        return {"source": self.source, "quality": round(self.quality, 3),
                "similarity": round(self.similarity, 4), "bound": round(self.bound, 4),
                "reason": self.reason}


@dataclass(frozen=True)
class EnrollReport:
    """What `enroll` stored (`faces`) and what it left out as outliers (`rejected`)."""

    name: str
    faces: list[EnrollFace]
    rejected: list[Rejection]


def find_outliers(
    vectors: np.ndarray,
    *,
    margin: float | None = OUTLIER_MARGIN,
    min_templates: int = OUTLIER_MIN_TEMPLATES,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Outlier templates of one identity: (mask of those to reject, cosine of each template to
    the medoid, the bound). The medoid is the template with the highest summed cosine to the
    others (a robust centre that is itself a real face); a template is rejected when its cosine
    to the medoid is below the median cosine of the non-medoid templates minus `margin`. Only
    with >= `min_templates` templates and a non-None margin; the medoid is never rejected."""
    vecs = np.asarray(vectors, dtype=np.float32)
    n = len(vecs)
    keep_all = np.zeros(n, dtype=bool)
    if margin is None or n < max(min_templates, 3):
        return keep_all, np.ones(n, dtype=np.float32), float("-inf")
    unit = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    medoid = int(np.argmax(sims.sum(axis=1)))
    to_medoid = sims[medoid].astype(np.float32)
    others = np.delete(to_medoid, medoid)
    bound = float(np.median(others)) - float(margin)
    reject = to_medoid < bound
    reject[medoid] = False
    return reject, to_medoid, bound


def _pick(dets: list[Detection], source: str, face: int | None) -> Detection:
    """The face to enroll: the only one, or the `face`-th largest when the caller chose."""
    if not dets:
        raise EnrollError(f"no face found in {source}")
    ranked = sorted(dets, key=lambda d: -float(d.bbox[2] * d.bbox[3]))
    if face is None:
        if len(ranked) > 1:
            raise EnrollError(
                f"{source} has {len(ranked)} faces; choose one with --face N "
                f"(0 = largest, 1 = next largest, ...)"
            )
        return ranked[0]
    if face >= len(ranked):
        raise EnrollError(f"{source} has {len(ranked)} faces; --face {face} does not exist")
    return ranked[face]


def faces_from_image(
    path: Path, detector: FaceDetector, face: int | None, *, strict: bool = True
) -> list[EnrollFace]:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise EnrollError(f"cannot read image {path}")
    return faces_from_array(image, str(path), detector, face, strict=strict)


def faces_from_array(
    image: np.ndarray, source: str, detector: FaceDetector, face: int | None, *,
    strict: bool = True,
) -> list[EnrollFace]:
    """The face to enroll from a decoded BGR image (an upload); `source` names it."""
    try:
        det = _pick(detector.detect(image), source, face)
    except EnrollError as e:
        if strict:
            raise
        log.warning("skipped: %s", e)
        return []
    crop = align_face(image, det.landmarks, STORE)
    return [EnrollFace(crop, score_quality(det, crop).score, source)]


def faces_from_video(
    path: Path, detector: FaceDetector, max_faces: int, tracking: TrackerConfig | None = None
) -> list[EnrollFace]:
    """The best-quality crops of the video's longest track (the person the clip is about),
    tracked with `tracking` (the app config's `tracker` section; default: its defaults)."""
    tracker = Tracker(tracking)
    per_track: dict[int, list[EnrollFace]] = {}
    with open_source(str(path), "enroll") as source:
        for frame in source:
            found = detector.detect_frame(frame.image, tracker.expected(frame.index))
            faces, _ = tracker.update(frame.index, frame.pts, found)
            for f in faces:
                crop = align_face(frame.image, f.detection.landmarks, STORE)
                q = score_quality(f.detection, crop).score
                per_track.setdefault(f.track_id, []).append(
                    EnrollFace(crop, q, f"{path}#frame={f.frame_index}")
                )
    if not per_track:
        raise EnrollError(f"no face found in video {path}")
    tid, faces = max(per_track.items(), key=lambda kv: len(kv[1]))
    if len(per_track) > 1:
        log.info(
            "%s: %d tracks; enrolling track %d (%d frames, the longest)",
            path,
            len(per_track),
            tid,
            len(faces),
        )
    return sorted(faces, key=lambda f: -f.quality)[:max_faces]


def collect(
    paths: list[str],
    detector: FaceDetector,
    face: int | None = None,
    max_video_faces: int = 8,
    tracking: TrackerConfig | None = None,
) -> list[EnrollFace]:
    out: list[EnrollFace] = []
    for p in map(Path, paths):
        if p.is_dir():
            images = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            found = [
                x for img in images for x in faces_from_image(img, detector, face, strict=False)
            ]
            if not found:
                raise EnrollError(f"no usable face in folder {p}")
            out += found
        elif not p.exists():
            raise EnrollError(f"no such file: {p}")
        elif p.suffix.lower() in VIDEO_SUFFIXES:
            out += faces_from_video(p, detector, max_video_faces, tracking)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            out += faces_from_image(p, detector, face)
        else:
            raise EnrollError(f"{p}: not an image or video file ({p.suffix or 'no extension'})")
    return out


def faces_from_events(gallery: Gallery, event_ids: list[int]) -> list[EnrollFace]:
    """The aligned crops kept with stored events (`output.event_crops`), best first."""
    out: list[EnrollFace] = []
    for event_id in event_ids:
        try:
            stored, crops = gallery.event_crops(event_id)
        except GalleryError as exc:
            raise EnrollError(str(exc)) from exc
        if not crops:
            raise EnrollError(
                f"event {event_id} has no kept face crops (stored with output.event_crops: 0, "
                f"or purged); enroll from a photo or video instead"
            )
        ev = stored.event
        source = f"event {event_id}: camera {ev.camera} track {ev.track_id} at {ev.start:.2f} s"
        out += [EnrollFace(crop, q, f"{source} crop {i}") for i, (q, crop) in enumerate(crops)]
    return out


def enroll(
    name: str,
    paths: list[str],
    detector: FaceDetector,
    embedder: Embedder,
    gallery: Gallery,
    face: int | None = None,
    *,
    outlier_margin: float | None = OUTLIER_MARGIN,
    min_templates: int = OUTLIER_MIN_TEMPLATES,
    events: list[int] | None = None,
    tracking: TrackerConfig | None = None,
    faces: list[EnrollFace] | None = None,
) -> EnrollReport:
    """Embed every face found in `paths` and in the kept crops of stored `events`, leave out
    outliers (`find_outliers`: a face of someone else, a bad detection) and store the rest
    as templates of `name` in one transaction. `outlier_margin=None` keeps every face;
    `tracking` is the tracker config for videos (the app config's `tracker` section);
    `faces` adds faces found by the caller (`faces_from_array` on uploaded images)."""
    if not name.strip():
        raise EnrollError("the identity name is empty")
    if not paths and not events and not faces:
        raise EnrollError("nothing to enroll from: give photos, folders, videos or --event ID")
    faces = (list(faces or []) + collect(paths, detector, face, tracking=tracking)
             + faces_from_events(gallery, list(events or [])))
    vectors = np.asarray(embedder.embed_kept([f.crop for f in faces]), dtype=np.float32)
    reject, sims, bound = find_outliers(vectors, margin=outlier_margin,
                                        min_templates=min_templates)
    rejected = [Rejection(f.source, f.quality, float(sims[i]), bound)
                for i, f in enumerate(faces) if reject[i]]
    for r in rejected:
        log.warning("%s: not enrolled as %r: %s", r.source, name.strip(), r.reason)
    faces = [f for i, f in enumerate(faces) if not reject[i]]
    vectors = vectors[~reject]
    gallery.enroll(
        name,
        vectors,
        [f.source for f in faces],
        [f.quality for f in faces],
        [f.crop for f in faces],
    )
    return EnrollReport(name.strip(), faces, rejected)
