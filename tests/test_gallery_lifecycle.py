"""Gallery lifecycle on real faces: export/import, re-embedding, retention, removal, audit,
file modes, encryption at rest, corrupt files, interrupted and concurrent writes, odd names."""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.gallery import Gallery, GalleryError, load_key, verify_export
from app.gallery import db as gallery_db
from tests.conftest import facemoe
from tests.gallery_helpers import event

REPO = Path(__file__).resolve().parent.parent
OLD_MODEL = ("old-model", "1")
PER_ID = 3  # templates per identity in the small galleries


pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_gallery_key")]  # plain galleries here


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: Path):
    from app.embed import Embedder

    return Embedder.from_config(str(tiny_model_dir), "onnxruntime")


@pytest.fixture(scope="module")
def faces(real_faces: dict, embedder) -> dict:
    """8 real identities x 3 aligned crops with their tiny-model embeddings."""
    rows = [i for k in range(8) for i in np.flatnonzero(real_faces["labels"] == k)[:PER_ID]]
    crops = real_faces["crops"][rows]
    names = [str(real_faces["label_names"][k]) for k in range(8)]
    return {"names": names, "crops": crops, "vectors": embedder.embed_kept(list(crops)),
            "sources": [str(p) for p in real_faces["paths"][rows]]}


def model_of(embedder) -> tuple[str, str]:
    return embedder.model_name, embedder.model_version


def fill(g: Gallery, faces: dict, vectors: np.ndarray | None = None, crops: bool = True) -> None:
    vecs = faces["vectors"] if vectors is None else vectors
    for k, name in enumerate(faces["names"]):
        s = slice(k * PER_ID, (k + 1) * PER_ID)
        g.enroll(name, vecs[s], faces["sources"][s], [0.5 + 0.1 * j for j in range(PER_ID)],
                 list(faces["crops"][s]) if crops else None)


def snapshot(g: Gallery) -> tuple:
    names, mat = g.matrix()
    return ([(i.name, i.templates) for i in g.identities()], names, mat.tobytes(), g.version(),
            len(g.events()), g.model)


def decoded(crops: np.ndarray) -> list[np.ndarray]:
    """The crops as the gallery stores them (JPEG)."""
    return [cv2.imdecode(cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 90])[1],
                         cv2.IMREAD_COLOR) for c in crops]


def rewrite_trailer(path: Path) -> None:
    """Recompute an export's whole-file checksum after tampering with it."""
    data = bytearray(path.read_bytes())
    data[-64:] = hashlib.sha256(bytes(data[:-64])).hexdigest().encode()
    path.write_bytes(bytes(data))


# --- portability -----------------------------------------------------------------------------

def test_export_import_round_trip(tmp_path: Path, embedder, faces: dict) -> None:
    model = model_of(embedder)
    with Gallery(tmp_path / "a.db", *model) as src:
        fill(src, faces)
        src.add_events([event(1, faces["names"][0])])
        report = src.export(tmp_path / "out" / "g.zip")
        before = snapshot(src)
        expected = {i.name: src.templates(i.name) for i in src.identities()}
    export = Path(report.path)
    assert (report.identities, report.templates, report.crops) == (8, 24, 24)
    assert os.stat(export).st_mode & 0o777 == 0o600
    assert verify_export(export) == report.sha256 == export.read_bytes()[-64:].decode()
    with zipfile.ZipFile(export) as zf:
        assert zf.testzip() is None
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["model"] == {"name": model[0], "version": model[1]}
    assert len(manifest["entries"]) == 48 and manifest["counts"]["templates"] == 24

    with Gallery(tmp_path / "b.db", *model) as dst:
        r = dst.import_file(export)
        assert (r.identities_added, r.templates_added, r.templates_duplicate) == (8, 24, 0)
        assert snapshot(dst)[:3] == before[:3]
        for name, templates in expected.items():
            got = dst.templates(name)
            assert [(t.source, t.quality, t.created_at) for t in got] == \
                   [(t.source, t.quality, t.created_at) for t in templates]
            assert all(np.array_equal(a.crop, b.crop) for a, b in zip(got, templates, strict=True))
        assert dst.events() == []  # events are not part of an export

        unchanged = snapshot(dst)
        with pytest.raises(GalleryError, match="8 identities of .* already in the gallery"):
            dst.import_file(export)
        assert snapshot(dst) == unchanged
        r = dst.import_file(export, on_conflict="skip")
        assert (r.identities_skipped, r.templates_added) == (8, 0)
        r = dst.import_file(export, on_conflict="merge")
        assert (r.identities_merged, r.templates_added, r.templates_duplicate) == (8, 0, 24)
        assert snapshot(dst)[:3] == unchanged[:3]

    with Gallery(tmp_path / "a.db", *model) as src:  # one more template, merged alone
        src.enroll(faces["names"][1], faces["vectors"][:1], ["extra.jpg"], [0.9])
        src.export(export)
    with Gallery(tmp_path / "b.db", *model) as dst:
        r = dst.import_file(export, on_conflict="merge")
        assert (r.templates_added, r.templates_duplicate) == (1, 24)
        assert dict((i.name, i.templates) for i in dst.identities())[faces["names"][1]] == 4


def test_tampered_or_truncated_export_refused(tmp_path: Path, embedder, faces: dict) -> None:
    model = model_of(embedder)
    with Gallery(tmp_path / "a.db", *model) as src:
        fill(src, faces)
        good = Path(src.export(tmp_path / "g.zip").path)
    data = good.read_bytes()

    flipped = tmp_path / "flipped.zip"
    flipped.write_bytes(data[:5000] + bytes([data[5000] ^ 1]) + data[5001:])
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: len(data) // 2])
    entry = tmp_path / "entry.zip"  # one vector replaced, zip CRC and whole-file sum redone
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(entry, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info)
            if info.filename == "templates/0000003.f32":
                body = np.roll(np.frombuffer(body, "<f4"), 1).tobytes()
            zout.writestr(info, body)
        zout.comment = zin.comment
    rewrite_trailer(entry)

    cases = [(flipped, "corrupt or was modified: sha256 checksum mismatch"),
             (truncated, "not a FaceMoE gallery export .* or is truncated"),
             (entry, "entry templates/0000003.f32 fails its sha256 checksum")]
    with Gallery(tmp_path / "b.db", *model) as dst:
        dst.enroll("someone", faces["vectors"][:1], ["s"], [0.5])
        before = snapshot(dst)
        for path, message in cases:
            with pytest.raises(GalleryError, match=message) as err:
                dst.import_file(path)
            assert "\n" not in str(err.value)
            assert snapshot(dst) == before


def test_import_of_another_model_refused_unless_reembedded(
        tmp_path: Path, embedder, faces: dict) -> None:
    rng = np.random.default_rng(0)
    with Gallery(tmp_path / "old.db", *OLD_MODEL) as old:
        fill(old, faces, vectors=rng.normal(size=(24, 64)).astype(np.float32))
        old.enroll("no crop", rng.normal(size=(1, 64)), ["legacy.jpg"], [0.5])
        export = Path(old.export(tmp_path / "old.zip").path)

    with Gallery(tmp_path / "new.db", *model_of(embedder)) as dst:
        before = snapshot(dst)
        with pytest.raises(GalleryError, match="holds templates of model old-model@1; this "
                                               "gallery uses tiny-edge@.*--reembed"):
            dst.import_file(export)
        with pytest.raises(GalleryError, match="no crop to re-embed for 1 template.*drop-missing"):
            dst.import_file(export, embedder=embedder)
        assert snapshot(dst) == before
        r = dst.import_file(export, embedder=embedder, drop_missing=True)
        assert (r.identities_added, r.templates_reembedded) == (8, 24)
        assert r.templates_dropped == ["no crop: legacy.jpg"]
        names, mat = dst.matrix()
        assert names == [n for n in faces["names"] for _ in range(PER_ID)]
        np.testing.assert_allclose(mat, embedder.embed_kept(decoded(faces["crops"])), atol=1e-5)

    with Gallery(tmp_path / "other.db", "other", "2") as other:  # embedder of another model
        with pytest.raises(GalleryError, match="embedder's model tiny-edge@.* is not this "
                                               "gallery's other@2"):
            other.import_file(export, embedder=embedder)


# --- model upgrades --------------------------------------------------------------------------

def test_reembed_rebuilds_templates_from_crops(tmp_path: Path, embedder, faces: dict) -> None:
    db = tmp_path / "g.db"
    rng = np.random.default_rng(1)
    with Gallery(db, *OLD_MODEL) as g:
        fill(g, faces, vectors=rng.normal(size=(24, 64)).astype(np.float32))
        g.enroll(faces["names"][0], rng.normal(size=(1, 64)), ["no-crop.jpg"], [0.5])
        before = snapshot(g)
        with pytest.raises(GalleryError, match=r"no stored crop for 1 template of 1 identity "
                                               r"\('celeba:.*'\).*--drop-missing"):
            g.reembed(embedder)
        assert snapshot(g) == before

    with Gallery(db, *model_of(embedder), adopt_model=True) as g:
        assert g.model == "old-model@1"
        r = g.reembed(embedder, drop_missing=True)
        assert (r.model_from, r.model_to, r.templates) == ("old-model@1", embedder.model, 24)
        assert r.dropped == [f"{faces['names'][0]}: no-crop.jpg"]
        assert g.model == embedder.model
    with pytest.raises(GalleryError, match="was built with model tiny-edge"):
        Gallery(db, *OLD_MODEL)
    with Gallery(db, *model_of(embedder), create=False) as g:
        names, mat = g.matrix()
        assert mat.shape == (24, 512) and names[0] == faces["names"][0]
        np.testing.assert_allclose(mat, embedder.embed_kept(decoded(faces["crops"])), atol=1e-5)
        assert [i.templates for i in g.identities()] == [PER_ID] * 8
        assert g.audit()[-1].action == "reembed"


def test_store_crops_setting(tmp_path: Path, embedder, faces: dict) -> None:
    with Gallery(tmp_path / "g.db", *model_of(embedder)) as g:
        g.enroll("kept", faces["vectors"][:2], ["a", "b"], [0.5, 0.5], list(faces["crops"][:2]))
        assert g.set_store_crops(False) == 0
        g.enroll("private", faces["vectors"][2:4], ["c", "d"], [0.5, 0.5],
                 list(faces["crops"][2:4]))
        assert [t.crop is None for t in g.templates("private")] == [True, True]
        assert g.templates("kept")[0].crop is not None
        with pytest.raises(GalleryError, match="no stored crop for 2 templates"):
            g.reembed(embedder)
        assert g.set_store_crops(False, delete_existing=True) == 2
        assert g.info()["templates_with_crops"] == 0
    with Gallery(tmp_path / "g.db", *model_of(embedder)) as g:
        assert g.store_crops is False


# --- privacy ---------------------------------------------------------------------------------

def test_purge_events_by_age(tmp_path: Path, embedder) -> None:
    db = tmp_path / "g.db"
    with Gallery(db, *model_of(embedder)) as g:
        g.add_events([event(i, "alice" if i % 2 else None) for i in range(6)])
    with sqlite3.connect(db) as con:
        con.execute("UPDATE events SET created_at = '2020-01-01 00:00:00.000000' WHERE id <= 4")
    with Gallery(db, *model_of(embedder)) as g:
        with pytest.raises(GalleryError, match="must be >= 0 days"):
            g.purge_events(-1)
        assert g.purge_events(30) == 4
        assert [e.track_id for e in g.events()] == [4, 5]
        assert g.purge_events(30) == 0
        assert g.purge_events(0) == 2
        assert [(a.action, a.detail) for a in g.audit()] == [
            ("purge", "4 events older than 30 days deleted"),
            ("purge", "0 events older than 30 days deleted"),
            ("purge", "2 events older than 0 days deleted")]


def test_remove_deletes_events_and_leaves_nothing_on_disk(
        tmp_path: Path, embedder, real_faces: dict) -> None:
    db = tmp_path / "g.db"
    names = [str(n) for n in real_faces["label_names"]]
    vectors = embedder.embed_kept(list(real_faces["crops"]))
    with Gallery(db, *model_of(embedder)) as g:
        for k, name in enumerate(names):
            idx = np.flatnonzero(real_faces["labels"] == k)
            g.enroll(name, vectors[idx], [f"{name}/{i}" for i in idx], [0.5] * len(idx),
                     list(real_faces["crops"][idx]))
        g.add_events([event(i, names[i % 3]) for i in range(9)])
    with sqlite3.connect(db) as con:
        secrets = [row[0] for row in con.execute(
            "SELECT t.crop FROM templates t JOIN identities i ON i.id = t.identity_id "
            "WHERE i.name = ?", (names[0],))]
        secrets += [row[0] for row in con.execute(
            "SELECT t.vector FROM templates t JOIN identities i ON i.id = t.identity_id "
            "WHERE i.name = ?", (names[0],))]
    # 32-byte pieces of the JPEG bodies and vectors (long blobs span overflow pages)
    pieces = [s[i:i + 32] for s in secrets for i in range(700, len(s) - 32, 400)]
    size_before = db.stat().st_size
    raw = db.read_bytes()
    assert len(secrets) == 24 and sum(p in raw for p in pieces) > 0.9 * len(pieces)

    with Gallery(db, *model_of(embedder)) as g:
        assert g.remove(f"  {names[0]} ") == 3
        assert [i.name for i in g.identities()] == names[1:]
        assert sorted({e.identity for e in g.events()}) == sorted(names[1:3])
        assert g.integrity_check() == "ok"
        raw = db.read_bytes() + (Path(f"{db}-wal").read_bytes()
                                 if Path(f"{db}-wal").exists() else b"")
        assert not any(p in raw for p in pieces)
        assert db.stat().st_size < size_before
        assert g.audit()[-1].detail == "12 templates, 3 events deleted"


def test_audit_log_and_cli(tmp_path: Path, embedder, faces: dict, tiny_model_dir: Path,
                           capsys: pytest.CaptureFixture) -> None:
    from app.cli import main

    db, export = tmp_path / "g.db", tmp_path / "g.zip"
    with Gallery(db, *model_of(embedder)) as g:
        fill(g, faces)
        g.rename(faces["names"][0], "Ann O'Neil")
        g.remove(faces["names"][1])
    config = tmp_path / "app.yaml"
    config.write_text(f"model:\n  dir: {tiny_model_dir}\n  backend: onnxruntime\n"
                      f"gallery:\n  path: {db}\n")
    base = ["--config", str(config), "--json"]

    assert main(["gallery", "export", str(export), *base]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["identities"], out["templates"], out["sha256"]) == (7, 21, verify_export(export))
    assert main(["gallery", "import", str(export), "--gallery", str(tmp_path / "copy.db"),
                 *base]) == 0
    assert json.loads(capsys.readouterr().out)["identities_added"] == 7
    assert main(["gallery", "purge", "--events-older-than", "30", *base]) == 0
    assert json.loads(capsys.readouterr().out)["events_deleted"] == 0
    assert main(["gallery", "import", str(export), *base]) == 1  # names clash
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["gallery", "audit", *base]) == 0
    rows = json.loads(capsys.readouterr().out)["audit"]
    assert [r["action"] for r in rows] == ["enroll"] * 8 + ["rename", "remove", "export", "purge"]
    assert rows[8]["identity"] == faces["names"][0] and "Ann O'Neil" in rows[8]["detail"]
    assert rows[9] == {**rows[9], "identity": faces["names"][1],
                       "detail": "3 templates, 0 events deleted"}
    assert {r["user"] for r in rows} == {getpass.getuser()}
    assert main(["gallery", "settings", "--store-crops", "off", *base]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["store_crops"], info["identities"], info["audit_rows"]) == (False, 7, 13)
    assert main(["gallery", "check", *base]) == 0
    assert json.loads(capsys.readouterr().out)["integrity"] == "ok"


def test_files_are_private(tmp_path: Path, embedder, faces: dict) -> None:
    old = os.umask(0o022)
    try:
        db = tmp_path / "g.db"
        with Gallery(db, *model_of(embedder)) as g:
            fill(g, faces)
            modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("g.db*")}
            assert modes == {"g.db": 0o600, "g.db-wal": 0o600, "g.db-shm": 0o600}
            export = Path(g.export(tmp_path / "g.zip").path)
        assert export.stat().st_mode & 0o777 == 0o600
        assert list(tmp_path.glob(".*.tmp")) == []
    finally:
        os.umask(old)


def test_encryption_at_rest(tmp_path: Path, embedder, faces: dict,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "secret.db"
    key = os.urandom(32)
    monkeypatch.setenv("FACEMOE_GALLERY_KEY", base64.b64encode(key).decode())
    with Gallery(db, *model_of(embedder)) as g:
        fill(g, faces)
        assert g.encrypted and g.info()["encrypted"]
        names, mat = g.matrix()
        export = Path(g.export(tmp_path / "secret.zip").path)
    np.testing.assert_allclose(mat, faces["vectors"], atol=1e-6)
    with sqlite3.connect(db) as con:
        blobs = con.execute("SELECT vector, crop FROM templates").fetchall()
    assert all(len(v) == 512 * 4 + 28 and not c.startswith(b"\xff\xd8") for v, c in blobs)
    raw = db.read_bytes() + Path(f"{db}-wal").read_bytes() if Path(f"{db}-wal").exists() \
        else db.read_bytes()
    assert faces["vectors"][0].astype("<f4").tobytes()[:64] not in raw

    with Gallery(db, *model_of(embedder), create=False) as g:  # key from the environment
        assert g.matrix()[0] == names
        np.testing.assert_array_equal(g.matrix()[1], mat)
        crop = g.templates(faces["names"][0])[0].crop
        np.testing.assert_array_equal(crop, decoded(faces["crops"][:1])[0])

    key_file = tmp_path / "gallery.key"
    key_file.write_text(base64.b64encode(key).decode() + "\n")
    monkeypatch.delenv("FACEMOE_GALLERY_KEY")
    with pytest.raises(GalleryError, match=r"is encrypted: give its key in FACEMOE_GALLERY_KEY"):
        Gallery(db, *model_of(embedder))
    with Gallery(db, *model_of(embedder), key=load_key(key_file)) as g:
        assert g.matrix()[0] == names
    monkeypatch.setenv("FACEMOE_GALLERY_KEY_FILE", str(key_file))
    assert load_key() == key
    monkeypatch.delenv("FACEMOE_GALLERY_KEY_FILE")
    with pytest.raises(GalleryError, match="wrong encryption key"):
        Gallery(db, *model_of(embedder), key=os.urandom(32))
    monkeypatch.setenv("FACEMOE_GALLERY_KEY", "not a key")
    with pytest.raises(GalleryError, match="must be the base64 of 32 random bytes"):
        Gallery(db, *model_of(embedder))
    monkeypatch.delenv("FACEMOE_GALLERY_KEY")

    with Gallery(tmp_path / "plain.db", *model_of(embedder)) as plain:
        with pytest.raises(GalleryError, match="secret.zip is encrypted: give its key"):
            plain.import_file(export)
        plain.enroll("x", faces["vectors"][:1], ["x"], [0.5])
    with pytest.raises(GalleryError, match="plain.db is not encrypted but a key was given"):
        Gallery(tmp_path / "plain.db", *model_of(embedder), key=key)
    with Gallery(tmp_path / "other.db", *model_of(embedder), key=os.urandom(32)) as other:
        with pytest.raises(GalleryError, match="encrypted with another key"):
            other.import_file(export)
    with Gallery(tmp_path / "copy.db", *model_of(embedder), key=key) as copy:
        assert copy.import_file(export).templates_added == 24
        np.testing.assert_array_equal(copy.matrix()[1], mat)
        assert copy.reembed(embedder).templates == 24  # from the encrypted crops
        np.testing.assert_allclose(copy.matrix()[1], embedder.embed_kept(decoded(faces["crops"])),
                                   atol=1e-5)


# --- robustness ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_gallery_bytes(tmp_path_factory, embedder, faces: dict) -> bytes:
    db = tmp_path_factory.mktemp("real") / "g.db"
    with Gallery(db, *model_of(embedder)) as g:
        fill(g, faces)
    assert not Path(f"{db}-wal").exists()  # checkpointed on close: the file is complete
    return db.read_bytes()


@pytest.mark.parametrize("cut", ["header", "half", "last page", "one byte"])
def test_truncated_gallery_refused(tmp_path: Path, embedder, real_gallery_bytes: bytes,
                                   cut: str) -> None:
    data = real_gallery_bytes
    page = int.from_bytes(data[16:18], "big")
    size = {"header": 60, "half": len(data) // 2, "last page": len(data) - page,
            "one byte": len(data) - 1}[cut]
    db = tmp_path / "truncated.db"
    db.write_bytes(data[:size])
    with pytest.raises(GalleryError) as err:
        Gallery(db, *model_of(embedder), create=False)
    message = str(err.value)
    assert "\n" not in message and str(db) in message
    assert "is corrupt: " in message and "truncated" in message
    assert db.read_bytes() == data[:size]


def test_damaged_pages_give_one_line_errors(tmp_path: Path, embedder,
                                            real_gallery_bytes: bytes) -> None:
    data = bytearray(real_gallery_bytes)
    page = int.from_bytes(data[16:18], "big")
    data[page:] = bytes(len(data) - page)  # every page after the first zeroed, size kept
    db = tmp_path / "damaged.db"
    db.write_bytes(bytes(data))
    with pytest.raises(GalleryError) as err:
        with Gallery(db, *model_of(embedder), create=False) as g:
            g.matrix()
    assert "\n" not in str(err.value) and "malformed" in str(err.value)


_CHILD = """
import sys, time
from pathlib import Path
from app.gallery import Gallery
from app.gallery.db import Database
db, export, marker, name, version, what = sys.argv[1:]

def stall(session):  # the last step inside the transaction: everything else is written
    session.flush()
    Path(marker).touch()
    time.sleep(60)

Database.bump_version = staticmethod(stall)
g = Gallery(db, name, version)
if what == "import":
    g.import_file(export)
else:
    import numpy as np
    g.enroll("killed", np.ones((4, 512), np.float32), list("abcd"), [0.5] * 4,
             [np.zeros((112, 112, 3), np.uint8)] * 4)
"""


@pytest.mark.parametrize("what", ["import", "enroll"])
def test_kill_in_the_middle_leaves_gallery_unchanged(tmp_path: Path, embedder, faces: dict,
                                                     what: str) -> None:
    model = model_of(embedder)
    db, export, marker = tmp_path / "g.db", tmp_path / "e.zip", tmp_path / "inside"
    with Gallery(tmp_path / "src.db", *model) as src:
        fill(src, faces)
        src.export(export)
    with Gallery(db, *model) as g:
        g.enroll("resident", faces["vectors"][:2], ["a", "b"], [0.5, 0.5])
        before = snapshot(g)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(export), str(marker),
                              *model, what], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert child.poll() is None, f"child exited early ({child.returncode})"
            assert time.monotonic() < deadline, "child never reached the transaction"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    with Gallery(db, *model, create=False) as g:
        assert snapshot(g) == before
        assert g.integrity_check() == "ok"
        g.enroll("after", faces["vectors"][:1], ["c"], [0.5])  # no lock left behind
        assert [i.name for i in g.identities()] == ["after", "resident"]


def test_failure_inside_transaction_rolls_back(tmp_path: Path, embedder, faces: dict,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_of(embedder)
    with Gallery(tmp_path / "src.db", *OLD_MODEL) as src:
        fill(src, faces, vectors=np.random.default_rng(2).normal(size=(24, 8)))
        export = src.export(tmp_path / "e.zip").path
    with Gallery(tmp_path / "g.db", *model) as g:
        fill(g, faces)
        g.add_events([event(1, faces["names"][0])])
        before = snapshot(g)

        def boom(session) -> None:
            session.flush()
            raise RuntimeError("power cut")

        monkeypatch.setattr(gallery_db.Database, "bump_version", staticmethod(boom))
        for call in (lambda: g.import_file(export, embedder=embedder, on_conflict="merge"),
                     lambda: g.reembed(embedder),
                     lambda: g.remove(faces["names"][0]),
                     lambda: g.rename(faces["names"][0], "x"),
                     lambda: g.enroll("new", faces["vectors"][:2], ["a", "b"], [1, 1])):
            with pytest.raises(RuntimeError, match="power cut"):
                call()
            assert snapshot(g) == before
        assert g.audit()[-1].action == "enroll"  # no audit row of a rolled-back change


_WRITER = """
import sys
import numpy as np
from app.gallery import Gallery
db, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(abs(hash(tag)) % 1000)
with Gallery(db, "m", "1") as g:
    for i in range(n):
        g.enroll(f"{tag}-{i}", rng.normal(size=(2, 32)), ["a", "b"], [0.5, 0.5])
        g.rename(f"{tag}-{i}", f"{tag}-{i}-renamed")
"""


def test_concurrent_writers(tmp_path: Path) -> None:
    db, n = tmp_path / "g.db", 25
    Gallery(db, "m", "1").close()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, str(db), tag, str(n)], cwd=REPO,
                                env=env, stderr=subprocess.PIPE, text=True) for tag in "ab"]
    with Gallery(db, "m", "1") as g:  # and a third writer in this process
        for i in range(n):
            g.add_events([event(i, None)])
    for w in writers:
        assert w.wait(120) == 0, w.stderr.read()
    with Gallery(db, "m", "1") as g:
        names = [i.name for i in g.identities()]
        assert names == sorted(f"{t}-{i}-renamed" for t in "ab" for i in range(n))
        assert g.version() == 4 * n and len(g.events()) == n
        assert len(g.matrix()[0]) == 4 * n and g.integrity_check() == "ok"


def test_locked_database_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(gallery_db, "BUSY_TIMEOUT_MS", 200)
    db = tmp_path / "g.db"
    with Gallery(db, "m", "1") as g:
        g.enroll("first", np.ones((1, 8)), ["a"], [0.5])
        holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock for 0.5 s
        release = threading.Timer(0.5, lambda: holder.execute("COMMIT"))
        release.start()
        with caplog.at_level(logging.WARNING, logger="app.gallery"):
            g.enroll("second", np.ones((1, 8)), ["b"], [0.5])
        release.join()
        holder.close()
        assert [i.name for i in g.identities()] == ["first", "second"]
        assert "locked by another writer; retrying" in caplog.text


ODD = ["Zoë O'Brien", 'say "cheese"', "a/b\\c/../d", "李小龙", "astronaut 👩\u200d🚀",
       "Robert'); DROP TABLE identities;--", "%_*?", "x" * 256]


def test_odd_identity_names(tmp_path: Path, embedder, faces: dict) -> None:
    model, vec = model_of(embedder), faces["vectors"]
    with Gallery(tmp_path / "g.db", *model) as g:
        for k, name in enumerate(ODD):
            g.enroll(name, vec[k:k + 1], [f"{name}.jpg"], [0.5], [faces["crops"][k]])
        g.enroll("Zoe\u0308 O'Brien", vec[9:10], ["nfd.jpg"], [0.5])  # same name, decomposed
        listed = {i.name: i.templates for i in g.identities()}
        assert listed == {**{n: 1 for n in ODD}, "Zoë O'Brien": 2}
        for bad, message in [("", "must not be empty"), (" \t ", "must not be empty"),
                             ("x" * 257, "too long \\(257 characters; at most 256\\)"),
                             ("two\nlines", "contains control characters"),
                             ("nul\x00", "contains control characters")]:
            with pytest.raises(GalleryError, match=message) as err:
                g.enroll(bad, vec[:1], ["s"], [0.5])
            assert "\n" not in str(err.value)
        with pytest.raises(GalleryError, match="no such identity: ''"):
            g.remove("   ")
        g.rename("a/b\\c/../d", "é/\"'")
        export = g.export(tmp_path / "odd.zip").path
        g.remove("Robert'); DROP TABLE identities;--")
        assert len(g.identities()) == len(ODD) - 1
    with Gallery(tmp_path / "copy.db", *model) as copy:
        assert copy.import_file(export).identities_added == len(ODD)
        names = {i.name for i in copy.identities()}
        assert "é/\"'" in names and "x" * 256 in names and "a/b\\c/../d" not in names


def test_events_limit_must_be_positive(tmp_path: Path, no_gallery_key) -> None:
    proc = facemoe("gallery", "events", "--limit", "-5", "--gallery", str(tmp_path / "g.db"))
    assert proc.returncode == 2
    assert "--limit: must be at least 1, got -5" in proc.stderr
