"""Erasure (app.erasure): one service for `gallery remove`, the delete page and the API.

A person's traces are found by the identity, not by its current name: after a rename, the
events, crops, JSONL lines, snapshots and candidate mentions under the old name go too; a
removal that cannot finish (a file it cannot delete) leaves a tombstone that `gallery check`
reports and that a rerun finishes; another person who now carries a reused name keeps theirs.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.erasure import Outputs, erase
from app.gallery import Gallery, GalleryError
from app.sinks import JsonlSink
from tests.conftest import facemoe
from tests.gallery_helpers import event
from trainer.manifest import model_id, read_manifest

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("no_gallery_key")]


class Site:
    """A gallery of the shipped model with the daemon's outputs: JSONL and snapshots."""

    def __init__(self, root: Path, model_dir: Path) -> None:
        self.db, self.jsonl, self.snaps = root / "g.db", root / "events.jsonl", root / "snaps"
        self.model = model_id(read_manifest(model_dir))
        self.dim = int(read_manifest(model_dir)["embedding_dim"])
        self.config = root / "app.yaml"
        self.config.write_text(f"gallery:\n  path: {self.db}\ndaemon:\n  jsonl:\n"
                               f"    path: {self.jsonl}\n  snapshots:\n    dir: {self.snaps}\n")
        self.rng = np.random.default_rng(0)
        self.track = 0

    def gallery(self) -> Gallery:
        return Gallery(self.db, *self.model)

    def enroll(self, g: Gallery, name: str) -> None:
        g.enroll(name, self.rng.normal(size=(2, self.dim)), ["a.jpg", "b.jpg"], [0.9, 0.8],
                 [self.rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2)])

    def events(self, g: Gallery, identity: str | None, n: int = 2,
               candidate: str | None = None) -> list:
        """`n` events stored in the gallery (with a crop), in the JSONL file and as snapshots."""
        out = []
        for _ in range(n):
            self.track += 1
            ev = event(self.track, identity)
            snap = self.snaps / "cam0" / f"{ev.id}.jpg"
            snap.parent.mkdir(parents=True, exist_ok=True)
            snap.write_bytes(b"\xff\xd8jpeg")
            ev = replace(ev, snapshot=str(snap), candidate=candidate,
                         candidate_score=0.4 if candidate else None,
                         crops=[(0.9, self.rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))])
            out.append(ev)
        g.add_events(out, crops=1)
        sink = JsonlSink(self.jsonl)
        sink.write(out)
        sink.close()
        return out

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.jsonl.read_text().splitlines()]

    def cli(self, *args: str) -> int:
        return main(["gallery", *args, "--config", str(self.config), "--json"])


@pytest.fixture
def site(tmp_path: Path, default_model_dir: Path) -> Site:
    return Site(tmp_path, default_model_dir)


def test_remove_after_rename_erases_what_names_the_old_name(site: Site, capsys) -> None:
    """gallery rename Ada "Ada L"; gallery remove "Ada L": nothing of Ada is left (before:
    2 events, their crops, 2 JSONL lines, the candidate mentions and the snapshots stayed)."""
    with site.gallery() as g:
        site.enroll(g, "Ada")
        site.enroll(g, "Bob")
        ada = site.events(g, "Ada")
        others = site.events(g, None, candidate="Ada") + site.events(g, "Bob")
    assert site.cli("rename", "Ada", "Ada L") == 0
    with site.gallery() as g:
        ada += site.events(g, "Ada L", n=1)
    capsys.readouterr()

    assert site.cli("remove", "Ada L") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["events_deleted"] == 3 and report["jsonl_lines_removed"] == 3
    assert report["jsonl_candidates_cleared"] == 2 and len(report["snapshots_deleted"]) == 3
    with site.gallery() as g:
        stored = g.stored_events()
        assert [i.name for i in g.identities()] == ["Bob"]
        assert {s.event.id for s in stored} == {e.id for e in others}
        assert all(s.event.candidate is None for s in stored)
        assert sum(s.crops for s in stored) == len(others)
        assert g.erasures.pending() == []
    lines = site.lines()
    assert {line["id"] for line in lines} == {e.id for e in others}
    assert not any("Ada" in json.dumps(line) for line in lines)
    assert not any(Path(e.snapshot).exists() for e in ada)
    assert all(Path(e.snapshot).exists() for e in others)


def test_a_removal_that_cannot_finish_is_reported_and_finished_by_a_rerun(site: Site,
                                                                        capsys) -> None:
    """A trace that cannot be erased (here a backup that cannot be read) leaves a tombstone:
    the removal says so and exits 1, `gallery check` names the person, and the same removal
    finishes once the cause is gone (before: the rows went first and a rerun said 'no such
    identity' while the lines stayed forever)."""
    with site.gallery() as g:
        site.enroll(g, "Ada")
        site.events(g, "Ada", n=3)
    backup = Path(f"{site.jsonl}.1")
    backup.mkdir()  # unreadable as a file: the erasure cannot rewrite it
    capsys.readouterr()
    assert site.cli("remove", "Ada") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["unfinished"] and report["events_deleted"] == 3
    assert len(site.lines()) == 0  # what could be erased was
    assert site.cli("check") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 unfinished erasure" in err[0] and "'Ada'" in err[0]

    backup.rmdir()
    JsonlSink(backup).write(site.lines() or [event(99, "Ada")])  # a line the first run missed
    assert site.cli("remove", "Ada") == 0
    report = json.loads(capsys.readouterr().out)
    assert not report["unfinished"] and report["jsonl_lines_removed"] == 1
    assert backup.read_text() == ""
    assert site.cli("check") == 0
    capsys.readouterr()
    assert site.cli("remove", "Ada") == 1  # now it is gone for good
    assert "no such identity: 'Ada'" in capsys.readouterr().err


def test_a_reused_name_keeps_the_other_persons_traces(site: Site) -> None:
    """Ada is renamed "Ada L" and a new Ada is enrolled: erasing "Ada L" by its identity id
    (as the web does) keeps the new Ada's events and lines."""
    with site.gallery() as g:
        site.enroll(g, "Ada")
        old = site.events(g, "Ada")
        g.rename("Ada", "Ada L")
        old += site.events(g, "Ada L")
        site.enroll(g, "Ada")
        new = site.events(g, "Ada")
        ada_l = next(i.id for i in g.pages.identities()[0] if i.name == "Ada L")
        report = erase(g, Outputs((str(site.jsonl),), str(site.snaps)), identity_id=ada_l)
        assert not report.unfinished
        assert {s.event.identity for s in g.stored_events()} == {"Ada"}
        # the events under the shared name cannot be told apart: they stay (with Ada's)
        assert {s.event.id for s in g.stored_events()} >= {e.id for e in new}
        with pytest.raises(GalleryError, match="no such identity"):
            erase(g, Outputs(), identity_id=ada_l)
    assert {line["id"] for line in site.lines()} >= {e.id for e in new}
    assert not any(line["identity"] == "Ada L" for line in site.lines())
    assert not any(Path(e.snapshot).exists() for e in old[2:])


def test_merged_names_are_erased_with_the_identity(site: Site) -> None:
    """Bob merged into Ada: erasing Ada erases the lines that still name Bob."""
    with site.gallery() as g:
        site.enroll(g, "Ada")
        site.enroll(g, "Bob")
        site.events(g, "Bob")
        g.merge_identities("Bob", "Ada")
        report = erase(g, Outputs((str(site.jsonl),), str(site.snaps)), name="Ada")
        assert report.jsonl_lines_removed == 2 and report.events_deleted == 2
    assert site.lines() == []


def test_retained_mqtt_state_is_cleared_and_an_absent_broker_leaves_it_unfinished(
        site: Site, tmp_path: Path) -> None:
    """The broker keeps `<prefix>/identities/<slug>` (and the discovery config) of a person
    after they are erased unless the erasure clears them; with the broker away the erasure
    stays unfinished and a rerun clears them."""
    import threading
    import time

    from app.config import MqttConfig
    from tests.test_mqtt_sink import Broker, mqtt

    broker = Broker(tmp_path, ["allow_anonymous true"])
    cfg = MqttConfig(host="127.0.0.1", port=broker.port, prefix="facemoe")
    topics = ["facemoe/identities/ada_l", "homeassistant/sensor/facemoe_ada_l/config",
              "facemoe/identities/bob"]

    def retained() -> set[str]:
        seen: set[str] = set()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.on_message = lambda c, u, m: seen.add(m.topic) if m.payload else None
        client.connect("127.0.0.1", broker.port)
        client.subscribe([(t, 1) for t in topics])
        client.loop_start()
        time.sleep(1.0)
        client.loop_stop()
        client.disconnect()
        return seen

    with site.gallery() as g:
        site.enroll(g, "Ada L")
        site.enroll(g, "Bob")
        outputs = Outputs((str(site.jsonl),), str(site.snaps), cfg)
        report = erase(g, outputs, name="Ada L")  # no broker yet
        assert report.unfinished and "MQTT" in report.errors[0]
        assert [t.name for t in g.erasures.pending()] == ["Ada L"]
        broker.start()
        try:
            publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
            up = threading.Event()
            publisher.on_connect = lambda *a: up.set()
            publisher.connect("127.0.0.1", broker.port)
            publisher.loop_start()
            assert up.wait(10)
            for t in topics:
                publisher.publish(t, '{"state": "present"}', qos=1, retain=True).wait_for_publish(5)
            publisher.loop_stop()
            publisher.disconnect()
            assert retained() == set(topics)
            report = erase(g, outputs, name="Ada L")  # the rerun
            assert not report.unfinished and report.mqtt_topics_cleared == 2
            assert retained() == {"facemoe/identities/bob"}
            assert g.erasures.pending() == []
        finally:
            broker.stop()


def test_gallery_remove_erases_jsonl_lines_and_snapshots(tmp_path: Path,
                                                          default_model_dir: Path,
                                                          no_gallery_key) -> None:
    import dataclasses
    import json

    import numpy as np
    import yaml

    from app.gallery import Gallery
    from app.sinks import JsonlSink
    from tests.gallery_helpers import event
    from trainer.manifest import model_id, read_manifest

    snaps, jsonl, extra = tmp_path / "snaps", tmp_path / "ev" / "events.jsonl", tmp_path / "p.jsonl"
    jsonl.parent.mkdir()
    ada = [dataclasses.replace(event(i, "Ada"), snapshot=str(snaps / "cam0" / f"{event(i).id}.jpg"))
           for i in (1, 2, 3)]
    bob = dataclasses.replace(event(4, "Bob"), candidate="Ada", candidate_score=0.3)
    unknown = dataclasses.replace(event(5, None), candidate="Ada", candidate_score=0.2)
    (snaps / "cam0").mkdir(parents=True)
    for ev in [*ada, bob]:
        (snaps / "cam0" / f"{ev.id}.jpg").write_bytes(b"\xff\xd8jpeg")
    for path, events in ((jsonl.with_name("events.jsonl.1"), [ada[0], bob]),
                         (jsonl, [ada[1], unknown]), (extra, [ada[2]])):
        sink = JsonlSink(path)
        sink.write(events)
        sink.close()
    dim = int(read_manifest(default_model_dir)["embedding_dim"])
    db = tmp_path / "g.db"
    with Gallery(db, *model_id(read_manifest(default_model_dir))) as g:
        g.enroll("Ada", np.random.default_rng(0).normal(size=(1, dim)), ["a.jpg"], [0.9])
        g.add_events([ada[0], ada[1], bob])
    cfg = tmp_path / "app.yaml"
    cfg.write_text(yaml.safe_dump({"daemon": {"jsonl": {"path": str(jsonl)},
                                              "snapshots": {"dir": str(snaps)}}}))
    proc = facemoe("gallery", "remove", "Ada", "--gallery", str(db), "--config", str(cfg),
                "--events-jsonl", str(extra), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["events_deleted"] == 2
    assert report["jsonl_lines_removed"] == 3 and report["jsonl_candidates_cleared"] == 2
    assert len(report["jsonl_files_rewritten"]) == 3 and report["errors"] == []
    assert sorted(report["snapshots_deleted"]) == sorted(ev.snapshot for ev in ada)
    assert [p.name for p in (snaps / "cam0").iterdir()] == [f"{bob.id}.jpg"]
    everything = "".join(p.read_text() for p in (jsonl, jsonl.with_name("events.jsonl.1"), extra))
    assert "Ada" not in everything
    assert [json.loads(x)["track_id"] for x in everything.splitlines()] == [5, 4]
    assert os.stat(jsonl).st_mode & 0o777 == 0o600
    with Gallery(db, *model_id(read_manifest(default_model_dir))) as g:
        assert [s.event.candidate for s in g.stored_events()] == [None]


def test_events_in_flight_on_a_box_are_not_written_after_it_erases(site: Site,
                                                                    tmp_path: Path) -> None:
    """A box's sink queue holds the person's events (and one naming them as the nearest
    candidate) when the box learns of the erasure: none is written after it, while a track that
    starts later (the name enrolled anew) and other people's events are."""
    from datetime import datetime, timedelta, timezone

    from app.daemon.sinks import SinkWorker
    from app.erasure import Forgotten, erase_on_box
    from app.gallery.fleet import Fleet

    g = site.gallery()
    for name in ("Ada", "Bob"):
        site.enroll(g, name)
    Fleet(g.store).beat("box-a", datetime.now(timezone.utc), "running", [], [])
    box_jsonl = tmp_path / "box-a.jsonl"
    forgotten = Forgotten()
    failed: list[str] = []
    worker = SinkWorker("jsonl", JsonlSink(box_jsonl), ("end",), every_s=3600,
                        failed=lambda n, r: failed.append(r), scrub=forgotten.scrub).start()
    now = datetime.now(timezone.utc)
    before, later = now.isoformat(), (now + timedelta(hours=1)).isoformat()
    worker.put([event(1, "Ada", time=before), event(2, "Bob", time=before),
                event(3, None, time=before, candidate="Ada", candidate_score=0.35),
                event(4, "Ada", time=later)])  # queued: the sink writes once an hour
    assert erase(g, Outputs(), name="Ada").events_deleted == 0
    reports = erase_on_box(g, "box-a", Outputs(jsonl_paths=(str(box_jsonl),)),
                           forgotten=forgotten)
    assert [r.removed for r in reports] == ["Ada"] and not reports[0].unfinished
    worker.close()
    assert worker.join(30) and not failed
    lines = [json.loads(x) for x in box_jsonl.read_text().splitlines()]
    assert [(x["track_id"], x["identity"], x["candidate"]) for x in lines] == [
        (2, "Bob", None), (3, None, None), (4, "Ada", None)]
    g.close()
