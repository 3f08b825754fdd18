"""The review queries and edits of the gallery (`Gallery.review`) on SQLite and, when
FACEMOE_TEST_POSTGRES_URL names a scratch database, on PostgreSQL: event pages, cached
embeddings, clusters, relabelling, deleting a template, merging identities; each change in the
audit log."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from app.gallery import Gallery, GalleryError
from app.gallery.audit import acting_as
from app.gallery.review import EventFilter
from tests.gallery_helpers import MODEL, crops, event, unit

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_gallery_key")]
EMB = "facemoe-edge@0.1.0"


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "g.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def pg_url():
    from tests.test_gallery_postgres import pg_url as fixture

    yield from fixture.__wrapped__()


def _gallery(location: str) -> Gallery:
    rng = np.random.default_rng(0)
    g = Gallery(location, *MODEL)
    for name in ("ada", "bob", "cy"):
        g.enroll(name, unit(rng, 2), [f"{name}-1.jpg", f"{name}-2.jpg"], [0.9, 0.8],
                 crops(rng, 2))
    evs = [dataclasses.replace(event(i, None if i % 2 else "ada"),
                               crops=tuple((0.9 - 0.1 * k, c) for k, c in
                                           enumerate(crops(rng, 2))))
           for i in range(10)]
    g.add_events(evs, crops=2)
    return g


def test_event_pages_and_filters(location: str) -> None:
    with _gallery(location) as g:
        r = g.review
        page, total = r.events(EventFilter(), limit=4)
        assert total == 10 and [e.event.track_id for e in page] == [9, 8, 7, 6]
        nxt, _ = r.events(EventFilter(), before=page[-1].id, limit=4, count=False)
        assert [e.event.track_id for e in nxt] == [5, 4, 3, 2]
        unknown, n = r.events(EventFilter(unknown=True), limit=50)
        assert n == 5 and all(e.event.identity is None and e.crops == 2 for e in unknown)
        assert r.events(EventFilter(identity=" ada "), limit=50)[1] == 5
        assert r.cameras() == ["cam0"]
        assert r.event_crop_jpeg(page[0].id, 1)[:2] == b"\xff\xd8"
        with pytest.raises(GalleryError, match="has no crop 2"):
            r.event_crop_jpeg(page[0].id, 2)


def test_embeddings_clusters_and_relabel(location: str) -> None:
    rng = np.random.default_rng(1)
    with _gallery(location) as g:
        r = g.review
        todo = r.events_without_embedding(EMB, limit=100)
        assert len(todo) == 5
        vecs = dict(zip(todo, unit(rng, 5), strict=True))
        r.save_embeddings(vecs, EMB)
        assert r.events_without_embedding(EMB, limit=100) == []
        assert sorted(r.unclustered(EMB, limit=100)) == sorted(todo)
        a, b = sorted(todo)[:3], sorted(todo)[3:]
        ids = r.assign_clusters(EMB, {}, [a, b], {}, [vecs[a[0]], vecs[b[0]]])
        assert r.unclustered(EMB, limit=100) == {}
        listed, total = r.clusters(EMB)
        assert total == 2 and [(c.id, c.members) for c in listed] == [(ids[0], 3), (ids[1], 2)]
        best = r.best_cluster_events(ids, 2)
        assert len(best[ids[0]]) == 2 and set(best[ids[0]]) <= set(a)
        assert sorted(r.cluster_events(ids[1])) == sorted(b)
        r.merge_clusters(ids[0], ids[1], vecs[a[0]])
        assert r.cluster(ids[0]).members == 5
        with acting_as("ops (web)"):
            assert r.relabel(a, "cy") == 3
        assert r.cluster(ids[0]).members == 2  # named events leave the cluster
        assert r.events(EventFilter(cluster=ids[0]), limit=50)[1] == 5
        r.set_cluster_state(ids[0], "ignored")
        assert r.clusters(EMB)[1] == 0 and r.clusters(EMB, state="ignored")[1] == 1
        audit = g.audit()
        assert [(x.action, x.identity, x.user) for x in audit if x.action == "relabel"] == [
            ("relabel", "cy", "ops (web)")]


def test_identity_pages_templates_and_merge(location: str) -> None:
    with _gallery(location) as g:
        r = g.review
        page, total = r.identities(limit=2)
        assert total == 3 and [(i.name, i.templates) for i in page] == [("ada", 2), ("bob", 2)]
        assert r.identities(search="b")[0][0].name == "bob"
        photos = r.photo_templates([i.id for i in page])
        assert r.template_crop_jpeg(photos[page[0].id])[:2] == b"\xff\xd8"
        refs = r.template_refs("ada")
        assert [t.source for t in refs] == ["ada-1.jpg", "ada-2.jpg"] and refs[0].has_crop
        version = g.version()
        assert r.delete_template(refs[0].id) == "ada"
        assert g.version() > version and [t.id for t in r.template_refs("ada")] == [refs[1].id]
        with pytest.raises(GalleryError, match=f"no template {refs[0].id}"):
            r.delete_template(refs[0].id)
        assert r.merge_identities("ada", "bob") == 1
        assert [i.name for i in g.identities()] == ["bob", "cy"]
        assert r.events(EventFilter(identity="bob"), limit=50)[1] == 5
        assert r.identity(page[1].id).templates == 3
        with pytest.raises(GalleryError, match="no such identity: 'ada'"):
            r.merge_identities("ada", "cy")
        actions = [x.action for x in g.audit()]
        assert "delete_template" in actions and "merge" in actions
