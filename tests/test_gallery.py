"""Gallery: enrollment round trip, model guard, refusal of bad files, atomic enroll."""

from __future__ import annotations

import os
import sqlite3
from datetime import timezone
from pathlib import Path

import numpy as np
import pytest

from app.gallery import EventStore, Gallery, GalleryError, IdentityInfo, Store
from app.records import Event
from tests.conftest import facemoe
from tests.gallery_helpers import MODEL, D, crops, event, unit

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_gallery_key")]  # plain galleries here


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "gallery.db"


def snapshot(g: Gallery) -> tuple:
    names, mat = g.matrix()
    return [(i.name, i.templates) for i in g.identities()], names, mat.tobytes(), g.version()


def test_enroll_list_rename_remove_round_trip(db: Path, rng: np.random.Generator) -> None:
    alice, bob = unit(rng, 3), unit(rng, 2)
    with Gallery(db, *MODEL) as g:
        assert g.identities() == []
        assert g.version() == 0
        sources = ["a0.jpg", "a1.jpg", "v.mp4#12"]
        assert g.enroll(" alice ", alice, sources, [0.9, 0.8, 0.7], crops(rng, 3)) == 3
        v1 = g.version()
        assert g.enroll("bob", bob * 3.0, ["b0.jpg", "b1.jpg"], [0.5, 0.6]) == 2
        assert g.version() != v1

    with Gallery(db, *MODEL, create=False) as g:
        infos = g.identities()
        assert [(i.name, i.templates) for i in infos] == [("alice", 3), ("bob", 2)]
        assert all(isinstance(i, IdentityInfo) for i in infos)
        assert all(i.created_at.tzinfo == timezone.utc for i in infos)
        names, mat = g.matrix()
        assert names == ["alice"] * 3 + ["bob"] * 2
        assert mat.dtype == np.float32 and mat.shape == (5, D)
        np.testing.assert_allclose(mat, np.vstack([alice, bob]), atol=1e-6)  # bob renormalised

        g.add_events([event(1), event(2, "bob")])
        v = g.version()
        g.rename("alice", "  carol ")
        assert g.version() != v
        v = g.version()
        g.remove("bob")
        assert g.version() != v
        assert [(i.name, i.templates) for i in g.identities()] == [("carol", 3)]
        assert g.matrix()[0] == ["carol"] * 3
        assert [e.identity for e in g.events()] == ["alice"]  # remove deletes bob's events

    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT count(*) FROM templates").fetchone()[0] == 3  # cascade
        jpeg = con.execute("SELECT crop FROM templates ORDER BY id LIMIT 1").fetchone()[0]
        assert jpeg[:2] == b"\xff\xd8"
        meta = dict(con.execute("SELECT key, value FROM meta"))
        assert (meta["model_name"], meta["model_version"]) == MODEL


def test_enroll_more_templates_for_existing_identity(db: Path, rng: np.random.Generator) -> None:
    with Gallery(db, *MODEL) as g:
        g.enroll("alice", unit(rng, 2), ["a", "b"], [0.5, 0.5])
        g.enroll("alice", unit(rng, 1), ["c"], [0.5])
        assert [(i.name, i.templates) for i in g.identities()] == [("alice", 3)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda g: g.remove("nobody"), "no such identity: 'nobody'"),
        (lambda g: g.rename("nobody", "x"), "no such identity: 'nobody'"),
        (lambda g: g.rename("alice", "bob"), "identity 'bob' already exists"),
        (lambda g: g.rename("alice", "   "), "identity name must not be empty"),
    ],
)
def test_remove_rename_errors(db: Path, rng: np.random.Generator, call, message: str) -> None:
    with Gallery(db, *MODEL) as g:
        g.enroll("alice", unit(rng, 1), ["a"], [0.5])
        g.enroll("bob", unit(rng, 1), ["b"], [0.5])
        before = snapshot(g)
        with pytest.raises(GalleryError, match="^" + message + "$"):
            call(g)
        assert snapshot(g) == before


@pytest.mark.parametrize(
    ("name", "vectors", "sources", "qualities", "with_crops", "message"),
    [
        ("", (2, D), ["a", "b"], [0.5, 0.5], False, "name must not be empty"),
        ("   ", (2, D), ["a", "b"], [0.5, 0.5], False, "name must not be empty"),
        ("carol", (2, D + 1), ["a", "b"], [0.5, 0.5], False, "dim 17, gallery templates have dim"),
        ("alice", (2, 8), ["a", "b"], [0.5, 0.5], False, "dim 8"),
        ("carol", (2, D), ["a"], [0.5, 0.5], False, "2 vectors but"),
        ("carol", (2, D), ["a", "b"], [0.5], False, "2 vectors but"),
        ("carol", (2, D), ["a", "b"], [0.5, "high"], False, "qualities must be numbers"),
        ("carol", (0, D), [], [], False, "shape"),
        ("carol", (D,), ["a"], [0.5], False, "shape"),
        ("carol", "zero", ["a", "b"], [0.5, 0.5], False, "finite and non-zero"),
        ("carol", "nan", ["a", "b"], [0.5, 0.5], False, "finite and non-zero"),
        ("carol", (2, D), ["a", "b"], [0.5, 0.5], True, "crop must be uint8"),
    ],
)
def test_failed_enroll_leaves_gallery_unchanged(
    db: Path, rng: np.random.Generator, name, vectors, sources, qualities, with_crops, message
) -> None:
    if vectors == "zero":
        vecs = unit(rng, 2)
        vecs[1] = 0.0
    elif vectors == "nan":
        vecs = unit(rng, 2)
        vecs[0, 3] = np.nan
    else:
        vecs = rng.normal(size=vectors).astype(np.float32)
    bad_crops = [np.zeros((112, 112, 3), np.uint8), np.zeros((112, 112), np.float32)]
    with Gallery(db, *MODEL) as g:
        g.enroll("alice", unit(rng, 2), ["a", "b"], [0.5, 0.5])
        before = snapshot(g)
        with pytest.raises(GalleryError, match=message) as err:
            g.enroll(name, vecs, sources, qualities, bad_crops if with_crops else None)
        assert "\n" not in str(err.value)
        assert snapshot(g) == before
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM identities").fetchone()[0] == 1


def test_model_mismatch_refused(db: Path, rng: np.random.Generator) -> None:
    with Gallery(db, *MODEL) as g:
        g.enroll("alice", unit(rng, 1), ["a"], [0.5])
    for other in [("facemoe-edge", "0.2.0"), ("other", "0.1.0")]:
        with pytest.raises(GalleryError) as err:
            Gallery(db, *other)
        assert str(err.value) == (
            f"gallery {db} was built with model facemoe-edge@0.1.0; this model is "
            f"{other[0]}@{other[1]}: re-embed or use a matching model"
        )


def test_model_is_claimed_on_first_write(db: Path, rng: np.random.Generator) -> None:
    Gallery(db, "first", "1").close()  # opening writes no model
    with Gallery(db, *MODEL) as g:
        g.enroll("alice", unit(rng, 1), ["a"], [0.5])
    with pytest.raises(GalleryError, match="was built with model facemoe-edge"):
        Gallery(db, "first", "1")


@pytest.mark.parametrize("content", [b"this is not a database" * 50, bytes(range(256)) * 8])
def test_garbage_file_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(content)
    with pytest.raises(GalleryError) as err:
        Gallery(path, *MODEL)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "not a database" in message
    assert path.read_bytes() == content


def test_foreign_sqlite_database_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE songs (id INTEGER PRIMARY KEY)")
    with pytest.raises(GalleryError, match="is a database but not a FaceMoE gallery$"):
        Gallery(path, *MODEL)


def test_missing_gallery_with_create_false(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    with pytest.raises(GalleryError) as err:
        Gallery(path, *MODEL, create=False)
    assert str(err.value) == f"no such gallery: {path}"
    assert not path.exists()


def test_url_locations(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "sub" / "g.db"
    with Gallery(f"sqlite:///{path}", *MODEL) as g:
        g.enroll("alice", unit(rng, 1), ["a"], [0.5])
    with Gallery(path, *MODEL, create=False) as g:
        assert [i.name for i in g.identities()] == ["alice"]
    with Gallery("sqlite://", *MODEL) as g:  # in memory
        g.enroll("bob", unit(rng, 2), ["a", "b"], [0.5, 0.5])
        assert g.matrix()[0] == ["bob", "bob"]


def test_events_round_trip_and_limit(db: Path) -> None:
    events = [event(i, None if i % 2 else "alice") for i in range(5)]
    with Gallery(db, *MODEL) as g:
        assert g.events() == []
        g.add_events(events[:3])
        g.add_events(events[3:])
        g.add_events([])
        assert g.events() == events
        assert g.events(limit=2) == events[3:]
        assert g.version() == 0  # events do not change the templates


def test_failed_event_batch_writes_nothing(db: Path) -> None:
    bad = Event("cam0", 9, None, 0.1, 0.0, 1.0, 3, (0.0, 0.0, 1.0, 1.0), None)  # type: ignore[arg-type]
    with Gallery(db, *MODEL) as g:
        with pytest.raises(GalleryError) as err:
            g.add_events([event(1), bad])
        assert "\n" not in str(err.value)
        assert g.events() == []


def test_event_store_on_its_own_store(db: Path, rng: np.random.Generator) -> None:
    """The event store needs only an opened `Store`, not the identity store; its first write
    claims the gallery's model like an enrollment does."""
    with Store(db, *MODEL) as store:
        events = EventStore(store)
        events.add([event(1), event(2, None)])
        assert [s.event for s in events.stored(unknown=True)] == [event(2, None)]
        assert store.audit.entries() == []  # events are not audited
    with Gallery(db, *MODEL, create=False) as g:
        assert g.events() == [event(1), event(2, None)]
    with pytest.raises(GalleryError, match="was built with model facemoe-edge"):
        Gallery(db, "other", "1", create=False)


@pytest.mark.parametrize("name", ["Ada\u200bLovelace", "Ada\u202eecalevoL", "\u2066Ada\u2069",
                                  "Ada\ufeff"])
def test_names_with_invisible_characters_are_refused(tmp_path: Path, name: str,
                                                     no_gallery_key) -> None:
    import numpy as np

    from app.gallery import Gallery, GalleryError
    from tests.gallery_helpers import unit

    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as g:
        with pytest.raises(GalleryError, match="invisible format characters"):
            g.enroll(name, unit(np.random.default_rng(0), 1), ["a"], [0.5])
        g.enroll("Ada Lovelace", unit(np.random.default_rng(0), 1), ["a"], [0.5])
        with pytest.raises(GalleryError, match="invisible"):
            g.rename("Ada Lovelace", name)


def test_audit_names_the_real_user_not_logname(tmp_path: Path, monkeypatch,
                                               no_gallery_key) -> None:
    import pwd

    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import unit

    for var in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(var, "mallory")
    with Gallery(tmp_path / "g.db", "facemoe-edge", "0.1.0") as g:
        g.enroll("Ada", unit(np.random.default_rng(0), 1), ["a"], [0.5])
        users = {row.user for row in g.audit()}
    assert users == {pwd.getpwuid(os.getuid()).pw_name}


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 2 MiB tmpfs (needs root; skipped elsewhere), unmounted afterwards."""
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_gallery_reads_work_on_a_full_disk(full_disk: Path, default_model_dir: Path,
                                           no_gallery_key) -> None:
    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import event
    from trainer.manifest import model_id, read_manifest

    db = full_disk / "g.db"
    manifest = read_manifest(default_model_dir)
    with Gallery(db, *model_id(manifest)) as g:  # the disk fills while it is open
        g.enroll("Ada", np.random.default_rng(0).normal(size=(2, manifest["embedding_dim"])),
                 ["a.jpg", "b.jpg"], [0.9, 0.8])
        g.add_events([event(1, "Ada")])
        fd = os.open(full_disk / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            with pytest.raises(OSError, match="No space left"):
                while True:
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
    for action, expected in (("check", f"{db}: ok"), ("list", "Ada\t2\t"),
                             ("events", "    id  camera")):
        proc = facemoe("gallery", action, "--gallery", str(db))
        assert proc.returncode == 0, (action, proc.stderr)
        assert proc.stdout.startswith(expected), (action, proc.stdout)


def _flip_bit(db: Path, template_id: int, byte: int, bit: int) -> None:
    import sqlite3

    con = sqlite3.connect(db)
    (blob,) = con.execute("SELECT vector FROM templates WHERE id = ?", (template_id,)).fetchone()
    data = bytearray(blob)
    data[byte] ^= 1 << bit
    con.execute("UPDATE templates SET vector = ? WHERE id = ?", (bytes(data), template_id))
    con.commit()
    con.close()


@pytest.mark.slow
@pytest.mark.parametrize("encrypted", [False, True])
def test_one_flipped_bit_is_found_and_only_that_template_is_left_out(
        tmp_path: Path, data_dir: Path, default_model_dir: Path, monkeypatch,
        encrypted: bool) -> None:
    import base64

    from app.gallery import Gallery
    from trainer.manifest import model_id, read_manifest

    monkeypatch.delenv("FACEMOE_GALLERY_KEY_FILE", raising=False)
    monkeypatch.delenv("FACEMOE_GALLERY_KEY", raising=False)
    if encrypted:
        monkeypatch.setenv("FACEMOE_GALLERY_KEY", base64.b64encode(os.urandom(32)).decode())
    db = tmp_path / "g.db"
    videos = data_dir / "videos"
    for name, photo in (("Barack Obama", "obama-240p.jpg"), ("Joe Biden", "biden.jpg")):
        proc = facemoe("enroll", name, str(videos / photo), "--gallery", str(db), timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert facemoe("gallery", "check", "--gallery", str(db)).returncode == 0
    # a low mantissa bit of one float: the vector stays finite and (nearly) unit length
    _flip_bit(db, 1, byte=(40 if encrypted else 4 * 17), bit=0)
    proc = facemoe("gallery", "check", "--gallery", str(db))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"facemoe: error: gallery {db} has 1 corrupt template(s) (re-enroll them or restore "
        "from a backup or an export): 'Barack Obama' template 1: checksum mismatch"]
    with Gallery(db, *model_id(read_manifest(default_model_dir)), create=False) as g:
        names, matrix = g.matrix()
        assert names == ["Joe Biden"] and matrix.shape[0] == 1
        assert [str(c) for c in g.corrupt_templates] == [
            "'Barack Obama' template 1: checksum mismatch"]


def test_template_without_checksum_is_still_checked(tmp_path: Path, no_gallery_key) -> None:
    """Rows of older releases have no checksum: a vector that is no longer unit length, or
    not finite, is still found."""
    import sqlite3

    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import unit

    db = tmp_path / "g.db"
    with Gallery(db, "facemoe-edge", "0.1.0") as g:
        g.enroll("Ada", unit(np.random.default_rng(0), 2), ["a", "b"], [0.5, 0.5])
    con = sqlite3.connect(db)
    con.execute("UPDATE templates SET checksum = NULL")
    con.commit()
    con.close()
    _flip_bit(db, 2, byte=3, bit=6)  # an exponent bit of the first float
    with Gallery(db, "facemoe-edge", "0.1.0") as g:
        problems = g.verify()
        assert len(problems) == 1 and problems[0].template_id == 2
        assert "not unit length" in problems[0].problem or "non-finite" in problems[0].problem
        assert g.matrix()[1].shape[0] == 1
