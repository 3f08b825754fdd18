"""Issue 22's lower items, each as the attack or mistake that got through before: look-alike
names, templates of release 0.2 without checksums, a photo path that is not UTF-8, a camera
name that injects a line, and `run --validate-config` saying ok to what `run` refuses."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.gallery import Gallery, GalleryError
from tests.gallery_helpers import unit

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_gallery_key")]


@pytest.mark.parametrize("name, message", [
    ("ada", "looks like the existing 'Ada'"),
    ("ADA ", "looks like the existing 'Ada'"),
    ("\uff21\uff44\uff41", "uses compatibility characters"),  # fullwidth Ａｄａ
    ("Ada\u3164", r"invisible filler characters \(U\+3164\)"),  # Hangul filler
    ("\u3164", "invisible filler characters"),
    ("Ada\u3000L", "uses compatibility characters"),  # ideographic space
])
def test_look_alike_names_are_refused(tmp_path: Path, name: str, message: str) -> None:
    rng = np.random.default_rng(0)
    with Gallery(tmp_path / "g.db", "m", "1") as g:
        g.enroll("Ada", unit(rng, 1, 8), ["a"], [0.9])
        g.enroll("Bob", unit(rng, 1, 8), ["b"], [0.9])
        with pytest.raises(GalleryError, match=message):
            g.enroll(name, unit(rng, 1, 8), ["x"], [0.9])
        with pytest.raises(GalleryError, match=message):
            g.rename("Bob", name)
        g.rename("Ada", "ADA")  # its own name in another case is fine
        g.enroll("Zoë Ünal", unit(rng, 1, 8), ["z"], [0.9])  # letters of other scripts too
        g.enroll("김민준", unit(rng, 1, 8), ["k"], [0.9])
        assert [i.name for i in g.identities()] == ["ADA", "Bob", "Zoë Ünal", "김민준"]


def test_templates_of_release_0_2_get_checksums(tmp_path: Path) -> None:
    """A gallery of 0.2 (no checksums) is upgraded with them, so a 2-bit flip in a vector is
    found by `gallery check` (before: it passed)."""
    db = tmp_path / "g.db"
    rng = np.random.default_rng(1)
    with Gallery(db, "m", "1") as g:
        g.enroll("Ada", unit(rng, 3, 64), ["a", "b", "c"], [0.9] * 3)
    with sqlite3.connect(db) as c:  # as 0.2 / 0.3 left it
        c.execute("update templates set checksum = null")
        c.execute("update alembic_version set version_num = '0002'")
        c.execute("drop table if exists identity_names")
        c.execute("drop table if exists erasures")
    with Gallery(db, "m", "1", create=False) as g:
        assert g.verify() == []
    with sqlite3.connect(db) as c:
        assert c.execute("select count(*) from templates where checksum is null").fetchone() == (0,)
        assert c.execute("select name from identity_names").fetchall() == [("Ada",)]
        tid, blob = c.execute("select id, vector from templates order by id limit 1").fetchone()
        flipped = bytearray(blob)
        flipped[0] ^= 0x01
        flipped[4] ^= 0x01  # two low mantissa bits: still a unit vector within tolerance
        c.execute("update templates set vector = ? where id = ?", (bytes(flipped), tid))
    with Gallery(db, "m", "1", create=False) as g:
        assert [(p.template_id, p.problem) for p in g.verify()] == [(tid, "checksum mismatch")]


def test_the_migration_finds_old_names_in_the_audit_log(tmp_path: Path) -> None:
    """Renames and merges made before names were recorded are found in the audit log, so an
    erasure after the upgrade still finds the old names."""
    db = tmp_path / "g.db"
    rng = np.random.default_rng(2)
    with Gallery(db, "m", "1") as g:
        for name in ("Ada", "Bob", "Cy"):
            g.enroll(name, unit(rng, 1, 8), [name], [0.9])
        g.rename("Ada", "Ada L")
        g.rename("Ada L", "Ada K")
        g.merge_identities("Bob", "Ada K")
    with sqlite3.connect(db) as c:
        c.execute("update alembic_version set version_num = '0002'")
        c.execute("drop table if exists identity_names")
        c.execute("drop table if exists erasures")
    with Gallery(db, "m", "1", create=False):
        pass
    with sqlite3.connect(db) as c:
        rows = c.execute("select i.name, n.name from identity_names n join identities i "
                         "on i.id = n.identity_id order by 1, 2").fetchall()
    assert rows == [("Ada K", "Ada"), ("Ada K", "Ada K"), ("Ada K", "Ada L"), ("Ada K", "Bob"),
                    ("Cy", "Cy")]


@pytest.mark.slow
def test_a_photo_path_that_is_not_utf8_enrolls(tmp_path: Path, data_dir: Path,
                                               capsys) -> None:
    """Before: a UnicodeEncodeError traceback when the source was stored."""
    photo = tmp_path / "\udcff.png"  # the byte 0xff as Python names it
    shutil.copy(data_dir / "videos" / "alex-lacamoire.png", photo)
    db = tmp_path / "g.db"
    assert main(["enroll", "Alex", str(photo), "--gallery", str(db)]) == 0
    assert "enrolled 'Alex': 1 template(s)" in capsys.readouterr().out
    assert main(["gallery", "templates", "Alex", "--gallery", str(db)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("\\xff.png")


@pytest.mark.parametrize("camera", ["cam\nX", "cam\rX", "cam\u2028X", "cam\u202eX", ""])
def test_a_camera_name_that_breaks_a_line_is_refused(tmp_path: Path, data_dir: Path,
                                                     camera: str, capsys) -> None:
    """`process --camera $'cam\\nX'` injected a line into `gallery events`."""
    video = data_dir / "videos" / "intel_face-demographics-walking.mp4"
    assert main(["process", str(video), "--camera", camera, "--allow-empty-gallery",
                 "--gallery", str(tmp_path / "g.db")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--camera: a camera name is 1 to 256 printable" in err


def test_validate_config_refuses_what_run_refuses(tmp_path: Path, capsys) -> None:
    """Before: `run --validate-config` said ok, then `run` refused at start."""
    cases = {
        "gallery:\n  path: g.db\n": "no enabled camera",
        "cameras:\n  - {name: door, uri: /dev/video0}\ndaemon:\n  web: true\n"
        "  metrics_port: 8080\n  metrics_host: 0.0.0.0\n": "serving on 0.0.0.0 needs auth",
        f"cameras:\n  - {{name: door, uri: /dev/video0}}\ndaemon:\n  jsonl:\n"
        f"    path: {tmp_path}\n": "it is a directory",
    }
    for k, (text, message) in enumerate(cases.items()):
        config = tmp_path / f"c{k}.yaml"
        config.write_text(text)
        assert main(["run", "--config", str(config), "--validate-config"]) == 1, text
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    ok = tmp_path / "ok.yaml"
    ok.write_text("cameras:\n  - {name: door, uri: /dev/video0}\n")
    assert main(["run", "--config", str(ok), "--validate-config"]) == 0


def test_a_moved_template_and_a_corrupted_crop_are_found(tmp_path: Path) -> None:
    """A template moved to another person outside FaceMoE would make recognition name the
    wrong person, and a bit flipped in a stored crop still decodes: both passed `gallery
    check` before; now both are reported and the moved one is left out of matching."""
    db = tmp_path / "g.db"
    rng = np.random.default_rng(3)
    crops = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2)]
    with Gallery(db, "m", "1") as g:
        g.enroll("Ada", unit(rng, 2, 16), ["a", "b"], [0.9] * 2, crops)
        g.enroll("Bob", unit(rng, 1, 16), ["c"], [0.9])
        g.merge_identities("Bob", "Ada")  # a move FaceMoE makes is no problem
        assert g.verify() == []
        g.enroll("Cy", unit(rng, 1, 16), ["d"], [0.9])
    with sqlite3.connect(db) as c:
        ada, cy = (c.execute("select id from identities where name = ?", (n,)).fetchone()[0]
                   for n in ("Ada", "Cy"))
        moved = c.execute("select id from templates where identity_id = ? order by id limit 1",
                          (ada,)).fetchone()[0]
        c.execute("update templates set identity_id = ? where id = ?", (cy, moved))
        tid, crop = c.execute("select id, crop from templates where crop is not null "
                              "and id != ? limit 1", (moved,)).fetchone()
        flipped = bytearray(crop)
        flipped[len(flipped) // 2] ^= 0x10  # in the entropy-coded data: still decodes
        c.execute("update templates set crop = ? where id = ?", (bytes(flipped), tid))
    with Gallery(db, "m", "1", create=False) as g:
        problems = {(p.identity, p.template_id, p.problem.split(" (")[0]) for p in g.verify()}
        assert problems == {("Cy", moved, "belongs to another identity"),
                            ("Ada", tid, "crop checksum mismatch")}
        names, _ = g.matrix()
        assert names.count("Cy") == 1 and len(names) == 3  # the moved template is left out
