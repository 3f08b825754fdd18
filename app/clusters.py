"""Unknown faces grouped by person, and naming them: the service behind the review UI.

Each unknown event with kept crops gets an embedding (the quality-weighted mean of its crops'
embeddings with the current model), cached in the gallery (`event_embeddings`). `refresh`
adds new events to clusters: an event joins the existing cluster whose centroid is nearest
when the cosine reaches `threshold`; the rest are grouped among themselves by agglomerative
clustering (average linkage on cosine distance, cut at 1 - `threshold`) into new clusters.
Existing clusters are never split or renumbered, so a cluster keeps its id across reloads.
Naming a cluster enrolls its best events' crops through `app.enroll.enroll` (the CLI's
enrollment, with its outlier rejection) and names its events.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

from app.embed import Embedder
from app.enroll import OUTLIER_MARGIN, EnrollReport, enroll
from app.gallery import Gallery, GalleryError, StoredEvent
from app.recognize import Candidate, Recognizer

log = logging.getLogger(__name__)

EMBED_BATCH_EVENTS = 96  # new events embedded per refresh (bounds one page load to ~2-5 s)
CLUSTER_BATCH = 4000  # unclustered events grouped per step (linkage is O(n^2) memory)


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


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float32)
    return v / max(float(np.linalg.norm(v)), 1e-12)


class FaceReview:
    """Event embeddings, nearest names and face clusters of one gallery and model."""

    def __init__(self, gallery: Gallery, recognizer: Recognizer,
                 threshold: float | None = None) -> None:
        self.gallery, self.recognizer = gallery, recognizer
        self.embedder: Embedder = recognizer.embedder
        self.threshold = recognizer.threshold if threshold is None else float(threshold)
        self.model = self.embedder.model

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
        self.gallery.review.save_embeddings(vectors, self.model)
        return vectors

    def embeddings(self, ids: list[int]) -> dict[int, np.ndarray]:
        """Embeddings of these events (cached, or computed and cached now); events without
        kept crops have none."""
        cached = {k: v for k, (v, _) in self.gallery.review.embeddings(ids, self.model).items()}
        missing = [i for i in ids if i not in cached]
        if missing:
            cached.update(self._embed_events(missing))
        return cached

    def nearest(self, events: list[StoredEvent]) -> dict[int, Candidate]:
        """The nearest enrolled identity of each unknown event, even below the threshold."""
        ids = [e.id for e in events if e.event.identity is None and e.crops]
        vecs = self.embeddings(ids)
        order = [i for i in ids if i in vecs]
        if not order:
            return {}
        cands = self.recognizer.nearest(np.stack([vecs[i] for i in order]), top=1)
        return {i: c[0] for i, c in zip(order, cands, strict=True) if c}

    # --- clusters -----------------------------------------------------------------------------

    def refresh(self, max_embed: int = EMBED_BATCH_EVENTS) -> RefreshReport:
        """Embed up to `max_embed` new unknown events and put every embedded unknown event
        into a cluster."""
        review = self.gallery.review
        todo = review.events_without_embedding(self.model, limit=max_embed + 1)
        embedded = len(self._embed_events(todo[:max_embed]))
        pending = len(todo) - min(len(todo), max_embed)
        joined = created = 0
        while True:
            fresh = review.unclustered(self.model, limit=CLUSTER_BATCH)
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

    def _cluster(self, fresh: dict[int, np.ndarray]) -> tuple[int, int]:
        review = self.gallery.review
        ids, cents, counts = review.cluster_centroids(self.model)
        sums = {cid: cents[k] * counts[k] for k, cid in enumerate(ids)}
        joins: dict[int, list[int]] = {}
        rest: list[int] = []
        for eid, vec in fresh.items():
            if ids and cents.shape[1] == vec.shape[0]:
                sims = cents @ vec
                k = int(np.argmax(sims))
                if sims[k] >= self.threshold:
                    joins.setdefault(ids[k], []).append(eid)
                    sums[ids[k]] = sums[ids[k]] + vec
                    continue
            rest.append(eid)
        groups: list[list[int]] = []
        if len(rest) == 1:
            groups = [rest]
        elif rest:
            mat = np.stack([fresh[e] for e in rest]).astype(np.float64)
            labels = fcluster(linkage(mat, method="average", metric="cosine"),
                              t=1.0 - self.threshold, criterion="distance")
            by_label: dict[int, list[int]] = {}
            for eid, lab in zip(rest, labels, strict=True):
                by_label.setdefault(int(lab), []).append(eid)
            groups = sorted(by_label.values(), key=lambda g: g[0])
        centroids = {cid: _unit(sums[cid]) for cid in joins}
        new_centroids = [_unit(np.sum([fresh[e] for e in g], axis=0)) for g in groups]
        review.assign_clusters(self.model, joins, groups, centroids, new_centroids)
        return sum(len(v) for v in joins.values()), len(groups)

    def best_events(self, cluster_id: int, limit: int = 5) -> list[int]:
        """The cluster's unknown events with the best kept crops, best first."""
        return self.gallery.review.best_cluster_events([cluster_id], limit)[int(cluster_id)]

    def name(self, cluster_id: int, name: str, *, max_events: int = 5,
             outlier_margin: float | str | None = OUTLIER_MARGIN) -> NamingReport:
        """"This is NAME": enroll the crops of the cluster's best events as `name` (a new or
        an existing identity; outliers rejected as by `facemoe enroll`), name all its events
        and forget the cluster."""
        review = self.gallery.review
        review.cluster(cluster_id)  # exists
        events = review.cluster_events(cluster_id)
        best = self.best_events(cluster_id, max_events)
        if not best:
            raise GalleryError(f"face cluster {cluster_id} has no event with kept crops")
        report = enroll(name, [], self.recognizer.detector, self.embedder, self.gallery,
                        outlier_margin=outlier_margin, events=best)
        named = review.relabel(events, report.name)
        review.delete_cluster(cluster_id)
        return NamingReport(cluster_id, report, named)

    def name_event(self, event_id: int, name: str, *,
                   outlier_margin: float | str | None = OUTLIER_MARGIN) -> EnrollReport:
        """`facemoe enroll NAME --event ID` for one event, which is then named `name`."""
        report = enroll(name, [], self.recognizer.detector, self.embedder, self.gallery,
                        outlier_margin=outlier_margin, events=[int(event_id)])
        self.gallery.review.relabel([int(event_id)], report.name)
        return report

    def ignore(self, cluster_id: int) -> None:
        self.gallery.review.set_cluster_state(cluster_id, "ignored")

    def restore(self, cluster_id: int) -> None:
        self.gallery.review.set_cluster_state(cluster_id, "open")

    def merge(self, into: int, other: int) -> None:
        """One person in two clusters: move `other`'s events into `into`."""
        review = self.gallery.review
        review.cluster(into)
        review.cluster(other)
        ids, cents, counts = review.cluster_centroids(self.model)
        pos = {cid: k for k, cid in enumerate(ids)}
        if into not in pos or other not in pos:
            raise GalleryError("both clusters must belong to the current model")
        a, b = pos[into], pos[other]
        review.merge_clusters(into, other, _unit(cents[a] * counts[a] + cents[b] * counts[b]))
