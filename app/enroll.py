"""`facemoe enroll NAME PATH...`: best-quality aligned faces from images, folders, a video,
or the tracks of stored events (`--event ID`: the crops the daemon or `process` kept)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.align import STORE
from app.config import TrackerConfig
from app.detect import Detector
from app.embed import Embedder
from app.faces import MAX_PIXELS, MAX_SIDE, FaceError, aligned_face, read_image
from app.gallery import Gallery, GalleryError
from app.pipeline import TrackedFront
from app.quality import score_quality
from app.source import open_source
from trainer.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES

log = logging.getLogger(__name__)
# Reject a template this far below the median cosine to the medoid: "auto" scales it to the
# model's cosine range, OUTLIER_SCALE x (1 - its recommended threshold): 0.30 for a model whose
# threshold is 0.46, 0.04 for dlib's network, whose descriptors share one large component (all
# cosines are high) at 0.93. FIXED_OUTLIER_MARGIN serves a model without a threshold.
OUTLIER_MARGIN = "auto"
OUTLIER_SCALE = 0.56
FIXED_OUTLIER_MARGIN = 0.3
OUTLIER_MIN_TEMPLATES = 3  # with fewer templates there is no majority to judge outliers by


class EnrollError(Exception):
    """Nothing was enrolled; the message says why in one line."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what enrollment accepts (`enroll:` in the app config)."""

    max_side: int = MAX_SIDE  # detection runs on a copy at most this long (app.faces)
    max_pixels: int = MAX_PIXELS  # a decoded image above this is refused
    min_quality: float = 0.01  # faces below this quality are not enrolled
    warn_quality: float = 0.1  # faces below this are enrolled with a warning
    min_det_score: float = 0.75  # the face-quality gate (embed.min_det_score, min_exposure)
    min_exposure: float = 0.25


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
                f"{self.bound:.3f} (the median similarity minus the margin, at least the "
                "model's pair threshold)")

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
    skipped: list[str] = field(default_factory=list)  # "source: why" of what was left out


def auto_outlier_margin(threshold: float | None) -> float:
    """The outlier margin on a model's own cosine scale (see OUTLIER_SCALE)."""
    return FIXED_OUTLIER_MARGIN if threshold is None else OUTLIER_SCALE * (1.0 - threshold)


def find_outliers(
    vectors: np.ndarray,
    *,
    margin: float | None = FIXED_OUTLIER_MARGIN,
    min_templates: int = OUTLIER_MIN_TEMPLATES,
    floor: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Outlier templates of one identity: (mask of those to reject, cosine of each template to
    the medoid, the bound). The medoid is the template with the highest summed cosine to the
    others (a robust centre that is itself a real face); a template is rejected when its cosine
    to the medoid is below the median cosine of the non-medoid templates minus `margin`, or
    below `floor` (the model's own pair threshold: the model says it is someone else). Only
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
    if floor is not None:
        bound = max(bound, float(floor))
    reject = to_medoid < bound
    reject[medoid] = False
    return reject, to_medoid, bound


def faces_from_image(
    path: Path, detector: Detector, face: int | None, *, strict: bool = True,
    limits: ImageLimits = ImageLimits(), skipped: list[str] | None = None,
) -> list[EnrollFace]:
    """The face of one photo. `strict=False` (folders): a photo that is unreadable, has no
    usable face or several is skipped with a warning and noted in `skipped`."""
    try:
        image = read_image(path, limits.max_pixels)
    except FaceError as e:
        return _skip(e, strict, skipped)
    return faces_from_array(image, str(path), detector, face, strict=strict, limits=limits,
                            skipped=skipped)


def faces_from_array(
    image: np.ndarray, source: str, detector: Detector, face: int | None, *,
    strict: bool = True, limits: ImageLimits = ImageLimits(), skipped: list[str] | None = None,
) -> list[EnrollFace]:
    """The face to enroll from a decoded BGR image (a photo or an upload); `source` names it:
    its only face, or the `face`-th largest when the caller chose."""
    try:
        found = aligned_face(image, detector, "only" if face is None else face, STORE,
                             source=source, max_side=limits.max_side)
        q = score_quality(found.detection, found.crop)
        enrolled = EnrollFace(found.crop, q.score, source)
        quality = enrolled.quality
        if q.exposure < limits.min_exposure:
            raise EnrollError(f"the face in {source} is too dark or flat to carry identity "
                              f"(exposure {q.exposure:.2f} < {limits.min_exposure:g}, "
                              "embed.min_exposure); use a well-lit photo")
        if q.det_score < limits.min_det_score:
            raise EnrollError(f"the detector is unsure {source} shows a face (score "
                              f"{q.det_score:.2f} < {limits.min_det_score:g}, "
                              "embed.min_det_score); use a clear photo of the face")
        if quality < limits.min_quality:
            raise EnrollError(f"the face in {source} has quality {quality:.3f}, below the "
                              f"minimum {limits.min_quality:g} (enroll.min_quality); use a "
                              "sharper, larger, more frontal photo")
        if quality < limits.warn_quality:
            log.warning("%s: low-quality face (%.3f < %g): recognition from it may be poor",
                        source, quality, limits.warn_quality)
    except (EnrollError, FaceError) as e:
        return _skip(e, strict, skipped)
    return [enrolled]


def _skip(error: EnrollError | FaceError, strict: bool,
          skipped: list[str] | None) -> list[EnrollFace]:
    """A photo that cannot be enrolled: the error as an EnrollError (`strict`), or skipped with
    a warning and noted in `skipped` (folders)."""
    if strict:
        raise error if isinstance(error, EnrollError) else EnrollError(str(error)) from None
    log.warning("skipped: %s", error)
    if skipped is not None:
        skipped.append(str(error))
    return []


def faces_from_video(path: Path, detector: Detector, max_faces: int,
                     face: int | None = None, track: int | None = None,
                     limits: ImageLimits = ImageLimits(),
                     tracking: TrackerConfig | None = None) -> list[EnrollFace]:
    """The best-quality crops of the video's one person: refused when several people have
    tracks of some length, unless `track` (a track id) or `face` (0 = longest track, 1 = the
    next, ...) chooses one. Tracked by the pipeline's front (`app.pipeline.TrackedFront`)
    with `tracking` (the app config's `tracker` section)."""
    front = TrackedFront(detector, tracking)
    per_track: dict[int, list[EnrollFace]] = {}
    with open_source(str(path), "enroll") as source:
        for frame in source:
            seen, _ = front.step(frame)
            for s in seen:
                source_name = f"{path}#frame={s.face.frame_index}"
                per_track.setdefault(s.face.track_id, []).append(
                    EnrollFace(s.kept, s.quality.score, source_name))
    if not per_track:
        raise EnrollError(f"no face found in video {path}")
    ranked = sorted(per_track.items(), key=lambda kv: -len(kv[1]))
    longest = len(ranked[0][1])
    # tracks a tenth as long as the longest (at least 5 frames) are people, not blips
    people = [(tid, faces) for tid, faces in ranked if len(faces) >= max(5, longest // 10)]
    listing = ", ".join(f"track {tid} ({len(faces)} frames)" for tid, faces in people[:8])
    if track is not None:
        if track not in per_track:
            raise EnrollError(f"{path} has no track {track}; its tracks: {listing}")
        tid, faces = track, per_track[track]
    elif face is not None:
        if face >= len(people):
            raise EnrollError(f"{path} has {len(people)} people; --face {face} does not exist")
        tid, faces = people[face]
    elif len(people) > 1:
        raise EnrollError(f"{path} shows {len(people)} people ({listing}); choose one with "
                          "--track ID or --face N (0 = longest track)")
    else:
        tid, faces = ranked[0]
    log.info("%s: enrolling track %d (%d frames)", path, tid, len(faces))
    good = [f for f in faces if f.quality >= limits.min_quality]
    if not good:
        raise EnrollError(f"track {tid} of {path} has no face of quality >= "
                          f"{limits.min_quality:g} (enroll.min_quality)")
    return sorted(good, key=lambda f: -f.quality)[:max_faces]


def collect(
    paths: list[str], detector: Detector, face: int | None = None, max_video_faces: int = 8,
    *, track: int | None = None, limits: ImageLimits = ImageLimits(),
    skipped: list[str] | None = None, tracking: TrackerConfig | None = None,
) -> list[EnrollFace]:
    out: list[EnrollFace] = []
    for p in map(Path, paths):
        if p.is_dir():
            images = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            found = [
                x for img in images
                for x in faces_from_image(img, detector, face, strict=False, limits=limits,
                                          skipped=skipped)
            ]
            if not found:
                raise EnrollError(f"no usable face in folder {p}")
            out += found
        elif not p.exists():
            raise EnrollError(f"no such file: {p}")
        elif p.suffix.lower() in VIDEO_SUFFIXES:
            out += faces_from_video(p, detector, max_video_faces, face, track, limits, tracking)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            out += faces_from_image(p, detector, face, limits=limits)
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
    detector: Detector,
    embedder: Embedder,
    gallery: Gallery,
    face: int | None = None,
    *,
    outlier_margin: float | str | None = OUTLIER_MARGIN,
    min_templates: int = OUTLIER_MIN_TEMPLATES,
    events: list[int] | None = None,
    track: int | None = None,
    limits: ImageLimits = ImageLimits(),
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
    skipped: list[str] = []
    faces = (list(faces or [])
             + collect(paths, detector, face, track=track, limits=limits, skipped=skipped,
                       tracking=tracking)
             + faces_from_events(gallery, list(events or [])))
    vectors = np.asarray(embedder.embed_kept([f.crop for f in faces]), dtype=np.float32)
    floor = None
    if outlier_margin == "auto":
        outlier_margin = auto_outlier_margin(embedder.recommended_threshold)
        floor = embedder.recommended_threshold
    reject, sims, bound = find_outliers(vectors, margin=outlier_margin,
                                        min_templates=min_templates, floor=floor)
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
    return EnrollReport(name.strip(), faces, rejected, skipped)
