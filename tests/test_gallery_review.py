"""The review queries and edits of the gallery (`Gallery.pages`, `Gallery.clusters`, its
writes) on SQLite and, when
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
from app.gallery.paging import EventFilter
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
        page, total = g.pages.events(EventFilter(), limit=4)
        assert total == 10 and [e.event.track_id for e in page] == [9, 8, 7, 6]
        nxt, _ = g.pages.events(EventFilter(), before=page[-1].id, limit=4, count=False)
        assert [e.event.track_id for e in nxt] == [5, 4, 3, 2]
        unknown, n = g.pages.events(EventFilter(unknown=True), limit=50)
        assert n == 5 and all(e.event.identity is None and e.crops == 2 for e in unknown)
        assert g.pages.events(EventFilter(identity=" ada "), limit=50)[1] == 5
        assert g.pages.cameras() == ["cam0"]
        assert g.pages.event_crop_jpeg(page[0].id, 1)[:2] == b"\xff\xd8"
        with pytest.raises(GalleryError, match="has no crop 2"):
            g.pages.event_crop_jpeg(page[0].id, 2)


def test_embeddings_clusters_and_relabel(location: str) -> None:
    rng = np.random.default_rng(1)
    with _gallery(location) as g:
        todo = g.clusters.events_without_embedding(EMB, limit=100)
        assert len(todo) == 5
        vecs = dict(zip(todo, unit(rng, 5), strict=True))
        g.clusters.save_embeddings(vecs, EMB)
        assert g.clusters.events_without_embedding(EMB, limit=100) == []
        assert sorted(g.clusters.unclustered(EMB, limit=100)) == sorted(todo)
        a, b = sorted(todo)[:3], sorted(todo)[3:]
        ids = g.clusters.assign_clusters(EMB, {}, [a, b], {}, [vecs[a[0]], vecs[b[0]]])
        assert g.clusters.unclustered(EMB, limit=100) == {}
        listed, total = g.clusters.clusters(EMB)
        assert total == 2 and [(c.id, c.members) for c in listed] == [(ids[0], 3), (ids[1], 2)]
        best = g.clusters.best_cluster_events(ids, 2)
        assert len(best[ids[0]]) == 2 and set(best[ids[0]]) <= set(a)
        assert sorted(g.clusters.cluster_events(ids[1])) == sorted(b)
        g.clusters.merge_clusters(ids[0], ids[1], vecs[a[0]])
        assert g.clusters.cluster(ids[0]).members == 5
        with acting_as("ops (web)"):
            assert g.event_store.relabel(a, "cy") == 3
        assert g.clusters.cluster(ids[0]).members == 2  # named events leave the cluster
        assert g.pages.events(EventFilter(cluster=ids[0]), limit=50)[1] == 5
        g.clusters.set_cluster_state(ids[0], "ignored")
        assert g.clusters.clusters(EMB)[1] == 0
        assert g.clusters.clusters(EMB, state="ignored")[1] == 1
        audit = g.audit()
        assert [(x.action, x.identity, x.user) for x in audit if x.action == "relabel"] == [
            ("relabel", "cy", "ops (web)")]


def test_identity_pages_templates_and_merge(location: str) -> None:
    with _gallery(location) as g:
        page, total = g.pages.identities(limit=2)
        assert total == 3 and [(i.name, i.templates) for i in page] == [("ada", 2), ("bob", 2)]
        assert g.pages.identities(search="b")[0][0].name == "bob"
        photos = g.pages.photo_templates([i.id for i in page])
        assert g.pages.template_crop_jpeg(photos[page[0].id])[:2] == b"\xff\xd8"
        refs = g.pages.template_refs("ada")
        assert [t.source for t in refs] == ["ada-1.jpg", "ada-2.jpg"] and refs[0].has_crop
        version = g.version()
        assert g.delete_template(refs[0].id) == "ada"
        assert g.version() > version
        assert [t.id for t in g.pages.template_refs("ada")] == [refs[1].id]
        with pytest.raises(GalleryError, match=f"no template {refs[0].id}"):
            g.delete_template(refs[0].id)
        assert g.merge_identities("ada", "bob") == 1
        assert [i.name for i in g.identities()] == ["bob", "cy"]
        assert g.pages.events(EventFilter(identity="bob"), limit=50)[1] == 5
        assert g.pages.identity(page[1].id).templates == 3
        with pytest.raises(GalleryError, match="no such identity: 'ada'"):
            g.merge_identities("ada", "cy")
        actions = [x.action for x in g.audit()]
        assert "delete_template" in actions and "merge" in actions


def test_corrections_and_the_face_collection(location: str) -> None:
    from app.gallery.collection import FaceCollection
    from app.gallery.corrections import Corrections, Relabel

    rng = np.random.default_rng(2)
    with _gallery(location) as g:
        fix, faces = Corrections(g.store), FaceCollection(g.store)
        named, _ = g.pages.events(EventFilter(identity="ada"), limit=50)
        first, second = named[0].id, named[1].id
        g.enroll("ada", unit(rng, 1), [f"event {first}: camera cam0 track 0 crop 0"], [0.9])
        with acting_as("ops (web)"):
            assert fix.relabel(first, "bob") == ("ada", 1)  # its template leaves ada
            assert fix.rejected([first, second]) == {first: {"ada"}}
            assert fix.not_person(first) == ("bob", 0)
            assert g.pages.event(first).event.identity is None
            assert fix.rejected([first]) == {first: {"ada", "bob"}}
            with pytest.raises(GalleryError, match="is unknown: say which person"):
                fix.not_person(first)
            with pytest.raises(GalleryError, match="no such identity: 'zed'"):
                fix.relabel(first, "zed")
            assert fix.apply({second: Relabel(None, 0.41, "bob", 0.41)}) == 1
            stored = g.pages.event(second).event
            assert (stored.identity, stored.candidate) == (None, "bob")
            assert stored.candidate_score == pytest.approx(0.41)
            assert fix.delete([first, second]) == 2
            with pytest.raises(GalleryError, match=f"no event {first}"):
                fix.delete([first])
        assert fix.rejected([first]) == {}
        # case-insensitive identity filter, and the page of newer events
        assert g.pages.events(EventFilter(identity="ADA"), limit=50)[1] == 3
        page, _ = g.pages.events(EventFilter(), limit=3)
        older, _ = g.pages.events(EventFilter(), before=page[-1].id, limit=3)
        newer, _ = g.pages.events(EventFilter(), after=older[0].id, limit=3)
        assert [e.id for e in newer] == [e.id for e in page]
        # the face collection: templates by id, subjects without faces
        listed, total = faces.faces(limit=4)
        assert total == 6 and len(listed) == 4 and listed[0].subject == "ada"
        ref, vec = faces.vector(listed[0].id)
        assert ref == listed[0] and abs(float(np.linalg.norm(vec)) - 1) < 1e-5
        assert faces.faces(subject="bob")[1] == 2
        assert faces.newest("bob").id == max(f.id for f in faces.faces(subject="bob")[0])
        with acting_as("ops (web)"):
            assert faces.add_subject(" dee ") == "dee"
            with pytest.raises(GalleryError, match="already exists"):
                faces.add_subject("dee")
            assert faces.delete_faces("bob") == 2
        assert {i.name: i.templates for i in g.identities()} == {"ada": 2, "bob": 0, "cy": 2,
                                                                 "dee": 0}
        with pytest.raises(GalleryError, match="'dee' has no face"):
            faces.newest("dee")
        with pytest.raises(GalleryError, match="no face with id"):
            faces.vector(10_000)
        actions = {x.action for x in g.audit() if x.user == "ops (web)"}
        assert actions == {"relabel", "not_person", "reprocess", "delete_events", "add_identity",
                           "delete_templates"}
