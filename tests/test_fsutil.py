"""Files of faces and events are private from the folder down: folders the product makes for
them are 0700, the files 0600; folders that already exist keep their permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from app.fsutil import atomic_write, make_dirs
from app.gallery import Gallery
from tests.conftest import plant_symlinks

pytestmark = pytest.mark.unit


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(autouse=True)
def _umask():
    old = os.umask(0o022)  # the usual default: without the fix, new folders are 0755
    yield
    os.umask(old)


def test_private_write_makes_private_folders(tmp_path):
    target = tmp_path / "a" / "b" / "face.jpg"
    with atomic_write(target) as fh:
        fh.write(b"x")
    assert target.read_bytes() == b"x"
    assert _mode(target) == 0o600
    assert _mode(tmp_path / "a") == 0o700 and _mode(tmp_path / "a" / "b") == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["face.jpg"]  # no temporary left


def test_public_write_makes_ordinary_folders(tmp_path):
    target = tmp_path / "c" / "report.json"
    with atomic_write(target, 0o644) as fh:
        fh.write(b"{}")
    assert _mode(target) == 0o644 and _mode(tmp_path / "c") == 0o755


def test_existing_folders_keep_their_permissions(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    make_dirs(shared / "new")
    assert _mode(shared) == 0o755 and _mode(shared / "new") == 0o700


def test_a_new_gallery_in_a_new_folder_is_private(tmp_path):
    path = tmp_path / "var" / "facemoe" / "gallery.db"
    Gallery(path, "m", "1", create=True).close()
    assert _mode(path) == 0o600
    assert _mode(tmp_path / "var") == 0o700 and _mode(tmp_path / "var" / "facemoe") == 0o700


def test_manifest_write_does_not_follow_a_planted_temporary(tmp_path: Path) -> None:
    from trainer.manifest import write_json_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    plant_symlinks(tmp_path, ["manifest.json.tmp"], victim)
    write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "manifest.json").read_text() == '{\n  "a": 1\n}\n'
