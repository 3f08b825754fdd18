"""What the test modules share: the tiers, the real test data in <repo>/../shared (env
FACEMOE_SHARED overrides; `app.paths.shared`), the face detector, tiny and shipped model
artifacts, training configs, and the one CLI runner (`facemoe`).

Tests that use the shared data skip with a clear reason when the shared folder is absent.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from app import paths

REPO_ROOT = Path(__file__).resolve().parent.parent
YUNET_FILE = "face_detection_yunet_2026may.onnx"
TIERS = ("unit", "contract", "e2e")  # pyproject.toml says what each means


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test is in exactly one tier: its module's `pytestmark` or its own mark says
    which; a test with no tier mark is a unit test, one with two is refused."""
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if not tiers:
            item.add_marker(pytest.mark.unit)
        elif len(tiers) > 1:
            raise pytest.UsageError(
                f"{item.nodeid} is marked {' and '.join(tiers)}: give it one tier of "
                f"{', '.join(TIERS)}"
            )


def facemoe(*args: object, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None,
            timeout: float = 300, script: str | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """`facemoe ARGS` in a new interpreter (`python -m app.cli`, or `python -c script ARGS`)
    run from `cwd` (the checkout) with `env` added to this environment; output captured as
    text; with `check`, a non-zero exit fails the test with the end of stderr. The tests' one
    CLI runner: `from tests.conftest import facemoe`."""
    command = ["-c", script] if script else ["-m", "app.cli"]
    done = subprocess.run([sys.executable, *command, *map(str, args)], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"facemoe {args} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def stop_daemon(daemon: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    """SIGTERM a `facemoe run` started by a test: it must exit 0 within `timeout` seconds (the
    test fails with the end of its log otherwise)."""
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout) == 0, log.read_text()[-3000:]


def kill_daemon(daemon: subprocess.Popen) -> None:
    """In a test's `finally`: a daemon still running (the test failed before stopping it) is
    killed and reaped."""
    if daemon.poll() is None:
        daemon.kill()
        daemon.wait(5)


def open_fds() -> int:
    """How many file descriptors this process holds now (after a garbage collection)."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def plant_symlinks(directory: Path, names: list[str], victim: Path) -> None:
    """Symlinks to `victim` at `names` in `directory`: what an attacker plants where a writer
    might put its temporary (a writer that follows one overwrites the victim)."""
    for name in names:
        (directory / name).symlink_to(victim)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set FACEMOE_SHARED to the shared folder)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder: $FACEMOE_SHARED, else <repo>/../shared."""
    return _need(paths.shared(), "shared data folder")


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    """<shared>/data (videos/, lfw/, celeba299/, ...)."""
    return _need(shared_dir / "data", "shared data")


@pytest.fixture(scope="session")
def models_dir(shared_dir: Path) -> Path:
    """<shared>/models."""
    return _need(shared_dir / "models", "shared models")


@pytest.fixture(scope="session")
def yunet_path(models_dir: Path) -> Path:
    """The YuNet face detector ONNX file."""
    return _need(models_dir / YUNET_FILE, "YuNet detector")


@pytest.fixture(scope="module")
def detector(yunet_path: Path):
    """The app's face detector (`app.detect`) as the config type's defaults make it, on the
    shared YuNet file; one per test module (it counts the second looks it takes)."""
    from app.config import DetectorConfig
    from app.detect import create_detector

    return create_detector(DetectorConfig(model=str(yunet_path)))


TINY_ARCH = dict(depth=1, dim=48, heads=2, stem_width=8)


@pytest.fixture(scope="module")
def models():
    """(detector, embedder) of the default config (the shipped model), once per module."""
    from app.config import load_config
    from app.runtime import make_detector, make_embedder

    cfg = load_config(None)
    return make_detector(cfg), make_embedder(cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir: Path) -> Path:
    """The web tests' gallery (`tests.web_helpers.build_gallery`: the CLI enrolls and processes
    real clips), built once per module that asks for it."""
    from tests.web_helpers import built_gallery

    return built_gallery(tmp_path_factory.mktemp("web"), data_dir)


@pytest.fixture
def db(built: Path, tmp_path: Path) -> Path:
    """A copy of the built gallery that a test may change."""
    copy = tmp_path / "gallery.db"
    shutil.copy(built, copy)
    return copy


@pytest.fixture(scope="session")
def real_faces(data_dir: Path) -> dict:
    """96 real training-pool faces (CelebA, 8 identities x 12) aligned by the app's aligner,
    with their dlib teacher targets: crops uint8[96,112,112,3], teacher float32[96,128], labels."""
    import numpy as np

    from app.align import align_face

    t = np.load(data_dir / "teacher" / "dlib_resnet_v1.npz")
    ids = dict(
        line.split()
        for line in (data_dir / "celeba299" / "identities.txt").read_text().splitlines()
    )
    by_id: dict[str, list[int]] = {}
    for i, p in enumerate(t["paths"]):
        if str(p).startswith("celeba299/"):
            by_id.setdefault(ids[Path(str(p)).name], []).append(i)
    chosen = sorted(k for k, v in by_id.items() if len(v) >= 12)[:8]
    rows = [i for k in chosen for i in by_id[k][:12]]
    import cv2

    crops = np.stack(
        [
            align_face(cv2.imread(str(data_dir / t["paths"][i])), t["landmarks"][i].reshape(5, 2))
            for i in rows
        ]
    )
    labels = np.repeat(np.arange(len(chosen)), 12)
    return {
        "crops": crops,
        "teacher": t["embeddings"][rows].astype(np.float32),
        "labels": labels,
        "label_names": np.array([f"celeba:{k}" for k in chosen]),
        "paths": t["paths"][rows],
    }


def tiny_artifact(out: Path, seed: int = 0, version: str = "0", **arch) -> Path:
    """A randomly initialised (seeded), tiny facemoe-edge artifact at `out`; `arch` overrides."""
    import torch

    from trainer.artifact import save_artifact
    from trainer.models import create_model, model_config

    torch.manual_seed(seed)
    cfg = {**TINY_ARCH, **arch}
    model = create_model("facemoe-edge", **cfg).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval differs from identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(seed + 1)
    return save_artifact(
        model, model_config("facemoe-edge", **cfg), out, name="tiny-edge", version=version
    )


def metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of a training run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised, tiny facemoe-edge artifact (for fast export/backend tests)."""
    return tiny_artifact(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The shipped default model (committed in the repository; the app config's default)."""
    from app.config import ModelConfig

    path = REPO_ROOT / ModelConfig().dir
    assert (path / "manifest.json").is_file(), f"the default model is missing at {path}"
    return path


@pytest.fixture
def no_gallery_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain (unencrypted) galleries, whatever key the environment holds."""
    monkeypatch.delenv("FACEMOE_GALLERY_KEY", raising=False)
    monkeypatch.delenv("FACEMOE_GALLERY_KEY_FILE", raising=False)


@pytest.fixture()
def tiny_config(tmp_path, real_faces):
    """A two-step training config for the tiny architecture on `real_faces` (pool in tmp_path)."""
    pool = tmp_path / "pool.npz"
    np.savez(pool, **real_faces)
    cfg = {
        "model": {"name": "facemoe-edge", "overrides": TINY_ARCH},
        "data": {"pool": str(pool), "val_identities": 2},
        "optim": {"epochs": 1, "batch_size": 32, "warmup_steps": 1},
        "loss": {"w_id": 0.5, "rkd_memory": 48},  # cross-batch relations from step 2 on
        "run": {"out_dir": str(tmp_path / "run"), "log_every": 1, "threads": 2},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def dlib_dat() -> Path:
    """dlib's face network file as install.sh installs it (train extra)."""
    from trainer.importers.dlib import default_dat

    try:
        return default_dat()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def dlib_parity(data_dir: Path) -> dict:
    """32 dlib chips (RGB) of LFW training identities with dlib's own descriptors."""
    d = np.load(_need(data_dir / "dlib_parity" / "dlib_v1_chips.npz", "dlib parity chips"))
    return {"chips": d["chips"], "descriptors": d["descriptors"]}


@pytest.fixture(scope="session")
def dlib_model_dir(tmp_path_factory, dlib_dat: Path) -> Path:
    """`facemoe import dlib` of the installed file, into a temporary artifact."""
    from trainer.importers.dlib import import_dlib

    return import_dlib(tmp_path_factory.mktemp("dlib") / "dlib-resnet-v1", dlib_dat)
