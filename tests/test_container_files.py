"""The container files agree with the rest of the repository (no podman needed; the image itself
is built and run by tests/test_container.py): the image has every Debian package install.sh
installs, compose.yaml's mounted config is valid, and the build context leaves out what git
ignores under models/ (install.sh derives it in the build)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from app.config import AppConfig, ModelConfig
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.unit

def install_sh_debs() -> set[str]:
    text = (REPO_ROOT / "install.sh").read_text()
    return set(re.search(r"^debs=\((.*?)\)", text, re.S | re.M).group(1).split())


def test_the_image_has_install_sh_debian_packages():
    """install.sh would install a missing one itself in the build, uncached and unchecked."""
    apt = (REPO_ROOT / "Dockerfile").read_text().split("--no-install-recommends", 1)[1]
    image = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", apt.split("&&", 1)[0]))
    assert install_sh_debs() <= image, sorted(install_sh_debs() - image)


def test_compose_services_and_mounted_config(monkeypatch: pytest.MonkeyPatch):
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"facemoe", "review", "mosquitto"}
    assert services["facemoe"]["command"][0] == "run"
    assert services["review"]["command"][0] == "serve"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["facemoe"]["volumes"]}
    config = REPO_ROOT / mounts["/etc/facemoe/app.yaml"]
    assert mounts["/data"] == "facemoe-data" and "facemoe-data" in compose["volumes"]
    for name in services["facemoe"]["environment"]:
        monkeypatch.setenv(name, "x")
    cfg = AppConfig.model_validate(yaml.safe_load(config.read_text()))
    assert cfg.daemon.metrics_port == 9464  # the image's HEALTHCHECK port (FACEMOE_HEALTH_PORT)
    assert cfg.daemon.metrics_host == "0.0.0.0" and cfg.daemon.mqtt.host == "x"
    assert (REPO_ROOT / services["mosquitto"]["build"] / "Dockerfile").is_file()


def test_build_context_leaves_out_derived_models():
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {"models/detector", "models/*/model*.onnx", ".venv", ".git"} <= ignored


def test_sections_a_config_leaves_out_resolve_against_the_home(tmp_path, monkeypatch):
    """The daemon container's config may name only cameras: the default model is still found
    (the shipped one) and the gallery is made in the home (the volume), whatever the working
    directory."""
    monkeypatch.setenv("FACEMOE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = AppConfig.model_validate({"cameras": [{"name": "c", "uri": "rtsp://h/s"}]})
    assert Path(cfg.model.dir) == REPO_ROOT / ModelConfig().dir
    assert (Path(cfg.model.dir) / "manifest.json").is_file()
    assert Path(cfg.gallery.path) == tmp_path / "gallery.db"
