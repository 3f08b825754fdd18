"""The review UI in a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium; nothing is downloaded): a wrong password is refused, the operator logs in, sees the
unknown faces of the Hamilton clip, names the close-up's cluster "Lin-Manuel Miranda" (and
the next run of the clip names him), and deletes a template. Screenshots of the main pages,
desktop and phone sized, go to out/screenshots/ (or $FACEMOE_SCREENSHOTS)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install -e .[web])")
pytest.importorskip("uvicorn", reason="the web extra is not installed (pip install -e .[web])")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (the dev extra)")

from app.config import WebConfig, load_config  # noqa: E402
from app.runtime import make_detector, make_embedder, open_gallery, threshold  # noqa: E402
from app.web.app import create_app  # noqa: E402
from app.web.auth import Authenticator  # noqa: E402
from app.web.context import WebContext  # noqa: E402
from tests.conftest import REPO_ROOT as REPO  # noqa: E402
from tests.web_helpers import HAMILTON, LIN, build_gallery, close_up, facemoe  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("no_gallery_key")]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PASSWORD = "hamilton-2016"


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run does)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download a browser
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots() -> Path:
    out = Path(os.environ.get("FACEMOE_SCREENSHOTS") or REPO / "out" / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir: Path) -> Iterator[tuple[str, WebContext]]:
    """`facemoe serve`'s app under uvicorn on a free loopback port, with a password."""
    yield from _serve(tmp_path_factory.mktemp("browser"), data_dir)


@pytest.fixture(scope="module")
def loose_server(tmp_path_factory, data_dir: Path) -> Iterator[tuple[str, WebContext]]:
    """The same with a loose grouping threshold (half the match threshold): groups hold more
    than one person."""
    yield from _serve(tmp_path_factory.mktemp("loose"), data_dir, loose=True)


def _serve(tmp: Path, data_dir: Path, *, loose: bool = False
           ) -> Iterator[tuple[str, WebContext]]:
    import uvicorn

    os.environ.pop("FACEMOE_GALLERY_KEY", None)
    os.environ.pop("FACEMOE_GALLERY_KEY_FILE", None)
    db = build_gallery(tmp / "gallery.db", data_dir / "videos")
    cfg = load_config(None)
    embedder = make_embedder(cfg)
    web = WebConfig(cluster_threshold=round(0.5 * threshold(cfg, embedder), 3) if loose else None)
    cfg = cfg.model_copy(update={"web": web})
    ctx = WebContext(cfg, open_gallery(db, embedder), make_detector(cfg), embedder,
                     threshold(cfg, embedder),
                     Authenticator(cfg.web, "127.0.0.1", env={"FACEMOE_WEB_PASSWORD": PASSWORD}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(100):
        if srv.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", ctx
    srv.should_exit = True
    thread.join(5)
    ctx.gallery.close()


def _login(driver, base: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/clusters")
    assert "/login" in driver.current_url
    driver.find_element(By.ID, "username").send_keys("admin")
    driver.find_element(By.ID, "password").send_keys(password)
    driver.find_element(By.ID, "login-button").click()


def test_review_ui_in_chromium(browser, server, shots: Path, data_dir: Path,
                               tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, ctx = server
    # a wrong password is refused
    _login(browser, base, "not-the-password")
    assert "/login" in browser.current_url
    assert "wrong user name or password" in browser.find_element(By.ID, "error").text
    browser.save_screenshot(str(shots / "login-refused.png"))

    _login(browser, base, PASSWORD)
    assert browser.current_url.endswith("/clusters")
    # the page is there once it has grouped the unknown faces (the URL changes before that)
    WebDriverWait(browser, 120).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "section.cluster"))
    # the unknown faces of the Hamilton clip, grouped; find the close-up's group
    events = [e.as_json() for e in ctx.gallery.stored_events()]
    target = close_up([e for e in events if e["identity"] is None])
    cluster = ctx.gallery.clusters.embeddings([target["id"]], ctx.review.model)[target["id"]][1]
    assert cluster is not None
    cards = browser.find_elements(By.CSS_SELECTOR, "section.cluster")
    assert len(cards) >= 3
    card = browser.find_element(By.ID, f"cluster-{cluster}")
    assert card.find_elements(By.CSS_SELECTOR, ".strip img")
    browser.save_screenshot(str(shots / "clusters.png"))

    card.find_element(By.CSS_SELECTOR, "input[name=name]").send_keys(LIN)
    card.find_element(By.CSS_SELECTOR, ".name-form button").click()
    msg = browser.find_element(By.ID, "msg").text
    assert f"cluster {cluster} is {LIN}" in msg, msg
    assert not browser.find_elements(By.ID, f"cluster-{cluster}")

    # processing the clip again names him
    out = facemoe("process", data_dir / "videos" / HAMILTON, "--gallery", ctx.gallery.location,
                  "--json", "--camera", "second-run", "--no-progress")
    assert LIN in json.loads(out.stdout)["identified"]
    browser.get(f"{base}/events?camera=second-run")
    assert LIN in browser.find_element(By.CSS_SELECTOR, ".grid").text
    browser.save_screenshot(str(shots / "events.png"))
    browser.get(f"{base}/events?unknown=true")
    browser.save_screenshot(str(shots / "events-unknown.png"))

    # the gallery: his templates, then delete one
    browser.get(f"{base}/gallery")
    browser.save_screenshot(str(shots / "gallery.png"))
    browser.find_element(By.CSS_SELECTOR, f'a[data-identity="{LIN}"]').click()
    templates = browser.find_elements(By.CSS_SELECTOR, "figure.template")
    assert len(templates) >= 3
    browser.save_screenshot(str(shots / "identity.png"))
    first = templates[0].get_attribute("data-template")
    browser.find_element(By.ID, f"delete-template-{first}").click()
    assert f"template {first} deleted" in browser.find_element(By.ID, "msg").text
    left = browser.find_elements(By.CSS_SELECTOR, "figure.template")
    assert len(left) == len(templates) - 1
    assert first not in [t.get_attribute("data-template") for t in left]

    browser.get(f"{base}/docs")
    assert "/api/clusters/{cluster_id}/name" in browser.page_source
    browser.save_screenshot(str(shots / "api.png"))

    # an event page, and the pages on a phone-sized screen
    browser.get(f"{base}/events/{target['id']}")
    assert len(browser.find_elements(By.CSS_SELECTOR, "figure.tile img")) == 3
    browser.save_screenshot(str(shots / "event.png"))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    for page in ("clusters", "events", "gallery"):
        browser.get(f"{base}/{page}")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390, f"/{page} scrolls sideways on a phone ({width} px)"
        browser.save_screenshot(str(shots / f"phone-{page}.png"))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert len(list(shots.glob("*.png"))) >= 11
    shutil.copy(shots / "clusters.png", tmp_path / "clusters.png")


def test_corrections_and_groups_in_chromium(browser, loose_server, shots: Path) -> None:
    """Merge a group by picking it, name a group that holds a face of someone else (that face's
    event stays unknown), then "not this person", relabel and delete an event."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, ctx = loose_server
    browser.delete_all_cookies()
    _login(browser, base, PASSWORD)
    WebDriverWait(browser, 120).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "section.cluster"))
    target = close_up([e.as_json() for e in ctx.gallery.stored_events()])
    cluster = ctx.gallery.clusters.embeddings([target["id"]], ctx.review.model)[target["id"]][1]
    # merge: another group is picked from a list, most similar first, not typed by number
    card = browser.find_element(By.ID, f"cluster-{cluster}")
    pick = Select(card.find_element(By.CSS_SELECTOR, "select[name=other]"))
    other = int(pick.options[0].get_attribute("value"))
    pick.select_by_index(0)
    card.find_element(By.CSS_SELECTOR, "form[action$='/merge'] button").click()
    assert f"cluster {other} merged into {cluster}" in browser.find_element(By.ID, "msg").text
    members = ctx.gallery.clusters.cluster_events(cluster)
    card = browser.find_element(By.ID, f"cluster-{cluster}")
    card.find_element(By.CSS_SELECTOR, "input[name=name]").send_keys(LIN)
    card.find_element(By.CSS_SELECTOR, ".name-form button").click()
    msg = browser.find_element(By.ID, "msg").text
    assert f"cluster {cluster} is {LIN}" in msg and "left unknown" in msg, msg
    names = {e: ctx.gallery.pages.event(e).event.identity for e in members}
    left = [e for e, n in names.items() if n is None]
    assert left and target["id"] not in left and names[target["id"]] == LIN
    browser.get(f"{base}/events/{left[0]}")
    assert "unknown" in browser.find_element(By.TAG_NAME, "main").text

    # "not this person" on a named event, then relabel it, then delete it
    named = next(e for e, n in names.items() if n == LIN and e != target["id"])
    browser.get(f"{base}/events/{named}")
    browser.find_element(By.CSS_SELECTOR, "#not-person button").click()
    assert f"is not {LIN}" in browser.find_element(By.ID, "msg").text
    assert ctx.gallery.pages.event(named).event.identity is None
    assert not browser.find_elements(By.ID, "not-person")
    browser.save_screenshot(str(shots / "event-corrected.png"))
    form = browser.find_element(By.ID, "relabel-event")
    form.find_element(By.NAME, "name").send_keys(LIN)
    form.find_element(By.TAG_NAME, "button").click()
    assert f"unknown → {LIN}" in browser.find_element(By.ID, "msg").text
    assert ctx.gallery.pages.event(named).event.identity == LIN
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
    browser.get(f"{base}/events/{named}")
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 390, f"an event page scrolls sideways on a phone ({width} px)"
    browser.save_screenshot(str(shots / "phone-event.png"))
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    form = browser.find_element(By.ID, "delete-event")
    form.find_element(By.NAME, "confirm").click()
    form.find_element(By.TAG_NAME, "button").click()
    assert browser.current_url.split("?")[0].endswith("/events")
    assert f"event {named} deleted" in browser.find_element(By.ID, "msg").text
    browser.get(f"{base}/events/{named}")
    assert f"no event {named}" in browser.find_element(By.ID, "error").text
    actions = [a.action for a in ctx.gallery.audit()]
    assert {"not_person", "relabel", "delete_events"} <= set(actions)


def test_fleet_page_and_snapshots_in_chromium(browser, server, shots: Path,
                                              data_dir: Path) -> None:
    """`facemoe serve` shows the site's boxes and cameras from their heartbeats in the
    database (linked from the nav), flags a silent box and a camera name two live boxes
    claim; /api/boxes and /api/cameras answer; an event's snapshot, stored in the database,
    shows on its page."""
    from dataclasses import replace
    from datetime import datetime, timedelta, timezone

    import cv2
    from selenium.webdriver.common.by import By

    from app.gallery.db import BoxRow
    from app.gallery.fleet import Fleet
    from tests.gallery_helpers import event

    base, ctx = server
    face_photo = cv2.imread(str(data_dir / "videos" / "obama_small.jpg"))
    fleet, now = Fleet(ctx.gallery.store), datetime.now(timezone.utc)

    def cam(name: str, frames: int) -> dict:
        return {"name": name, "state": "running", "fps": 14.5, "frames": frames, "dropped": 2,
                "reconnects": 1, "events": 3, "last_frame_age_s": 0.1, "error": None,
                "last_event": now.isoformat()}

    fleet.beat("box-a", now, "ok", [cam("stage", 900), cam("lobby", 800)], [])
    fleet.beat("box-b", now, "degraded", [cam("lobby", 700)], ["camera lobby: box box-a has "
                                                              "a camera of that name too"])
    fleet.beat("box-gone", now, "ok", [cam("yard", 5)], [])
    ctx.gallery.store.db.write("age box-gone", lambda s: setattr(
        s.get(BoxRow, "box-gone"), "seen_at", now - timedelta(minutes=10)))
    ev = replace(event(90001, None), camera="stage", snapshot_image=face_photo)
    ctx.gallery.event_store.add([ev])
    row = next(e.id for e in ctx.gallery.event_store.stored() if e.event.id == ev.id)

    browser.delete_all_cookies()
    _login(browser, base, PASSWORD)
    browser.get(f"{base}/events")
    browser.find_element(By.LINK_TEXT, "Fleet").click()
    assert browser.current_url.endswith("/fleet")
    boxes = {s.get_attribute("id"): s for s in browser.find_elements(By.CSS_SELECTOR,
                                                                     "section.box")}
    assert {"box-box-a", "box-box-b", "box-box-gone"} <= set(boxes)
    a_cams = [r.text.split()[0] for r in boxes["box-box-a"].find_elements(By.CSS_SELECTOR,
                                                                          "tr.camera")]
    assert a_cams == ["stage", "lobby"]
    assert "SILENT" in boxes["box-box-gone"].text and "SILENT" not in boxes["box-box-a"].text
    assert "also on box-b" in boxes["box-box-a"].text
    clash = browser.find_element(By.CSS_SELECTOR, ".clash").text
    assert "camera 'lobby' is claimed by boxes box-a, box-b" in clash
    browser.save_screenshot(str(shots / "fleet.png"))

    browser.get(f"{base}/api/boxes")
    api = {b["box"]: b for b in json.loads(browser.find_element(By.TAG_NAME, "body").text)}
    assert api["box-gone"]["silent"] and not api["box-a"]["silent"]
    browser.get(f"{base}/api/cameras")
    cams = json.loads(browser.find_element(By.TAG_NAME, "body").text)
    assert {(c["box"], c["name"]) for c in cams} >= {("box-a", "stage"), ("box-b", "lobby"),
                                                     ("box-gone", "yard")}
    assert next(c for c in cams if c["box"] == "box-b")["clash"] == ["box-a"]

    browser.get(f"{base}/events/{row}")
    img = browser.find_element(By.CSS_SELECTOR, "figure.snapshot img")
    assert browser.execute_script("return arguments[0].naturalWidth", img) == face_photo.shape[1]
    browser.save_screenshot(str(shots / "event-snapshot.png"))
