"""FaceMoE against a real Home Assistant core (tests/home_assistant.py: its own cached venv,
onboarded, MQTT added through its config flow) and a real mosquitto: `facemoe process
--publish` on the Hamilton clip makes the README's entity ids, Lin-Manuel Miranda's presence
sensor is present while his close-up is processed and away after it, a SIGKILLed box's
entities go unavailable, two boxes make distinct entities (no `_2`), and a rename or an
erasure leaves no stale entity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.home_assistant import HomeAssistant
from tests.services import Mosquitto

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
LIN, ALEX = "Lin-Manuel Miranda", "Alex Lacamoire"


def facemoe(*args, config: Path | None = None, check: bool = True):
    extra = ["--config", str(config)] if config else []
    done = subprocess.run([sys.executable, "-m", "app.cli", *map(str, args), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and done.returncode != 0:
        raise AssertionError(f"facemoe {args} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


@pytest.fixture(scope="module")
def site(tmp_path_factory, data_dir):
    """A broker, a Home Assistant core on it, a gallery with Lin and Alex, a config per box."""
    tmp = tmp_path_factory.mktemp("ha")
    broker = Mosquitto(tmp / "broker")
    try:
        ha = HomeAssistant(tmp / "ha", broker.port)
    except BaseException:
        broker.stop()
        raise
    gallery = tmp / "gallery.db"
    videos = data_dir / "videos"
    configs = {}
    for box in ("alpha", "beta"):
        configs[box] = tmp / f"{box}.yaml"
        configs[box].write_text(json.dumps({
            "gallery": {"path": str(gallery)},
            "daemon": {"box": box, "mqtt": {
                "host": "127.0.0.1", "port": broker.port, "away_after_s": 1,
                "keepalive_s": 5, "discovery": {"enabled": True}}}}))
    facemoe("enroll", LIN, videos / "lin-manuel-miranda.png", config=configs["alpha"])
    facemoe("enroll", ALEX, videos / "alex-lacamoire.png", config=configs["alpha"])
    yield {"ha": ha, "broker": broker, "configs": configs, "tmp": tmp,
           "clip": videos / "short_hamilton_clip.mp4"}
    ha.stop()
    broker.stop()


def test_documented_entities_and_presence_from_the_close_up(site):
    ha, tmp = site["ha"], site["tmp"]
    lin_id = "sensor.facemoe_alpha_lin_manuel_miranda"
    watch = ha.watch(lin_id)
    events = tmp / "alpha.jsonl"
    try:
        facemoe("process", site["clip"], "--publish", "--camera", "hamilton", "--no-progress",
                "--events", events, config=site["configs"]["alpha"])
        # the box is offline once the file is done: its entities unavailable
        ha.wait(lambda: "unavailable" in watch.states()[1:], 20, "Lin's sensor unavailable")
    finally:
        watch.close()
    seen = [s for s in watch.states() if s != "unavailable"]
    log = [(s["state"], s["attributes"]) for s in watch.seen]
    # every entity the README documents, with the documented ids
    states = ha.states()
    for entity in (lin_id, "sensor.facemoe_alpha_alex_lacamoire",
                   "sensor.facemoe_alpha_camera_hamilton_last_recognized",
                   "sensor.facemoe_alpha_camera_hamilton_faces",
                   "sensor.facemoe_alpha_camera_hamilton_unknown",
                   "image.facemoe_alpha_camera_hamilton_snapshot"):
        assert entity in states, (entity, sorted(states))
    # present while his close-up was processed (no alert cooldown in the way), away after
    assert seen[seen.index("present"):][-1] == "away", watch.states()
    records = [json.loads(line) for line in events.read_text().splitlines()]
    close_up = max((r for r in records if r["identity"] == LIN), key=lambda r: r["frames"])
    present = [a for s, a in log if s == "present"]
    assert present[0]["camera"] == "hamilton"
    assert close_up["id"] in {a.get("event") for s, a in log}


def test_sigkill_makes_the_box_unavailable(site):
    ha = site["ha"]
    lin_id = "sensor.facemoe_alpha_lin_manuel_miranda"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "process", str(site["clip"]), "--publish", "--camera",
         "hamilton", "--no-progress", "--config", str(site["configs"]["alpha"])],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ha.wait(lambda: (ha.state(lin_id) or {}).get("state") not in (None, "unavailable"),
                120, "the box online")
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        t = time.monotonic()
        ha.wait(lambda: ha.state(lin_id)["state"] == "unavailable", 30, "unavailable")
        took = time.monotonic() - t
    finally:
        proc.kill()
        proc.wait(10)
    assert took < 30
    for entity in ("sensor.facemoe_alpha_camera_hamilton_faces",
                   "image.facemoe_alpha_camera_hamilton_snapshot"):
        assert ha.state(entity)["state"] == "unavailable"


def test_two_boxes_make_distinct_entities(site):
    ha = site["ha"]
    facemoe("process", site["clip"], "--publish", "--camera", "hamilton-b", "--no-progress",
            config=site["configs"]["beta"])
    ha.wait(lambda: ha.state("sensor.facemoe_beta_lin_manuel_miranda"), 20, "beta's Lin")
    states = ha.states()
    assert "sensor.facemoe_alpha_lin_manuel_miranda" in states
    assert "sensor.facemoe_beta_camera_hamilton_b_faces" in states
    # the core writes its entity registry to disk some seconds after a change (a delayed save)
    ha.wait(lambda: any(e["entity_id"] == "sensor.facemoe_beta_camera_hamilton_b_faces"
                        for e in ha.registry()), 60, "beta's entities in the saved registry")
    ids = [e["entity_id"] for e in ha.registry() if e["platform"] == "mqtt"]
    assert ids and not [i for i in ids if i.endswith("_2")], ids
    assert len(ids) == len(set(ids))


def test_rename_and_erasure_leave_no_stale_entity(site):
    ha, configs = site["ha"], site["configs"]
    assert ha.state("sensor.facemoe_alpha_alex_lacamoire") is not None
    facemoe("gallery", "rename", ALEX, "Alex L", config=configs["alpha"])
    # a box clears what it left for a name no longer enrolled when its list of people
    # changes (a running daemon: within seconds) and, as here, when it next connects
    for box, camera in (("alpha", "hamilton"), ("beta", "hamilton-b")):
        facemoe("process", site["clip"], "--publish", "--camera", camera, "--no-progress",
                config=configs[box])
        old, new = f"sensor.facemoe_{box}_alex_lacamoire", f"sensor.facemoe_{box}_alex_l"
        ha.wait(lambda: ha.state(new) is not None and ha.state(old) is None, 30,  # noqa: B023
                f"{box}'s renamed entity")
    # the erasure service clears every box's retained topics of the person
    facemoe("gallery", "remove", "Alex L", config=configs["alpha"])
    ha.wait(lambda: not [e for e in ha.states() if "alex" in e], 30, "erased entities")
    live = ha.states()
    assert not [e for e in live if "alex" in e], sorted(live)


def test_the_readme_automation_is_valid_and_names_a_documented_id(site, tmp_path):
    """The README's example automation passes the core's own config check, and the entity it
    watches is the documented id for its box."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Home Assistant\n"):]
    block = section[section.index("Example automation:"):]
    block = block[block.index("```yaml\n") + 8:block.index("```\n", block.index("```yaml"))]
    assert "entity_id: sensor.facemoe_hall_lin_manuel_miranda" in block
    (tmp_path / "configuration.yaml").write_text("homeassistant:\n" + block)
    done = subprocess.run([str(site["ha"].python), "-m", "homeassistant", "--script",
                           "check_config", "-c", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Failed config" not in done.stdout, done.stdout[-2000:]


def test_publish_without_a_broker_is_a_one_line_error(tmp_path, data_dir):
    gallery = tmp_path / "gallery.db"
    facemoe("enroll", LIN, data_dir / "videos" / "lin-manuel-miranda.png", "--gallery", gallery)
    done = facemoe("process", data_dir / "videos" / "short_hamilton_clip.mp4", "--publish",
                   "--gallery", gallery, check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("facemoe: error:")]
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert errors == ["facemoe: error: --publish needs an MQTT broker in the config "
                      "(daemon.mqtt)"], done.stderr
