"""Unknown faces grouped by person, and naming them: the service behind the review UI.

Each unknown event with kept crops gets an embedding (the quality-weighted mean of its crops'
embeddings with the current model), cached in the gallery (`event_embeddings`). `refresh`
adds new events to clusters: an event joins the existing cluster whose centroid is nearest
when the cosine reaches `threshold`; the rest are grouped among themselves by agglomerative
clustering (average linkage on cosine distance, cut at 1 - `threshold`) into new clusters.
Existing clusters are never split or renumbered, so a cluster keeps its id across reloads.
Faces seen at the same time on one camera are never one person (a cannot-link rule): such a
pair never joins one cluster, whatever their similarity (`co_occur`).
Naming a cluster enrolls its best events' crops through `app.enroll.enroll` (the CLI's
enrollment, with its outlier rejection) and names only the events it accepted: an event whose
crops were rejected as outliers, that was marked "not this person", or that does not match the
name's templates at the match threshold stays unknown (and is grouped again).
`reprocess` re-runs stored events against the current gallery.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist

from app.embed import Embedder
from app.enroll import OUTLIER_MARGIN, EnrollReport, enroll
from app.gallery import Gallery, GalleryError, StoredEvent
from app.gallery.codec import normalise_name
from app.gallery.corrections import Corrections, Relabel
from app.gallery.paging import EventFilter
from app.recognize import Candidate, Recognizer

log = logging.getLogger(__name__)

EMBED_BATCH_EVENTS = 96  # new events embedded per refresh (bounds one page load to ~2-5 s)
CLUSTER_BATCH = 4000  # unclustered events grouped per step (linkage is O(n^2) memory)
# Two tracks of one camera whose media times overlap are the same moment when their wall-clock
# starts differ by no more than their media starts plus this (seconds). Live cameras keep the
# two clocks together; `process` runs faster than real time (a smaller wall gap); two runs of one
# file have overlapping media times but wall starts a whole run apart.
CO_OCCUR_SLACK_S = 2.0
_EVENT_SOURCE = re.compile(r"^event (\d+): ")


@dataclass(frozen=True)
class RefreshReport:
    embedded: int  # events embedded now
    joined: int  # events added to existing clusters
    created: int  # new clusters
    pending: int  # unknown events still waiting to be embedded (0: all clustered)


@dataclass(frozen=True)
class NamingReport:
    cluster: int
    enrollment: EnrollReport
    events_named: int
    events_left: int = 0  # of the cluster, left unknown (rejected, or not matching the name)


@dataclass(frozen=True)
class MergeChoice:
    """Another group offered for "merge in": its id, size and centroid similarity."""

    id: int
    members: int
    similarity: float


@dataclass(frozen=True)
class ReprocessReport:
    checked: int  # events re-run (with kept crops)
    changed: int  # events whose name changed
    without_crops: int  # events that could not be re-run
    next_before: int | None  # continue with events below this id (None: done)


@dataclass(frozen=True)
class Span:
    """When and where an event's track was seen."""

    camera: str
    start: float  # media seconds
    end: float
    wall: float | None  # Unix time of its first frame (None in rows of older releases)


def span_of(e: StoredEvent) -> Span:
    ev = e.event
    wall = None
    if ev.time:
        try:
            wall = datetime.fromisoformat(ev.time).timestamp()
        except ValueError:
            wall = None
    return Span(ev.camera, float(ev.start), float(ev.end), wall)


def co_occur(a: Span, b: Span, slack: float = CO_OCCUR_SLACK_S) -> bool:
    """Seen at the same time on one camera (so not one person)."""
    if a.camera != b.camera or a.wall is None or b.wall is None:
        return False
    if a.start > b.end or b.start > a.end:
        return False
    return abs(a.wall - b.wall) <= abs(a.start - b.start) + slack


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _co_occurring(spans: list[Span | None]) -> set[tuple[int, int]]:
    """Index pairs (i < j) of spans seen at the same time on one camera (a sweep over each
    camera's tracks in start order, so only overlapping tracks are compared)."""
    by_camera: dict[str, list[int]] = {}
    for k, s in enumerate(spans):
        if s is not None and s.wall is not None:
            by_camera.setdefault(s.camera, []).append(k)
    pairs: set[tuple[int, int]] = set()
    for ks in by_camera.values():
        ks.sort(key=lambda k: spans[k].start)  # type: ignore[union-attr]
        for a, i in enumerate(ks):
            for j in ks[a + 1:]:
                if spans[j].start > spans[i].end:  # type: ignore[union-attr]
                    break
                if co_occur(spans[i], spans[j]):  # type: ignore[arg-type]
                    pairs.add((min(i, j), max(i, j)))
    return pairs


def _split(members: list[int], apart: set[tuple[int, int]]) -> list[list[int]]:
    """`members` in the fewest parts (greedily, in order) with no pair of `apart` in one."""
    parts: list[list[int]] = []
    for k in members:
        for part in parts:
            if not any((min(k, m), max(k, m)) in apart for m in part):
                part.append(k)
                break
        else:
            parts.append([k])
    return parts


class FaceReview:
    """Event embeddings, nearest names and face clusters of one gallery and model."""

    def __init__(self, gallery: Gallery, recognizer: Recognizer,
                 threshold: float | None = None) -> None:
        self.gallery, self.recognizer = gallery, recognizer
        self.embedder: Embedder = recognizer.embedder
        self.threshold = recognizer.threshold if threshold is None else float(threshold)
        self.model = self.embedder.model
        self.corrections = Corrections(gallery.store)

    # --- embeddings ---------------------------------------------------------------------------

    def _embed_events(self, ids: list[int]) -> dict[int, np.ndarray]:
        vectors: dict[int, np.ndarray] = {}
        for eid in ids:
            _, crops = self.gallery.event_crops(eid)
            if not crops:
                continue
            with self.recognizer.model_lock:
                vecs = np.asarray(self.embedder.embed_kept([c for _, c in crops]), np.float32)
            weights = np.asarray([max(q, 1e-3) for q, _ in crops], np.float32)
            vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            vectors[eid] = _unit((vecs * weights[:, None]).sum(axis=0))
        self.gallery.clusters.save_embeddings(vectors, self.model)
        return vectors

    def embeddings(self, ids: list[int]) -> dict[int, np.ndarray]:
        """Embeddings of these events (cached, or computed and cached now); events without
        kept crops have none."""
        cached = {k: v for k, (v, _) in self.gallery.clusters.embeddings(ids, self.model).items()}
        missing = [i for i in ids if i not in cached]
        if missing:
            cached.update(self._embed_events(missing))
        return cached

    def nearest(self, events: list[StoredEvent]) -> dict[int, Candidate]:
        """The nearest enrolled identity of each unknown event, even below the threshold (not
        one it was marked "not this person")."""
        ids = [e.id for e in events if e.event.identity is None and e.crops]
        vecs = self.embeddings(ids)
        order = [i for i in ids if i in vecs]
        if not order:
            return {}
        refused = self.corrections.rejected(order)
        top = 1 + max((len(v) for v in refused.values()), default=0)
        cands = self.recognizer.nearest(np.stack([vecs[i] for i in order]), top=top)
        out = {}
        for i, found in zip(order, cands, strict=True):
            best = next((c for c in found if c.name not in refused.get(i, ())), None)
            if best is not None:
                out[i] = best
        return out

    # --- clusters -----------------------------------------------------------------------------

    def refresh(self, max_embed: int = EMBED_BATCH_EVENTS) -> RefreshReport:
        """Embed up to `max_embed` new unknown events and put every embedded unknown event
        into a cluster."""
        todo = self.gallery.clusters.events_without_embedding(self.model, limit=max_embed + 1)
        embedded = len(self._embed_events(todo[:max_embed]))
        pending = len(todo) - min(len(todo), max_embed)
        joined = created = 0
        while True:
            fresh = self.gallery.clusters.unclustered(self.model, limit=CLUSTER_BATCH)
            if not fresh:
                break
            j, c = self._cluster(fresh)
            joined, created = joined + j, created + c
            if len(fresh) < CLUSTER_BATCH:
                break
        if embedded or created or joined:
            log.info("face clusters: %d event(s) embedded, %d joined clusters, %d new clusters",
                     embedded, joined, created)
        return RefreshReport(embedded, joined, created, pending)

    def _spans(self, ids: list[int]) -> dict[int, Span]:
        return {eid: span_of(e) for eid, e in self.gallery.pages.stored(ids).items()}

    def _cluster(self, fresh: dict[int, np.ndarray]) -> tuple[int, int]:
        ids, cents, counts = self.gallery.clusters.cluster_centroids(self.model)
        sums = {cid: cents[k] * counts[k] for k, cid in enumerate(ids)}
        spans = self._spans(list(fresh))
        members: dict[int, list[Span]] = {}  # a cluster's unknown events, read when needed

        def conflicts(cid: int, span: Span) -> bool:
            if cid not in members:
                members[cid] = list(
                    self._spans(self.gallery.clusters.cluster_events(cid)).values())
            return any(co_occur(span, m) for m in members[cid])

        joins: dict[int, list[int]] = {}
        rest: list[int] = []
        for eid, vec in fresh.items():
            span = spans.get(eid)
            target = None
            if ids and cents.shape[1] == vec.shape[0]:
                sims = cents @ vec
                for k in np.argsort(-sims, kind="stable"):
                    if sims[k] < self.threshold:
                        break
                    if span is None or not conflicts(ids[k], span):
                        target = ids[int(k)]
                        break
            if target is None:
                rest.append(eid)
                continue
            joins.setdefault(target, []).append(eid)
            sums[target] = sums[target] + vec
            if span is not None:
                members[target].append(span)
        groups = self._groups(rest, fresh, spans)
        centroids = {cid: _unit(sums[cid]) for cid in joins}
        new_centroids = [_unit(np.sum([fresh[e] for e in g], axis=0)) for g in groups]
        self.gallery.clusters.assign_clusters(self.model, joins, groups, centroids, new_centroids)
        return sum(len(v) for v in joins.values()), len(groups)

    def _groups(self, rest: list[int], fresh: dict[int, np.ndarray],
                spans: dict[int, Span]) -> list[list[int]]:
        """New clusters among `rest`: average linkage on cosine distance, with co-occurring
        pairs at the largest distance, and any group that still holds such a pair split."""
        if len(rest) <= 1:
            return [rest] if rest else []
        apart = _co_occurring([spans.get(e) for e in rest])
        mat = np.stack([fresh[e] for e in rest]).astype(np.float64)
        dist = np.clip(pdist(mat, metric="cosine"), 0.0, 2.0)
        n = len(rest)
        for i, j in apart:  # index of (i, j), i < j, in the condensed matrix
            dist[n * i - i * (i + 1) // 2 + (j - i - 1)] = 2.0
        labels = fcluster(linkage(dist, method="average"), t=1.0 - self.threshold,
                          criterion="distance")
        by_label: dict[int, list[int]] = {}
        for k, lab in enumerate(labels):
            by_label.setdefault(int(lab), []).append(k)
        groups = []
        for members in by_label.values():
            for part in _split(members, apart):
                groups.append([rest[k] for k in part])
        return sorted(groups, key=lambda g: g[0])

    def best_events(self, cluster_id: int, limit: int = 5) -> list[int]:
        """The cluster's unknown events with the best kept crops, best first."""
        return self.gallery.clusters.best_cluster_events([cluster_id], limit)[int(cluster_id)]

    def name(self, cluster_id: int, name: str, *, max_events: int = 5,
             outlier_margin: float | str | None = OUTLIER_MARGIN) -> NamingReport:
        """"This is NAME": enroll the crops of the cluster's best events as `name` (a new or
        an existing identity; outliers rejected as by `facemoe enroll`), name the events it
        accepted and forget the cluster; the others stay unknown and are grouped again."""
        self.gallery.clusters.cluster(cluster_id)  # exists
        events = self.gallery.clusters.cluster_events(cluster_id)
        refused = self.corrections.rejected(events)
        wanted = normalise_name(name).strip()
        best = [e for e in self.best_events(cluster_id, len(events))
                if wanted not in refused.get(e, ())][:max_events]
        if not best:
            raise GalleryError(f"face cluster {cluster_id} has no event with kept crops "
                               f"that may be {wanted!r}")
        report = enroll(name, [], self.recognizer.detector, self.embedder, self.gallery,
                        outlier_margin=outlier_margin, events=best)
        named = self.accepted(events, report, refused)
        n = self.gallery.event_store.relabel(named, report.name) if named else 0
        self.gallery.clusters.delete_cluster(cluster_id)
        return NamingReport(cluster_id, report, n, len(events) - n)

    def accepted(self, events: list[int], report: EnrollReport,
                 refused: dict[int, set[str]]) -> list[int]:
        """The events that an enrollment as `report.name` may name: none of whose crops was
        rejected as an outlier, not marked "not this person", and enrolled or matching the
        name at the match threshold."""
        def ids(sources: list[str]) -> set[int]:
            return {int(m.group(1)) for s in sources if (m := _EVENT_SOURCE.match(s))}

        rejected = ids([r.source for r in report.rejected])
        enrolled = ids([f.source for f in report.faces]) - rejected
        todo = [e for e in events if e not in rejected and report.name not in refused.get(e, ())]
        vecs = self.embeddings([e for e in todo if e not in enrolled])
        order = [e for e in todo if e in vecs]
        near = self.recognizer.nearest(np.stack([vecs[e] for e in order]), top=1) if order else []
        matching = {e for e, c in zip(order, near, strict=True)
                    if c and c[0].name == report.name and c[0].score >= self.recognizer.threshold}
        return [e for e in todo if e in enrolled or e in matching]

    def reprocess(self, f: EventFilter, *, named: bool = False, before: int | None = None,
                  limit: int = 200) -> ReprocessReport:
        """Re-run up to `limit` stored events (newest first, ids below `before`) against the
        current gallery: each event's embedding (from its kept crops) is matched again and the
        event gets the name (or unknown), score and nearest name of now. Only unknown events
        unless `named` (or the filter names an identity); a name the event was marked "not
        this person" is never given back."""
        named = named or f.identity is not None
        events, _ = self.gallery.pages.events(f if named else replace(f, unknown=True),
                                               before=before, limit=limit, count=False)
        vecs = self.embeddings([e.id for e in events if e.crops])
        order = [e.id for e in events if e.id in vecs]
        refused = self.corrections.rejected(order)
        labels: dict[int, Relabel] = {}
        if order:
            top = 1 + max((len(v) for v in refused.values()), default=0)
            near = self.recognizer.nearest(np.stack([vecs[e] for e in order]), top=top)
            for eid, cands in zip(order, near, strict=True):
                best = next((c for c in cands if c.name not in refused.get(eid, ())), None)
                if best is None:
                    labels[eid] = Relabel(None, 0.0, None, None)
                    continue
                hit = best.score >= self.recognizer.threshold
                labels[eid] = Relabel(best.name if hit else None, best.score, best.name,
                                      best.score)
        changed = self.corrections.apply(labels)
        log.info("re-ran %d stored event(s) against the gallery: %d changed name",
                 len(order), changed)
        return ReprocessReport(len(order), changed, len(events) - len(order),
                               events[-1].id if len(events) == limit else None)

    def name_event(self, event_id: int, name: str, *,
                   outlier_margin: float | str | None = OUTLIER_MARGIN) -> EnrollReport:
        """`facemoe enroll NAME --event ID` for one event, which is then named `name`."""
        report = enroll(name, [], self.recognizer.detector, self.embedder, self.gallery,
                        outlier_margin=outlier_margin, events=[int(event_id)])
        self.gallery.event_store.relabel([int(event_id)], report.name)
        return report

    def ignore(self, cluster_id: int) -> None:
        self.gallery.clusters.set_cluster_state(cluster_id, "ignored")

    def restore(self, cluster_id: int) -> None:
        self.gallery.clusters.set_cluster_state(cluster_id, "open")

    def merge_choices(self, cluster_ids: list[int], members: dict[int, int], top: int = 10
                      ) -> dict[int, list[MergeChoice]]:
        """For each of `cluster_ids`, the others among them, most similar centroid first."""
        ids, cents, _ = self.gallery.clusters.cluster_centroids(self.model)
        pos = {cid: k for k, cid in enumerate(ids)}
        shown = [c for c in cluster_ids if c in pos]
        if len(shown) < 2:
            return {}
        mat = cents[[pos[c] for c in shown]]
        sims = mat @ mat.T
        out = {}
        for a, cid in enumerate(shown):
            order = [b for b in np.argsort(-sims[a], kind="stable") if b != a][:top]
            out[cid] = [MergeChoice(shown[b], members.get(shown[b], 0), float(sims[a, b]))
                        for b in order]
        return out

    def merge(self, into: int, other: int) -> None:
        """One person in two clusters: move `other`'s events into `into`."""
        self.gallery.clusters.cluster(into)
        self.gallery.clusters.cluster(other)
        ids, cents, counts = self.gallery.clusters.cluster_centroids(self.model)
        pos = {cid: k for k, cid in enumerate(ids)}
        if into not in pos or other not in pos:
            raise GalleryError("both clusters must belong to the current model")
        a, b = pos[into], pos[other]
        self.gallery.clusters.merge_clusters(
            into, other, _unit(cents[a] * counts[a] + cents[b] * counts[b]))
