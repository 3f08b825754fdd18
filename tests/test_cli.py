"""The command line as a user meets it: quiet by default, gallery commands that do not load the
model, failures that end with the one-line error, one version."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import app
from app.gallery import Gallery
from tests.conftest import facemoe
from tests.gallery_helpers import event
from trainer.manifest import model_id, read_manifest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
# Runs the CLI, then reports on stderr any module of the model runtime that got imported.
_RUN_AND_REPORT = """
import sys
from app.cli import main
rc = main(sys.argv[1:])
loaded = [m for m in ("onnxruntime", "engine.backends", "app.embed", "torch") if m in sys.modules]
if loaded:
    print(f"model runtime loaded: {loaded}", file=sys.stderr)
sys.exit(rc)
"""


@pytest.fixture
def gallery_db(tmp_path: Path, default_model_dir: Path, no_gallery_key: None) -> Path:
    """A gallery of the shipped model (its id from the manifest) with one identity, one event."""
    db = tmp_path / "g.db"
    rng = np.random.default_rng(0)
    dim = int(read_manifest(default_model_dir)["embedding_dim"])
    with Gallery(db, *model_id(read_manifest(default_model_dir))) as g:
        g.enroll("Ada", rng.normal(size=(2, dim)), ["a.jpg", "b.jpg"], [0.9, 0.8])
        g.add_events([event(1, "Ada")])
    return db


@pytest.mark.slow
def test_gallery_commands_do_not_load_the_model(gallery_db: Path, tmp_path: Path) -> None:
    actions = [["list"], ["events"], ["audit"], ["settings"], ["check"],
               ["export", tmp_path / "g.zip"], ["purge", "--events-older-than", "30"],
               ["rename", "Ada", "Ada L"], ["remove", "Ada L"], ["import", tmp_path / "g.zip"]]
    for action in actions:
        done = facemoe("gallery", *action, "--gallery", gallery_db, script=_RUN_AND_REPORT)
        assert done.returncode == 0, done.stderr
        assert done.stderr == "", f"gallery {action[0]}: {done.stderr}"
        if action == ["list"]:
            assert done.stdout.startswith("Ada\t2\t")


def test_failure_ends_with_the_one_line_error(gallery_db: Path) -> None:
    done = facemoe("gallery", "remove", "Nobody", "--gallery", gallery_db)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["facemoe: error: no such identity: 'Nobody'"]


@pytest.mark.slow
def test_commands_are_quiet_unless_verbose(tmp_path: Path, default_model_dir: Path,
                                           data_dir: Path, no_gallery_key: None) -> None:
    from app.embed import Embedder

    Embedder.from_config(str(default_model_dir), "onnxruntime")  # any ONNX export happens here
    photo, db = data_dir / "videos" / "obama-240p.jpg", tmp_path / "g.db"
    done = facemoe("enroll", "Barack Obama", photo, "--gallery", db)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no OpenCV warning, no info about backends or TensorRT
    done = facemoe("-v", "enroll", "Barack Obama", photo, "--gallery", db)
    assert done.returncode == 0, done.stderr
    assert " INFO app.gallery.identities: enrolled 1 template(s)" in done.stderr
    assert "TensorRT" not in done.stderr and "WARN" not in done.stderr


def test_version_is_the_release_in_one_place() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "app.__version__"}
    done = facemoe("--version")
    assert (done.returncode, done.stdout) == (0, f"facemoe {app.__version__}\n")


def test_process_refuses_directory_targets_before_work(tmp_path: Path, data_dir: Path) -> None:
    import subprocess
    import sys

    clip = data_dir / "videos" / "short_hamilton_clip.mp4"
    for flag in ("--annotate", "--events"):
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "process", str(clip), flag, str(tmp_path),
             "--gallery", str(tmp_path / "none.db")],
            capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).resolve().parent.parent)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"facemoe: error: {flag} {tmp_path} is a directory; give a file name"]


@pytest.mark.slow
def test_key_file_is_accepted_where_the_key_is_needed(tmp_path: Path, data_dir: Path,
                                                      monkeypatch) -> None:
    import base64

    monkeypatch.delenv("FACEMOE_GALLERY_KEY", raising=False)
    monkeypatch.delenv("FACEMOE_GALLERY_KEY_FILE", raising=False)
    key = tmp_path / "key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    db = str(tmp_path / "g.db")
    videos = data_dir / "videos"
    done = facemoe("enroll", "Barack Obama", str(videos / "obama.jpg"), "--gallery", db,
                "--key-file", str(key), timeout=300)
    assert done.returncode == 0, done.stderr
    for argv in (["gallery", "list"], ["gallery", "events"], ["gallery", "check"],
                 ["gallery", "rename", "Barack Obama", "Obama"]):
        done = facemoe(*argv, "--gallery", db, "--key-file", str(key))
        assert done.returncode == 0, (argv, done.stderr)
    done = facemoe("gallery", "list", "--gallery", db)
    assert done.returncode == 1 and "encrypted" in done.stderr
    done = facemoe("process", str(videos / "intel_head-pose-face-detection-female.mp4"),
                "--gallery", db, "--key-file", str(key), "--no-progress", timeout=300)
    assert done.returncode == 0, done.stderr
    config = tmp_path / "daemon.yaml"
    config.write_text(f"gallery:\n  path: {db}\ncameras:\n  - name: door\n    uri: "
                      f"{videos / 'intel_head-pose-face-detection-female.mp4'}\n")
    done = facemoe("run", "--validate-config", "--config", str(config), "--key-file", str(key))
    assert done.returncode == 0, done.stderr
