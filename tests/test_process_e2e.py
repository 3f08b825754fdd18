"""The main job end to end with the shipped model: enroll from stills, process real clips."""

import json
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import facemoe as run_facemoe
from tests.gallery_helpers import EVENT_KEYS

pytestmark = pytest.mark.e2e

LIN, ALEX = "Lin-Manuel Miranda", "Alex Lacamoire"
CLOSE_UP_START = 2.7  # media time of the shot cut that starts Lin-Manuel Miranda's close-up


# the tests' one CLI runner, failing on a non-zero exit unless told `check=False`
facemoe = partial(run_facemoe, check=True, timeout=600, env={"PYTHONUNBUFFERED": "1"})


def _one_line_error(done):
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("facemoe: error:")]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def hamilton(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("hamilton")
    gallery = tmp / "gallery.db"
    videos = data_dir / "videos"
    facemoe("enroll", LIN, videos / "lin-manuel-miranda.png", "--gallery", gallery)
    facemoe("enroll", ALEX, videos / "alex-lacamoire.png", "--gallery", gallery)
    out = facemoe(
        "process",
        videos / "short_hamilton_clip.mp4",
        "--gallery",
        gallery,
        "--json",
        "--events",
        tmp / "events.jsonl",
        "--annotate",
        tmp / "annotated.mp4",
    )
    events = [json.loads(line) for line in (tmp / "events.jsonl").read_text().splitlines()]
    return json.loads(out.stdout), events, tmp, gallery


@pytest.mark.slow
def test_lin_manuel_miranda_is_named_on_his_close_up(hamilton):
    summary, events, _, _ = hamilton
    # the close-up: the longest track of the shot between the cuts at 2.7 s and 7.0 s
    close_up = max(
        (e for e in events if e["start"] > 2.5 and e["end"] < 7.1), key=lambda e: e["frames"]
    )
    # 128 frames of the shot; detection runs at 15 of its 30 fps (detector.max_fps)
    assert close_up["frames"] > 50 and close_up["best_bbox"][2] > 60
    assert close_up["identity"] == LIN, close_up
    assert LIN in summary["identified"]


@pytest.mark.slow
def test_the_audience_is_not_named_as_either_enrolled_person(hamilton):
    _, events, _, _ = hamilton
    audience = [e for e in events if e["start"] >= 7.0]
    assert len(audience) >= 4  # the Obamas' row: several faces after the cut at 7.0 s
    assert not [e for e in audience if e["identity"] in (LIN, ALEX)], audience


@pytest.mark.slow
def test_events_follow_the_design_schema_and_sqlite_has_them(hamilton):
    import sqlite3

    summary, events, _, gallery = hamilton
    assert events and all(set(e) == EVENT_KEYS for e in events)
    assert all(e["model"] == summary["model"] and e["start"] <= e["end"] for e in events)
    assert len({e["track_id"] for e in events}) == len(events)
    with sqlite3.connect(gallery) as db:
        assert db.execute("select count(*) from events").fetchone()[0] == len(events)
    assert summary["frames"] == 275 and summary["events"] == len(events)
    assert 0 < summary["embedded_crops"] < summary["detections"]  # selective embedding
    assert {"decode", "detect", "track", "align", "embed"} <= set(summary["stages"])


@pytest.mark.slow
def test_enroll_from_the_close_up_track_of_a_stored_event(hamilton, tmp_path, default_model_dir):
    """The event of Lin-Manuel Miranda's close-up keeps its best aligned crops in the gallery;
    a person enrolled from that event (not from a photo) is him: his templates are closest
    to his photo's template, above the model's threshold, and not to Alex's."""
    import shutil

    import numpy as np

    from app.gallery import Gallery

    _, events, _, gallery = hamilton
    copy = tmp_path / "gallery.db"
    shutil.copy(gallery, copy)  # the module's other tests keep the original
    listed = json.loads(facemoe("gallery", "events", "--gallery", copy, "--json").stdout)
    stored = listed["events"]
    assert len(stored) == len(events) and all(0 < e["crops"] <= 3 for e in stored)
    close_up = max((e for e in stored if e["start"] > 2.5 and e["end"] < 7.1),
                   key=lambda e: e["frames"])
    assert close_up["identity"] == LIN
    done = facemoe("enroll", "From the close-up", "--event", close_up["id"], "--gallery", copy,
                   "--json")
    report = json.loads(done.stdout)
    assert report["templates"] == 3 and not report["rejected"]
    assert all(s.startswith(f"event {close_up['id']}: camera short_hamilton_clip track ")
               for s in report["sources"])
    threshold = json.loads((default_model_dir / "manifest.json").read_text())[
        "metrics"]["recommended_threshold"]
    with Gallery(copy, "x", "y", create=False, adopt_model=True) as g:
        names, mat = g.matrix()
    names = np.array(names)
    track = mat[names == "From the close-up"]
    lin, alex = mat[names == LIN], mat[names == ALEX]
    assert (track @ lin.T).max() >= threshold > (track @ alex.T).max()


@pytest.mark.slow
def test_annotated_video_is_written(hamilton):
    from app.source import open_source

    _, _, tmp, _ = hamilton
    with open_source(str(tmp / "annotated.mp4")) as src:
        frames = sum(1 for _ in src)
    assert frames == 275 and src.size == (640, 360)
    assert not list(tmp.glob("*.part"))


@pytest.mark.parametrize(
    "clip", ["intel_classroom.gif", "intel_classroom.mp4", "intel_face-demographics-walking.mp4"]
)
def test_intel_clips_small_faces_are_detected_and_tracked(clip, data_dir, tmp_path):
    out = facemoe(
        "process",
        data_dir / "videos" / clip,
        "--gallery",
        tmp_path / "g.db",
        "--allow-empty-gallery",
        "--json",
        "--events",
        tmp_path / "ev.jsonl",
    )
    summary = json.loads(out.stdout)
    events = [json.loads(line) for line in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert summary["detections"] >= 2 * summary["frames"] * 0.8  # >= 2 faces in most frames
    long_tracks = [e for e in events if e["frames"] >= 0.8 * summary["frames"]]
    assert len(long_tracks) >= 2  # people followed through the whole clip under one id
    assert min(e["best_bbox"][2] for e in long_tracks) <= 25  # small faces (~20 px)
    assert all(e["identity"] is None for e in events)


@pytest.mark.slow
def test_bad_inputs_fail_with_one_line_and_write_nothing(data_dir, tmp_path):
    videos = data_dir / "videos"
    gallery = tmp_path / "g.db"
    facemoe("enroll", LIN, videos / "lin-manuel-miranda.png", "--gallery", gallery)
    before = gallery.read_bytes()

    assert "no such file" in _one_line_error(
        facemoe("process", tmp_path / "missing.mp4", "--gallery", gallery, check=False)
    )
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes((videos / "short_hamilton_clip.mp4").read_bytes()[:300_000])
    for bad in (text, truncated):
        events, annotated = tmp_path / f"{bad.stem}.jsonl", tmp_path / f"{bad.stem}-out.mp4"
        line = _one_line_error(
            facemoe(
                "process",
                bad,
                "--gallery",
                gallery,
                "--events",
                events,
                "--annotate",
                annotated,
                check=False,
            )
        )
        assert bad.name in line
        assert not annotated.exists() and not list(tmp_path.glob("*.part"))
        assert not events.exists() or events.read_text() == ""

    blank = tmp_path / "wall.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(blank), np.full((240, 320, 3), 127, np.uint8))
    assert "no face found" in _one_line_error(
        facemoe("enroll", "Nobody", blank, "--gallery", gallery, check=False)
    )
    assert "2 faces" in _one_line_error(
        facemoe("enroll", "Both", videos / "two_people.jpg", "--gallery", gallery, check=False)
    )
    assert "name is empty" in _one_line_error(
        facemoe("enroll", "  ", videos / "obama.jpg", "--gallery", gallery, check=False)
    )

    empty = tmp_path / "empty.db"
    line = _one_line_error(
        facemoe("process", videos / "intel_classroom.mp4", "--gallery", empty, check=False)
    )
    assert "no such gallery" in line or "empty" in line
    assert gallery.read_bytes() == before  # failed enrollments left the gallery as it was


@pytest.mark.slow
def test_enroll_with_a_chosen_face_and_gallery_commands(data_dir, tmp_path):
    gallery = tmp_path / "g.db"
    facemoe(
        "enroll",
        "Joe Biden",
        data_dir / "videos" / "two_people.jpg",
        "--face",
        "1",
        "--gallery",
        gallery,
    )
    facemoe(
        "enroll",
        "Barack Obama",
        data_dir / "videos" / "obama.jpg",
        data_dir / "videos" / "obama2.jpg",
        "--gallery",
        gallery,
    )
    listed = json.loads(facemoe("gallery", "list", "--gallery", gallery, "--json").stdout)
    assert {(i["name"], i["templates"]) for i in listed["identities"]} == {
        ("Joe Biden", 1),
        ("Barack Obama", 2),
    }
    facemoe("gallery", "rename", "Joe Biden", "Joseph Biden", "--gallery", gallery)
    facemoe("gallery", "remove", "Barack Obama", "--gallery", gallery)
    listed = json.loads(facemoe("gallery", "list", "--gallery", gallery, "--json").stdout)
    assert [i["name"] for i in listed["identities"]] == ["Joseph Biden"]


def test_validate_config(tmp_path):
    assert facemoe("process", "--validate-config").stdout.strip() == "config ok"
    bad = tmp_path / "app.yaml"
    bad.write_text("tracker:\n  max_missed: -3\n")
    assert "tracker.max_missed" in _one_line_error(
        facemoe("process", "--validate-config", "--config", bad, check=False)
    )


@pytest.mark.slow
def test_recognized_alert_and_annotation_labels_on_the_close_up(hamilton, data_dir):
    """In media time: the `recognized` message naming Lin-Manuel Miranda comes within 1 s of
    the first frame of his close-up (the cut at 2.7 s); from then on every frame of the
    close-up draws his box (detected, or predicted where the detector skipped the frame)
    labelled with his name."""
    from app.config import load_config
    from app.pipeline import FacePipeline
    from app.runtime import GalleryMatcher, make_detector, make_embedder, open_gallery, threshold
    from app.source import open_source

    _, events, _, gallery_path = hamilton
    cfg = load_config()
    # no cooldown: the model may already name him on stage before the close-up
    cfg = cfg.model_copy(update={"alerts": cfg.alerts.model_copy(update={"cooldown_s": 0})})
    detector, embedder = make_detector(cfg), make_embedder(cfg)
    with open_gallery(gallery_path, embedder, create=False) as gallery:
        pipeline = FacePipeline("stage", cfg, detector, embedder,
                                GalleryMatcher(gallery, threshold(cfg, embedder)))
        alerts, frames, ended = [], [], []
        with open_source(str(data_dir / "videos" / "short_hamilton_clip.mp4"), "stage") as src:
            for frame in src:
                result = pipeline.push(frame)
                alerts += [(frame.pts, e) for e in result.events if e.type == "recognized"]
                ended += [e for e in result.events if e.type == "end"]
                frames.append((frame.pts, result))
        ended += pipeline.flush()
    lin = [(at, e) for at, e in alerts if e.identity == LIN and e.start > CLOSE_UP_START]
    assert lin, alerts
    at, alert = lin[0]
    print(f"recognized {LIN}: close-up at {CLOSE_UP_START} s, his track from "
          f"{alert.start:.3f} s, message at {at:.3f} s (+{at - CLOSE_UP_START:.3f} s), "
          f"score {alert.score:.3f}")
    assert CLOSE_UP_START < alert.start < 3.0 and at - CLOSE_UP_START <= 1.0
    assert [e.track_id for _, e in alerts].count(alert.track_id) == 1  # once per track
    final = next(e for e in ended if e.id == alert.id)  # the same id on the track's end event
    assert final.identity == LIN and final.track_id == alert.track_id
    close_up = [(pts, r) for pts, r in frames if at <= pts < final.end]
    assert len(close_up) > 50
    for pts, r in close_up:
        boxes = {f.track_id for f in [*r.faces, *r.predicted]}
        assert alert.track_id in boxes, f"no box for his track at {pts:.3f} s"
        assert r.labels[alert.track_id].identity == LIN, f"no name at {pts:.3f} s"
    assert any(r.predicted for _, r in close_up) and any(r.faces for _, r in close_up)
    assert {e.type for e in ended} == {"end"} and all(e.time for e in ended)
    assert len(ended) == len(events)


def test_processing_a_file_again_stores_its_events_once(hamilton, tmp_path, data_dir):
    """Event ids come from the file and the track: a second run over the same video gives the
    same ids, and the gallery (unique event ids) stores nothing twice."""
    import sqlite3

    _, events, _, gallery = hamilton
    copy = tmp_path / "gallery.db"
    copy.write_bytes(gallery.read_bytes())
    with sqlite3.connect(copy) as db:
        before = sorted(r[0] for r in db.execute("select uid from events"))
    assert before == sorted(e["id"] for e in events)
    facemoe("process", data_dir / "videos" / "short_hamilton_clip.mp4", "--gallery", copy,
            "--events", tmp_path / "again.jsonl")
    again = [json.loads(line) for line in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in again) == before
    with sqlite3.connect(copy) as db:
        assert sorted(r[0] for r in db.execute("select uid from events")) == before


def test_many_videos_with_a_worker_pool_and_shards_store_each_event_once(tmp_path, data_dir):
    """`process FOLDER FILE --jobs 2`: every video of the folder (searched recursively) and
    the file, in two worker processes; a file that is not a video fails with its one-line
    error and the others go on (exit 1). Shards K/N of the same list, run again as two
    machines would, store nothing twice: event ids are derived from the file and the track."""
    videos = data_dir / "videos"
    folder = tmp_path / "clips"
    (folder / "hall").mkdir(parents=True)
    (folder / "hall" / "walk.mp4").symlink_to(videos / "intel_face-demographics-walking.mp4")
    (folder / "female.mp4").symlink_to(videos / "intel_head-pose-face-detection-female.mp4")
    (folder / "broken.mp4").write_bytes(b"not a video")
    (folder / "notes.txt").write_text("not a video either, and not picked up")
    gallery, events = tmp_path / "gallery.db", tmp_path / "events.jsonl"
    facemoe("enroll", LIN, videos / "lin-manuel-miranda.png", "--gallery", gallery)
    single = videos / "intel_head-pose-face-detection-male.mp4"
    done = facemoe("process", folder, single, "--jobs", "2", "--gallery", gallery, "--json",
                   "--events", events, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert sorted(Path(v["video"]).name for v in out["videos"]) == [
        "female.mp4", "intel_head-pose-face-detection-male.mp4", "walk.mp4"]
    assert list(out["failed"]) == [str(folder / "broken.mp4")]
    assert "\n" not in out["failed"][str(folder / "broken.mp4")]
    assert out["events"] > 0 and "Traceback" not in done.stderr
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert len(lines) == out["events"]
    import sqlite3

    def stored():
        return sorted(r[0] for r in sqlite3.connect(gallery).execute("select uid from events"))

    first = stored()
    assert first == sorted(e["id"] for e in lines)
    for k in ("0/2", "1/2"):  # the same list over two "machines"
        again = facemoe("process", folder, single, "--shard", k, "--gallery", gallery,
                        "--json", check=False)
        assert again.returncode in (0, 1), again.stderr[-2000:]
    assert stored() == first  # no duplicate, no new id
    bad = facemoe("process", folder, "--shard", "2/2", "--gallery", gallery, check=False)
    assert "--shard '2/2': K must be from 0 to N-1" in _one_line_error(bad)
