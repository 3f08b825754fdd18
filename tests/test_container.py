"""The container image (Dockerfile), built with podman and run on the shared data: Lin-Manuel
Miranda is enrolled and the Hamilton clip processed inside the container, with the events
written to the mounted volume; the daemon container on a looped file camera answers /healthz
(its HEALTHCHECK passes), writes an event naming him and exits 0 on SIGTERM.

The image is built by `.ci/container.sh` (podman, runc and a debootstrapped
debian:bookworm-slim base, as ../shared/STACK.md describes; layers are reused, so a second build
of unchanged code takes seconds). The module skips where podman is not installed; where it is,
a failing build or run fails."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

IMAGE = os.environ.get("FACEMOE_IMAGE", "localhost/facemoe-edge:latest")
UID = 1000  # the image's user (Dockerfile)
PERSON = "Lin-Manuel Miranda"


def _env() -> dict[str, str]:
    return {"CONTAINERS_CONF": str(REPO_ROOT / ".ci" / "containers.conf"), **os.environ}


def podman(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"podman {' '.join(args)}: {done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def image(data_dir: Path) -> str:
    """The image of this checkout, built (or found up to date) by .ci/container.sh."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (`.ci/container.sh setup` installs it from Debian)")
    for step in ("base", "build"):
        done = subprocess.run([str(REPO_ROOT / ".ci" / "container.sh"), step], env=_env(),
                              capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, f".ci/container.sh {step}:\n{done.stderr[-4000:]}"
    return IMAGE


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder mounted as the container's /data, writable by the image's user."""
    path = tmp_path_factory.mktemp("container") / "data"
    path.mkdir()
    path.chmod(0o777)
    return path


def run(image: str, volume: Path, videos: Path, *args: str) -> subprocess.CompletedProcess:
    """`facemoe ARGS` in a throwaway container: no network, a read-only root file system, the
    volume as /data and the shared videos read-only as /videos."""
    return podman("run", "--rm", "--network", "none", "--read-only",
                  "-v", f"{volume}:/data", "-v", f"{videos}:/videos:ro", image, *args)


@pytest.fixture(scope="module")
def enrolled(image: str, volume: Path, data_dir: Path) -> Path:
    """Lin-Manuel Miranda enrolled from his photo by `facemoe enroll` in the container."""
    done = run(image, volume, data_dir / "videos",
               "enroll", PERSON, "/videos/lin-manuel-miranda.png", "--json")
    report = json.loads(done.stdout)
    assert report["name"] == PERSON and report["templates"] == 1, report
    gallery = volume / "gallery.db"  # FACEMOE_HOME=/data: the config's relative gallery path
    assert gallery.is_file() and gallery.stat().st_uid == UID  # written by the non-root user
    return volume


def identities(jsonl: Path) -> list[str | None]:
    if not jsonl.exists():
        return []
    return [json.loads(line)["identity"] for line in jsonl.read_text().splitlines() if line]


def test_process_in_the_container_names_the_enrolled_person(image, enrolled, data_dir):
    done = run(image, enrolled, data_dir / "videos", "process",
               "/videos/short_hamilton_clip.mp4", "--events", "/data/events.jsonl", "--json")
    summary = json.loads(done.stdout)
    events = enrolled / "events.jsonl"
    names = identities(events)
    assert PERSON in names and summary["identified"] == [PERSON], (summary, names)
    assert summary["frames"] == 275 and summary["backend"] == "onnxruntime", summary
    assert events.stat().st_uid == UID


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthz(port: int) -> tuple[int, dict] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
    except OSError:
        return None


def wait_for(what: str, ready, timeout: float, container: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := ready()):
            return got
        state = podman("inspect", "-f", "{{.State.Status}}", container).stdout.strip()
        assert state == "running", f"container {state} before {what}:\n" + podman(
            "logs", container, check=False).stderr[-3000:]
        time.sleep(0.5)
    pytest.fail(f"no {what} in {timeout} s:\n" + podman("logs", container).stderr[-3000:])


def test_daemon_container_health_events_and_clean_sigterm(image, enrolled, data_dir, tmp_path):
    """The image's default command (the daemon) with a mounted config: /healthz answers 200,
    the image's HEALTHCHECK passes, an event naming the enrolled person reaches the volume's
    JSONL file, and SIGTERM ends it with exit code 0."""
    port = free_port()
    config = tmp_path / "app.yaml"
    config.write_text(yaml.safe_dump({
        "cameras": [{"name": "stage", "uri": "/videos/short_hamilton_clip.mp4", "loop": True}],
        # a loaded 2-core CI machine may drop over 20% of a 30 fps file's frames (degraded);
        # this checks that the daemon and its HEALTHCHECK answer, not how fast the machine is
        "daemon": {"metrics_port": port, "jsonl": {"path": "daemon.jsonl"},
                   "sqlite_commit_s": 0.5, "health": {"max_drop_rate": 1.0}},
    }))
    config.chmod(0o644)
    name = f"facemoe-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    podman("run", "-d", "--name", name, "--network", "host", "--read-only",
           "-e", f"FACEMOE_HEALTH_PORT={port}", "-v", f"{enrolled}:/data",
           "-v", f"{data_dir / 'videos'}:/videos:ro",
           "-v", f"{config}:/etc/facemoe/app.yaml:ro", image)
    try:
        answer = wait_for("/healthz answer", lambda: healthz(port), 60, name)
        answered = time.monotonic() - started
        status, body = wait_for("/healthz 200 (camera running)", lambda: (
            (got := healthz(port)) and got[0] == 200 and got), 60, name)
        ok = time.monotonic() - started
        assert body["status"] == "ok" and answer[1]["status"] in ("ok", "degraded"), body
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        jsonl = enrolled / "daemon.jsonl"
        wait_for(f"event naming {PERSON}", lambda: PERSON in identities(jsonl), 120, name)
        podman("kill", "--signal", "TERM", name)
        code = podman("wait", name, timeout=60).stdout.strip()
        logs = podman("logs", name).stderr
        assert code == "0", logs[-3000:]
        print(f"\ndaemon container: /healthz answered {answered:.1f} s and 200 ok {ok:.1f} s "
              "after `podman run -d`")
    finally:
        podman("rm", "-f", name, check=False)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_compose_runs_daemon_review_ui_and_broker(image, data_dir, tmp_path):
    """compose.yaml as a user starts it (podman-compose, its mounted config, the environment),
    with the camera a file from the shared videos: the daemon answers /healthz on its published
    port, the review UI its login page, the daemon's MQTT messages reach the mosquitto service,
    and `stop` (SIGTERM) ends the daemon with exit code 0."""
    import paho.mqtt.client as mqtt

    if shutil.which("podman-compose") is None:
        pytest.skip("podman-compose is not installed (`.ci/container.sh setup` installs it)")
    busy = [p for p in (9464, 8080, 1883) if port_in_use(p)]
    if busy:
        pytest.skip(f"127.0.0.1 ports {busy}, which compose.yaml publishes, are in use")
    override = tmp_path / "videos.yaml"  # the shared videos, for a file camera
    override.write_text(yaml.safe_dump(
        {"services": {"facemoe": {"volumes": [f"{data_dir / 'videos'}:/videos:ro"]}}}))
    project = f"fmtest{uuid.uuid4().hex[:6]}"
    env = {**_env(), "FACEMOE_CAMERA_URI": "/videos/short_hamilton_clip.mp4",
           "FACEMOE_WEB_PASSWORD": "ci-password"}

    def compose(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["podman-compose", "-p", project, "-f", str(REPO_ROOT / "compose.yaml"),
             "-f", str(override), *args],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)

    daemon = f"{project}_facemoe_1"
    topics: set[str] = set()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_connect = lambda c, *_: c.subscribe("#")
    client.on_message = lambda c, u, msg: topics.add(msg.topic)
    try:
        up = compose("up", "-d")
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        got = wait_for("/healthz answer", lambda: healthz(9464), 60, daemon)
        assert "camera1" in got[1]["cameras"], got
        login = wait_for("review UI login page", lambda: _status("http://127.0.0.1:8080/login")
                         == 200, 60, f"{project}_review_1")
        assert login
        client.connect("127.0.0.1", 1883)
        client.loop_start()
        # availability is per box (facemoe/availability/<box>, the container's host name)
        wait_for("the daemon's MQTT messages", lambda: "facemoe/cameras/camera1" in topics
                 and any(t.startswith("facemoe/availability/") for t in topics), 60, daemon)
        stop = compose("stop")
        assert stop.returncode == 0, stop.stderr[-2000:]
        code = podman("inspect", "-f", "{{.State.ExitCode}}", daemon).stdout.strip()
        assert code == "0", podman("logs", daemon).stderr[-3000:]
    finally:
        client.loop_stop()
        compose("down", "-v")
        podman("network", "rm", "-f", f"{project}_default", check=False)  # down leaves it


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None
