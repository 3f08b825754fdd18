"""The review web app's REST API against a real gallery: Alex Lacamoire enrolled from his
photo, the Hamilton clip and an Intel clip processed by `facemoe process` (events with crops).

Covers events (filters, pages, crops, nearest names), unknown-face clusters (stable ids,
"this is NAME" enrolls through the CLI's enrollment and names the events: processing the clip
again names Lin-Manuel Miranda), the gallery (upload, rename, merge, delete a template, erase
an identity), recognize/verify, authentication (password, session + CSRF, bearer token,
loopback-only without credentials), upload limits, the audit log and an encrypted gallery.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install -e .[web])")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the dev extra)")

from fastapi.testclient import TestClient  # noqa: E402

from app.config import WebConfig, load_config  # noqa: E402
from app.gallery import Gallery  # noqa: E402
from app.runtime import open_gallery, threshold  # noqa: E402
from app.web.app import create_app  # noqa: E402
from app.web.auth import (  # noqa: E402
    COOKIE,
    AuthConfigError,
    Authenticator,
    hash_password,
    hash_token,
    verify_password,
)
from app.web.context import WebContext  # noqa: E402
from tests.web_helpers import ALEX, HAMILTON, LIN, close_up, facemoe  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("no_gallery_key")]
PASSWORD, TOKEN = "correct horse battery", "tok-3f9a2c"


def make_client(db: Path, models, *, env: dict[str, str] | None = None,
                host: str = "127.0.0.1", **web) -> TestClient:
    cfg = load_config(None)
    cfg = cfg.model_copy(update={"web": WebConfig(**web)})
    detector, embedder = models
    ctx = WebContext(cfg, open_gallery(db, embedder), detector, embedder,
                     threshold(cfg, embedder), Authenticator(cfg.web, host, env=env or {}))
    return TestClient(create_app(ctx), base_url="http://127.0.0.1:8080")


def login(client: TestClient, user: str = "admin", password: str = PASSWORD) -> str:
    """Log in; returns the CSRF token of the session (from a page's form)."""
    r = client.post("/login", data={"username": user, "password": password, "next": "/events"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    page = client.get("/clusters").text
    return page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]


def jpeg(path: Path) -> bytes:
    return path.read_bytes()


# --- events -----------------------------------------------------------------------------------


def test_events_newest_first_with_filters_pages_and_crops(db: Path, models) -> None:
    c = make_client(db, models)
    page = c.get("/api/events", params={"limit": 500}).json()
    events = page["events"]
    assert page["total"] == len(events) >= 10  # 13 with SFace and the quality gate, 17 with dlib
    assert [e["id"] for e in events] == sorted((e["id"] for e in events), reverse=True)
    cams = {e["camera"] for e in events}
    assert cams == {"short_hamilton_clip", "intel_face-demographics-walking"}
    ham = c.get("/api/events", params={"camera": "short_hamilton_clip", "limit": 500}).json()
    assert ham["total"] == sum(e["camera"] == "short_hamilton_clip" for e in events)
    # keyset pages: 4 at a time cover every event once
    seen, before = [], None
    while True:
        p = c.get("/api/events", params={"limit": 4, **({"before": before} if before else {})})
        seen += [e["id"] for e in p.json()["events"]]
        before = p.json()["next_before"]
        if before is None:
            break
    assert seen == [e["id"] for e in events]
    # unknown events show the nearest enrolled name even below the threshold
    unknown = c.get("/api/events", params={"unknown": True, "limit": 500}).json()["events"]
    assert unknown and all(e["identity"] is None for e in unknown)
    near = [e["nearest"] for e in unknown if e["crops"]]
    assert near and all(n["name"] == ALEX and -1 <= n["score"] < 1 for n in near)
    # a time range: everything was stored in the last hour, nothing before
    assert c.get("/api/events", params={"since": "2000-01-01T00:00:00Z"}).json()["total"] == len(
        events)
    assert c.get("/api/events", params={"until": "2000-01-01T00:00:00Z"}).json()["total"] == 0
    # one event and its crops: stored JPEGs of the kept 192 x 192 geometry
    e = close_up(events)
    one = c.get(f"/api/events/{e['id']}").json()
    assert one["id"] == e["id"] and one["crops"] == 3 and len(one["crop_urls"]) == 3
    r = c.get(one["crop_urls"][0])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    crop = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape == (192, 192, 3)
    assert c.get(f"/api/events/{e['id']}/crops/7").status_code == 404
    missing = c.get("/api/events/999999")
    assert missing.status_code == 404 and missing.json()["detail"] == "no event 999999"
    # the pages render the same
    html = c.get("/events", params={"unknown": "true"}).text
    assert "looks like <i>Alex Lacamoire</i>" in html
    assert f'href="/events/{e["id"]}"' in c.get("/events").text
    docs = c.get("/docs").text  # the API reference, without a CDN
    assert "<code>/api/recognize</code>" in docs and "cdn" not in docs.lower()
    assert "/api/verify" in c.get("/openapi.json").json()["paths"]
    assert c.get(f"/events/{e['id']}").status_code == 200


# --- unknown faces ----------------------------------------------------------------------------


def test_clusters_are_stable_and_naming_one_enrolls_and_names_him(db: Path, models,
                                                                   data_dir: Path) -> None:
    c = make_client(db, models, env={"FACEMOE_WEB_PASSWORD": PASSWORD})
    token = login(c)
    first = c.get("/api/clusters").json()
    assert first["pending"] == 0 and first["total"] >= 3
    assert f'<option value="{ALEX}">' in c.get("/clusters").text  # offered while typing
    again = c.get("/api/clusters").json()
    assert [(k["id"], k["members"]) for k in again["clusters"]] == [
        (k["id"], k["members"]) for k in first["clusters"]]
    # every unknown event with crops is in exactly one cluster
    unknown = c.get("/api/events", params={"unknown": True, "limit": 500}).json()["events"]
    members = [c.get("/api/events", params={"cluster": k["id"], "limit": 500}).json()["events"]
               for k in first["clusters"]]
    ids = [e["id"] for m in members for e in m]
    assert sorted(ids) == sorted(e["id"] for e in unknown if e["crops"])

    target = close_up(unknown)
    cluster = next(k for k, m in zip(first["clusters"], members, strict=True)
                   if target["id"] in {e["id"] for e in m})
    r = c.post(f"/api/clusters/{cluster['id']}/name", json={"name": LIN},
               headers={"X-CSRF-Token": token})
    assert r.status_code == 200, r.text
    named = r.json()
    assert named["enrolled"]["name"] == LIN and named["enrolled"]["templates"] >= 3
    assert named["events_named"] == cluster["members"]
    assert c.get(f"/api/events/{target['id']}").json()["identity"] == LIN
    assert c.get(f"/api/clusters/{cluster['id']}").status_code == 404
    assert cluster["id"] not in [k["id"] for k in c.get("/api/clusters").json()["clusters"]]
    with Gallery(db, models[1].model_name, models[1].model_version) as g:
        audit = g.audit()
    assert any(a.action == "enroll" and a.identity == LIN and a.user == "admin (web)"
               for a in audit)
    assert any(a.action == "relabel" and a.user == "admin (web)" for a in audit)

    # the next run of the clip names him on his close-up
    out = facemoe("process", data_dir / "videos" / HAMILTON, "--gallery", db, "--json",
                  "--camera", "again", "--no-progress")
    assert LIN in json.loads(out.stdout)["identified"]
    again = c.get("/api/events", params={"camera": "again", "limit": 500}).json()["events"]
    assert close_up([{**e, "camera": "short_hamilton_clip"} for e in again])["identity"] == LIN


def test_name_one_event(db: Path, models) -> None:
    c = make_client(db, models)
    unknown = c.get("/api/events", params={"unknown": True, "limit": 500}).json()["events"]
    e = close_up(unknown)
    r = c.post(f"/api/events/{e['id']}/name", json={"name": LIN})
    assert r.status_code == 200 and r.json()["templates"] == 3
    assert all(s.startswith(f"event {e['id']}: ") for s in r.json()["sources"])
    assert c.get(f"/api/events/{e['id']}").json()["identity"] == LIN
    r = c.post("/events/999999/name", data={"name": LIN}, follow_redirects=False)
    assert r.status_code == 303 and "no+event+999999" in r.headers["location"]


def test_ignore_and_merge_clusters(db: Path, models) -> None:
    c = make_client(db, models)
    clusters = c.get("/api/clusters").json()["clusters"]
    a, b, d = clusters[0], clusters[1], clusters[2]
    r = c.post(f"/api/clusters/{a['id']}/merge", json={"other": b["id"]})
    assert r.status_code == 200 and r.json()["members"] == a["members"] + b["members"]
    assert c.get(f"/api/clusters/{b['id']}").status_code == 404
    assert c.post(f"/api/clusters/{a['id']}/merge", json={"other": a["id"]}).status_code == 400
    assert c.post(f"/api/clusters/{d['id']}/ignore").json()["state"] == "ignored"
    open_ids = [k["id"] for k in c.get("/api/clusters").json()["clusters"]]
    assert d["id"] not in open_ids and a["id"] in open_ids
    assert d["id"] in [k["id"] for k in
                       c.get("/api/clusters", params={"state": "ignored"}).json()["clusters"]]
    # a cross-site form post is refused even without authentication
    evil = c.post(f"/api/clusters/{a['id']}/ignore", headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403
    # events purged (or erased) leave their clusters: none is left
    with Gallery(db, models[1].model_name, models[1].model_version) as g:
        g.purge_events(0)
    assert c.get("/api/clusters").json()["total"] == 0
    assert c.get(f"/api/clusters/{a['id']}").json()["members"] == 0


# --- gallery ----------------------------------------------------------------------------------


def test_gallery_upload_rename_merge_delete_template_and_erase(db: Path, models,
                                                              data_dir: Path) -> None:
    videos = data_dir / "videos"
    c = make_client(db, models)
    listed = c.get("/api/identities").json()
    assert listed["total"] == 1 and listed["identities"][0]["name"] == ALEX
    alex = listed["identities"][0]["id"]
    r = c.post("/api/identities", data={"name": "Barack Obama"}, files=[
        ("photos", ("a.jpg", jpeg(videos / "obama.jpg"), "image/jpeg")),
        ("photos", ("b.jpg", jpeg(videos / "obama-720p.jpg"), "image/jpeg")),
        ("photos", ("c.jpg", jpeg(videos / "obama_small.jpg"), "image/jpeg"))])
    assert r.status_code == 201, r.text
    assert r.json()["templates"] == 3 and r.json()["sources"][0] == "upload a.jpg"
    obama = next(i for i in c.get("/api/identities", params={"search": "Obama"}).json()[
        "identities"])
    detail = c.get(f"/api/identities/{obama['id']}").json()
    assert [t["source"] for t in detail["template_list"]] == ["upload a.jpg", "upload b.jpg",
                                                              "upload c.jpg"]
    photo = c.get(detail["template_list"][0]["crop_url"])
    assert photo.status_code == 200 and photo.content[:2] == b"\xff\xd8"
    # recognise the enrolled face
    rec = c.post("/api/recognize", files={"image": ("p.jpg", jpeg(videos / "two_people.jpg"),
                                                    "image/jpeg")}).json()
    assert len(rec["faces"]) == 2 and rec["threshold"] > 0
    left = min(rec["faces"], key=lambda f: f["box"][0])  # Obama stands on the left
    assert left["candidates"][0]["name"] == "Barack Obama"
    assert [x["name"] for x in left["candidates"]] == ["Barack Obama", ALEX]
    rec = c.post("/api/recognize", files={"image": ("p.jpg", jpeg(videos / "obama-480p.jpg"),
                                                    "image/jpeg")}).json()
    assert [f["identity"] for f in rec["faces"]] == ["Barack Obama"]
    # delete one template
    tid = detail["template_list"][2]["id"]
    assert c.delete(f"/api/templates/{tid}").status_code == 204
    assert len(c.get(f"/api/identities/{obama['id']}").json()["template_list"]) == 2
    assert c.delete(f"/api/templates/{tid}").status_code == 404
    # rename; a taken name is refused in one line
    r = c.patch(f"/api/identities/{obama['id']}", json={"name": "Obama"})
    assert r.json()["name"] == "Obama"
    r = c.patch(f"/api/identities/{obama['id']}", json={"name": ALEX})
    assert r.status_code == 400 and r.json()["detail"] == f"identity {ALEX!r} already exists"
    # merge Alex into Obama (templates move), then erase Obama with everything naming him
    r = c.post(f"/api/identities/{alex}/merge", json={"into": obama["id"]})
    assert r.status_code == 200 and r.json()["templates"] == 3
    assert c.get(f"/api/identities/{alex}").status_code == 404
    r = c.delete(f"/api/identities/{obama['id']}")
    assert r.status_code == 200 and r.json()["removed"] == "Obama"
    assert c.get("/api/identities").json()["total"] == 0
    with Gallery(db, models[1].model_name, models[1].model_version) as g:
        actions = [(a.action, a.identity) for a in g.audit()]
    assert ("merge", "Obama") in actions and ("remove", "Obama") in actions
    assert ("delete_template", "Barack Obama") in actions


def test_uploads_are_bounded_and_checked(db: Path, models, data_dir: Path) -> None:
    big = jpeg(data_dir / "videos" / "obama.jpg")
    c = make_client(db, models, max_upload_mb=len(big) / 2 / 2**20)  # the image is 2x the limit
    r = c.post("/api/recognize", files={"image": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and f"{len(big) / 2**20:.2f} MiB;" in r.json()["detail"]
    r = c.post("/api/recognize", files={"image": ("x.jpg", b"not an image", "image/jpeg")})
    assert r.status_code == 400 and "not a JPEG, PNG" in r.json()["detail"]
    # a PNG header that claims 100,000 x 100,000 pixels is refused before decoding
    bomb = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (100_000).to_bytes(4, "big") * 2
    r = c.post("/api/recognize", files={"image": ("b.png", bomb + b"\x08\x02" * 8, "image/png")})
    assert r.status_code == 400 and "megapixels" in r.json()["detail"]
    r = c.post("/api/recognize", content=b"x" * 2**20,
               headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_verify_two_photos(db: Path, models, data_dir: Path) -> None:
    videos = data_dir / "videos"
    c = make_client(db, models)

    def verify(a: str, b: str) -> dict:
        r = c.post("/api/verify", files={"a": (a, jpeg(videos / a), "image/jpeg"),
                                         "b": (b, jpeg(videos / b), "image/jpeg")})
        assert r.status_code == 200, r.text
        return r.json()

    same = verify("obama.jpg", "obama_small.jpg")
    assert same["same"] and same["score"] >= same["threshold"]
    other = verify("obama.jpg", "biden.jpg")
    assert not other["same"] and other["score"] < other["threshold"]
    blank = cv2.imencode(".png", np.full((64, 64, 3), 200, np.uint8))[1].tobytes()
    r = c.post("/api/verify", files={"a": ("a.png", blank, "image/png"),
                                     "b": ("b.jpg", jpeg(videos / "biden.jpg"), "image/jpeg")})
    assert r.status_code == 400 and r.json()["detail"] == "no face found in the first image"


# --- authentication ---------------------------------------------------------------------------


def test_passwords_and_tokens_are_hashed() -> None:
    h = hash_password(PASSWORD)
    assert h.startswith("scrypt$") and PASSWORD not in h
    assert verify_password(PASSWORD, h) and not verify_password("wrong", h)
    assert hash_token(TOKEN) != TOKEN and hash_token(TOKEN).startswith("sha256$")
    with pytest.raises(AuthConfigError, match="needs authentication"):
        Authenticator(WebConfig(), "0.0.0.0", env={})
    Authenticator(WebConfig(token_hashes=[hash_token(TOKEN)]), "0.0.0.0", env={})


def test_authentication_sessions_csrf_and_tokens(db: Path, models) -> None:
    web = {"users": [{"name": "ops", "password_hash": hash_password(PASSWORD)}],
           "token_hashes": [hash_token(TOKEN)]}
    c = make_client(db, models, host="0.0.0.0", **web)
    assert c.get("/api/events").status_code == 401
    r = c.get("/clusters", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/clusters"
    # a wrong password is refused
    r = c.post("/login", data={"username": "ops", "password": "wrong"}, follow_redirects=False)
    assert r.status_code == 401 and COOKIE not in r.cookies
    assert "wrong user name or password" in r.text
    # bearer tokens: the API without a session (and no CSRF token needed)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/api/events", headers=bearer).status_code == 200
    assert c.get("/api/events", headers={"Authorization": "Bearer nope"}).status_code == 401
    cid = c.get("/api/clusters", headers=bearer).json()["clusters"][0]["id"]
    # a session: pages work, but a change needs the session's CSRF token
    csrf = login(c, "ops")
    assert c.get("/api/events").status_code == 200
    assert c.post(f"/api/clusters/{cid}/ignore").status_code == 403
    assert c.post(f"/api/clusters/{cid}/ignore",
                  headers={"X-CSRF-Token": "x" * len(csrf)}).status_code == 403
    assert c.post(f"/api/clusters/{cid}/ignore",
                  headers={"X-CSRF-Token": csrf}).status_code == 200
    r = c.post(f"/clusters/{cid}/restore", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and "restored" in r.headers["location"]
    with Gallery(db, models[1].model_name, models[1].model_version) as g:
        users = {a.user for a in g.audit() if a.action == "cluster"}
    assert users == {"ops (web)"}
    # a forged cookie is no session
    c.cookies.set(COOKIE, "eyJ1IjoiYWRtaW4ifQ==.0000")
    assert c.get("/api/events").status_code == 401
    # after a login, only paths on this server are followed
    for target in ("//evil.example/x", "/\\evil.example", "https://evil.example"):
        r = c.post("/login", data={"username": "ops", "password": PASSWORD, "next": target},
                   follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/events", target
    # a login posted from another site is refused (login CSRF)
    r = c.post("/login", data={"username": "ops", "password": PASSWORD},
               headers={"Origin": "http://evil.example"}, follow_redirects=False)
    assert r.status_code == 403 and COOKIE not in r.cookies
    # guessing is throttled: after 5 failures (1 above) even the right password waits
    for _ in range(4):
        assert c.post("/login", data={"username": "ops", "password": "guess"}).status_code == 401
    r = c.post("/login", data={"username": "ops", "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 429 and "too many failed logins" in r.text


def test_an_encrypted_gallery(tmp_path: Path, models, data_dir: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    env = {"FACEMOE_GALLERY_KEY": key}
    db = tmp_path / "sealed.db"
    facemoe("process", data_dir / "videos" / "intel_face-demographics-walking.mp4", "--gallery",
            db, "--allow-empty-gallery", "--no-progress", env=env)
    monkeypatch.setenv("FACEMOE_GALLERY_KEY", key)
    c = make_client(db, models)
    events = c.get("/api/events").json()["events"]
    assert events and events[0]["crops"]
    crop = c.get(events[0]["crop_urls"][0]).content
    assert cv2.imdecode(np.frombuffer(crop, np.uint8), cv2.IMREAD_COLOR).shape == (192, 192, 3)
    assert c.get("/api/clusters").json()["total"] >= 1
    with open(db, "rb") as fh:  # the crops are sealed on disk
        assert crop[:64] not in fh.read()


# --- CLI --------------------------------------------------------------------------------------


def test_cli_recognize_and_compare(built: Path, data_dir: Path) -> None:
    videos = data_dir / "videos"
    out = json.loads(facemoe("recognize", videos / "alex-lacamoire.png", videos / "biden.jpg",
                             "--gallery", built, "--json").stdout)
    alex, biden = out["images"]
    assert alex["faces"][0]["identity"] == ALEX
    assert biden["faces"][0]["identity"] is None
    assert biden["faces"][0]["candidates"][0]["name"] == ALEX  # the nearest, below threshold
    text = facemoe("recognize", videos / "two_people.jpg", "--gallery", built).stdout
    assert "2 face(s)" in text and "nearest: Alex Lacamoire" in text
    same = json.loads(facemoe("compare", videos / "obama.jpg", videos / "obama-720p.jpg",
                              "--json").stdout)
    assert same["same"] and same["score"] > same["threshold"]
    diff = facemoe("compare", videos / "obama.jpg", videos / "biden.jpg").stdout
    assert diff.startswith("different people: cosine")
    done = facemoe("compare", videos / "obama.jpg", videos / "nope.jpg", check=False)
    assert done.returncode == 1 and done.stderr.strip().startswith("facemoe: error: cannot read")
    assert "Traceback" not in done.stderr


def test_cli_serve(built: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time
    import urllib.request

    from benchmarks.rtsp_camera import free_port
    from tests.conftest import REPO_ROOT as REPO

    done = facemoe("serve", "--host", "0.0.0.0", "--gallery", built, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("facemoe: error: serving on 0.0.0.0 needs authentication")
    hashed = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--hash-password"],
                            cwd=REPO, input="s3cret-pass\n", capture_output=True, text=True,
                            timeout=60)
    assert verify_password("s3cret-pass", hashed.stdout.strip())
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                               "--gallery", str(built)], cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "FACEMOE_WEB_TOKEN": TOKEN})
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and body is None:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/identities",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
            try:
                with urllib.request.urlopen(req, timeout=3) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None and body["identities"][0]["name"] == ALEX
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def test_cli_gallery_templates_merge_and_delete_template(db: Path, data_dir: Path) -> None:
    """The same gallery services from the command line."""
    facemoe("enroll", "Obama", data_dir / "videos" / "obama.jpg", "--gallery", db)
    listed = json.loads(facemoe("gallery", "templates", ALEX, "--gallery", db, "--json").stdout)
    (alex,) = listed["templates"]
    assert alex["photo"] and alex["source"].endswith("alex-lacamoire.png")
    out = facemoe("gallery", "merge", ALEX, "Obama", "--gallery", db).stdout
    assert out.strip() == f"merged {ALEX!r} into 'Obama' (1 template(s) moved)"
    out = facemoe("gallery", "delete-template", alex["id"], "--gallery", db, "--json").stdout
    assert json.loads(out) == {"gallery": str(db), "deleted_template": alex["id"],
                               "identity": "Obama"}
    done = facemoe("gallery", "delete-template", alex["id"], "--gallery", db, check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == f"facemoe: error: no template {alex['id']}"
    names = json.loads(facemoe("gallery", "list", "--gallery", db, "--json").stdout)
    assert [(i["name"], i["templates"]) for i in names["identities"]] == [("Obama", 1)]


def test_unknown_faces_are_grouped_in_the_background(db: Path, models) -> None:
    import threading
    import time

    c = make_client(db, models, refresh_s=0.2)
    ctx = c.app.state.ctx
    assert ctx.gallery.clusters.clusters(ctx.review.model)[1] == 0
    stop = threading.Event()
    ctx.start_refresher(stop)
    try:
        deadline = time.monotonic() + 60
        while ctx.gallery.clusters.clusters(ctx.review.model)[1] == 0:
            assert time.monotonic() < deadline, "no clusters after 60 s"
            time.sleep(0.2)
    finally:
        stop.set()
    page = c.get("/api/clusters").json()
    assert page["pending"] == 0 and page["total"] >= 3
