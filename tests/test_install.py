"""Where the default config, model and detector come from (app/paths.py), in the checkout and in
a non-editable install: a wheel built from this repository, installed into a folder and run from
outside the repository, finds its shipped config, model and detector and enrolls a real photo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from app import paths
from app.config import ModelConfig, load_config
from app.yunet import DETECTOR_FILE

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ModelConfig().dir  # models/sface


@pytest.fixture
def no_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACEMOE_HOME", raising=False)


def test_checkout_resolves_against_itself(no_home: None) -> None:
    assert paths.CHECKOUT == REPO_ROOT
    assert paths.home() == paths.shipped() == REPO_ROOT
    assert paths.default_config() == REPO_ROOT / "configs" / "app.yaml"
    assert paths.resolve("gallery.db") == REPO_ROOT / "gallery.db"
    assert paths.resolve(DEFAULT_MODEL) == REPO_ROOT / DEFAULT_MODEL
    assert Path(load_config().model.dir) == REPO_ROOT / DEFAULT_MODEL


def test_home_comes_before_the_shipped_files(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEMOE_HOME", str(tmp_path))
    # nothing in the home yet: the shipped config and model; new files go to the home
    assert paths.default_config() == REPO_ROOT / "configs" / "app.yaml"
    cfg = load_config()
    assert Path(cfg.model.dir) == REPO_ROOT / DEFAULT_MODEL
    assert Path(cfg.gallery.path) == tmp_path / "gallery.db"
    assert paths.resolve("/abs/x.db") == Path("/abs/x.db")
    assert paths.resolve("~/x.db") == Path.home() / "x.db"
    # the user's own config and model in the home are taken instead
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "app.yaml").write_text(f"model: {{dir: {DEFAULT_MODEL}}}\n")
    (tmp_path / DEFAULT_MODEL).mkdir(parents=True)
    assert paths.default_config() == tmp_path / "configs" / "app.yaml"
    assert Path(load_config().model.dir) == tmp_path / DEFAULT_MODEL


def test_installed_copy_home_is_the_user_data_dir(tmp_path: Path, no_home: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "CHECKOUT", None)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert paths.home() == tmp_path / "facemoe"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert paths.home() == Path.home() / ".local" / "share" / "facemoe"
    assert paths.shipped() == REPO_ROOT / "app" / paths.SHIPPED_DIR


def _tracked_copy(dest: Path) -> Path:
    """The repository's files as git sees them (tracked and new, not ignored: no venv, no
    derived model.onnx, no detector copy), copied to dest."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("needs the repository's git checkout to know which files are the source")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO_ROOT / rel
        if src.is_file() and not src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _call(args, **kwargs) -> str:
    """Run a command; its stdout, or a failure that shows the end of its stderr."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{args[:3]}...: {done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_install_finds_config_model_and_detector(tmp_path: Path, shared_dir: Path,
                                                       data_dir: Path) -> None:
    """~25 s on 2 busy cores: the build and install take ~3 s, the first embedding exports the
    shipped weights to ONNX (torch), the CLI calls import the app."""
    photo = data_dir / "deepface_pairs"
    src = _tracked_copy(tmp_path / "src")
    # the default model is an imported ONNX graph that install.sh makes (SFace from PyPI):
    # the checkout a wheel is built from has run install.sh
    onnx = REPO_ROOT / DEFAULT_MODEL / "model.onnx"
    if not onnx.is_file():
        pytest.skip(f"{onnx} is made by install.sh")
    shutil.copy2(onnx, src / DEFAULT_MODEL / "model.onnx")
    env = {**os.environ, "FACEMOE_SHARED": str(shared_dir)}  # the build takes YuNet from there
    _call([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
           "-w", str(tmp_path / "dist"), str(src)], env=env)
    (wheel,) = (tmp_path / "dist").glob("facemoe_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ("app/_shipped/configs/app.yaml", f"app/_shipped/{DEFAULT_MODEL}/manifest.json",
                 f"app/_shipped/{DEFAULT_MODEL}/model.onnx",  # an ONNX-only artifact
                 f"app/_shipped/models/detector/{DETECTOR_FILE}",
                 "app/_shipped/models/detector/LICENSE_YuNet_MIT.txt",
                 "app/gallery/migrations/env.py", "app/gallery/migrations/script.py.mako",
                 "app/web/templates/base.html", "app/web/static/style.css"):
        assert need in names, f"{need} is not in the wheel"
    assert any(n.startswith("app/gallery/migrations/versions/") for n in names)
    # only the default model's own graph: derived exports (model*.onnx of weights) stay out
    assert [n for n in names if n.endswith(".onnx") and "detector" not in n] == [
        f"app/_shipped/{DEFAULT_MODEL}/model.onnx"]

    site = tmp_path / "site"
    _call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
           "--target", str(site), str(wheel)])
    run_dir, home = tmp_path / "elsewhere", tmp_path / "home"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("FACEMOE_SHARED", "FACEMOE_DETECTOR", "FACEMOE_HOME")}
    env |= {"PYTHONPATH": str(site), "XDG_DATA_HOME": str(home)}

    def run(*args: str) -> str:
        return _call(args, cwd=run_dir, env=env)

    shown = json.loads(run(sys.executable, "-c", (
        "import json, app; from app import paths; from app.config import load_config;"
        "from app.yunet import find_detector_model; c = load_config();"
        "print(json.dumps({'app': app.__file__, 'config': str(paths.default_config()),"
        " 'model': c.model.dir, 'gallery': c.gallery.path,"
        " 'detector': str(find_detector_model(c.detector.model))}))")))
    shipped = site / "app" / "_shipped"
    assert shown == {"app": str(site / "app" / "__init__.py"),
                     "config": str(shipped / "configs" / "app.yaml"),
                     "model": str(shipped / DEFAULT_MODEL),
                     "gallery": str(home / "facemoe" / "gallery.db"),
                     "detector": str(shipped / "models" / "detector" / DETECTOR_FILE)}

    facemoe = str(site / "bin" / "facemoe")
    assert run(facemoe, "--version").split()[0] == "facemoe"
    enrolled = json.loads(run(facemoe, "enroll", "Alice", str(photo / "img1.jpg"), "--json"))
    assert enrolled["name"] == "Alice" and enrolled["templates"] == 1, enrolled
    assert (home / "facemoe" / "gallery.db").is_file()
    found = json.loads(run(facemoe, "recognize", str(photo / "img2.jpg"), "--json"))
    assert [f["identity"] for f in found["images"][0]["faces"]] == ["Alice"]


def test_systemd_unit_bounds_descriptors() -> None:
    unit = (Path(__file__).resolve().parent.parent / "deploy" / "facemoe.service").read_text()
    assert "\nLimitNOFILE=" in unit
