"""The command line as a user meets it: quiet by default, gallery commands that do not load the
model, failures that end with the one-line error, one version."""

from __future__ import annotations

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
