"""The CompreFace-compatible API (/api/v1): CompreFace's own Python SDK (`compreface-sdk` 0.6.0
from PyPI, in a venv of its own because it needs urllib3 < 2) against a running `facemoe
serve`, and the parts the SDK cannot send (base64 bodies, errors, keys, parameters) through
FastAPI's client. Photos from the shared data (Obama, Biden)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

pytest.importorskip("fastapi", reason="the web extra is not installed (pip install -e .[web])")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the dev extra)")

from fastapi.testclient import TestClient  # noqa: E402

from app import paths  # noqa: E402
from app.config import WebConfig, load_config  # noqa: E402
from app.runtime import open_gallery, threshold  # noqa: E402
from app.web.app import create_app  # noqa: E402
from app.web.auth import Authenticator, hash_token  # noqa: E402
from app.web.context import WebContext  # noqa: E402
from tests.conftest import REPO_ROOT as REPO  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("no_gallery_key")]
KEY, READ_ONLY_KEY, TOKEN = "cf-write-7d1e", "cf-read-2b9c", "product-token-5e"
API_KEYS = [{"name": "doubletake", "key_hash": hash_token(KEY)},
            {"name": "viewer", "key_hash": hash_token(READ_ONLY_KEY), "read_only": True}]
SDK = "compreface-sdk==0.6.0"
SDK_VENV = REPO / "cache" / "compreface-sdk-0.6.0"
W, R = {"x-api-key": KEY}, {"x-api-key": READ_ONLY_KEY}


@pytest.fixture
def client(models, tmp_path: Path) -> TestClient:
    cfg = load_config(None)
    cfg = cfg.model_copy(update={"web": WebConfig(api_keys=API_KEYS,
                                                  token_hashes=[hash_token(TOKEN)])})
    detector, embedder = models
    ctx = WebContext(cfg, open_gallery(tmp_path / "gallery.db", embedder), detector, embedder,
                     threshold(cfg, embedder), Authenticator(cfg.web, "127.0.0.1", env={}))
    return TestClient(create_app(ctx), base_url="http://127.0.0.1:8080")


def photo(data_dir: Path, name: str) -> dict:
    return {"file": (name, (data_dir / "videos" / name).read_bytes(), "image/jpeg")}


def b64(data_dir: Path, name: str) -> str:
    return base64.b64encode((data_dir / "videos" / name).read_bytes()).decode()


def two_faces(data_dir: Path) -> bytes:
    """Obama (larger) and Biden side by side in one JPEG."""
    a = cv2.imread(str(data_dir / "videos" / "obama.jpg"))
    b = cv2.imread(str(data_dir / "videos" / "biden.jpg"))
    b = cv2.resize(b, (round(b.shape[1] * a.shape[0] * 0.6 / b.shape[0]), round(a.shape[0] * 0.6)))
    b = np.pad(b, ((0, a.shape[0] - b.shape[0]), (0, 0), (0, 0)))
    return cv2.imencode(".jpg", np.hstack([a, b]))[1].tobytes()


def test_keys_read_only_and_one_line_errors(client: TestClient, data_dir: Path) -> None:
    r = client.get("/api/v1/recognition/faces")
    assert r.status_code == 401 and r.json()["message"] == "an x-api-key header is required"
    r = client.post("/api/v1/recognition/recognize", files=photo(data_dir, "obama2.jpg"))
    assert r.status_code == 401  # refused before its body is read
    r = client.get("/api/v1/recognition/faces", headers={"x-api-key": "guess"})
    assert r.status_code == 401 and "not a key" in r.json()["message"]
    r = client.post("/api/v1/recognition/recognize", files=photo(data_dir, "obama2.jpg"),
                    headers={"x-api-key": "guess"})
    assert r.status_code == 401
    r = client.post("/api/v1/recognition/faces?subject=Obama", headers=R,
                    files=photo(data_dir, "obama.jpg"))
    assert r.status_code == 403 and r.json() == {"message": "this API key is read-only",
                                                 "code": 403}
    r = client.post("/api/v1/recognition/faces?subject=Obama", headers=W,
                    files=photo(data_dir, "obama.jpg"))
    assert r.status_code == 201 and r.json()["subject"] == "Obama", r.text
    face = r.json()["image_id"]
    for call in (client.delete(f"/api/v1/recognition/faces/{face}", headers=R),
                 client.delete("/api/v1/recognition/subjects/Obama", headers=R),
                 client.post("/api/v1/recognition/subjects", json={"subject": "X"}, headers=R)):
        assert call.status_code == 403
    r = client.post("/api/v1/recognition/recognize", headers=R, files=photo(data_dir, "obama2.jpg"))
    assert r.status_code == 200 and r.json()["result"][0]["subjects"][0]["subject"] == "Obama"
    r = client.post("/api/v1/recognition/recognize", files=photo(data_dir, "obama2.jpg"),
                    headers={"Authorization": f"Bearer {TOKEN}"})  # the product's own token
    assert r.status_code == 200 and r.json()["result"][0]["subjects"][0]["subject"] == "Obama"
    # bad values and images: one line, CompreFace's error shape; no face is code 28
    r = client.post("/api/v1/recognition/recognize?limit=-1", headers=W,
                    files=photo(data_dir, "obama2.jpg"))
    assert r.status_code == 400 and r.json()["message"].startswith("limit: ")
    r = client.post("/api/v1/detection/detect?det_prob_threshold=2", headers=W,
                    files=photo(data_dir, "obama2.jpg"))
    assert r.status_code == 400 and r.json()["message"].startswith("det_prob_threshold: ")
    blank = cv2.imencode(".png", np.full((64, 64, 3), 200, np.uint8))[1].tobytes()
    r = client.post("/api/v1/recognition/recognize", headers=W, files={"file": ("b.png", blank)})
    assert r.status_code == 400
    assert r.json() == {"message": "No face is found in the given image", "code": 28}
    r = client.post("/api/v1/detection/detect", headers=W, json={"file": "not base64!"})
    assert r.status_code == 400 and r.json()["message"] == "file is not valid base64"
    r = client.post("/api/v1/detection/detect", headers=W, files={"image": ("a.jpg", blank)})
    assert r.status_code == 400 and r.json()["message"] == "file is required (an image file)"
    r = client.delete("/api/v1/recognition/faces/12345", headers=W)
    assert r.status_code == 404 and r.json()["message"] == "no face with id 12345"
    r = client.delete("/api/v1/recognition/faces", headers=W)
    assert r.status_code == 400 and "subject is required" in r.json()["message"]
    assert all("\n" not in e["message"] for e in [r.json()])
    audit = client.app.state.ctx.gallery.audit()
    assert any(a.action == "enroll" and a.user == "api key doubletake (web)" for a in audit)


def test_base64_limit_threshold_and_prediction_count(client: TestClient,
                                                     data_dir: Path) -> None:
    for name, subject in (("obama.jpg", "Barack Obama"), ("biden.jpg", "Joe Biden")):
        r = client.post(f"/api/v1/recognition/faces?subject={subject}", headers=W,
                        json={"file": "data:image/jpeg;base64," + b64(data_dir, name)})
        assert r.status_code == 201, r.text
    both = base64.b64encode(two_faces(data_dir)).decode()
    r = client.post("/api/v1/recognition/recognize?prediction_count=2", headers=W,
                    json={"file": both})
    faces = r.json()["result"]
    assert [f["subjects"][0]["subject"] for f in faces] == ["Barack Obama", "Joe Biden"]
    assert all(len(f["subjects"]) == 2 for f in faces)
    assert faces[0]["subjects"][0]["similarity"] >= 0.5 > faces[0]["subjects"][1]["similarity"]
    first = faces[0]["box"]
    assert first["x_max"] - first["x_min"] > faces[1]["box"]["x_max"] - faces[1]["box"]["x_min"]
    r = client.post("/api/v1/recognition/recognize?limit=1&face_plugins=landmarks,calculator",
                    headers=W, json={"file": both})
    (face,) = r.json()["result"]
    assert face["subjects"][0]["subject"] == "Barack Obama" and len(face["subjects"]) == 1
    ctx = client.app.state.ctx
    assert len(face["landmarks"]) == 5 and len(face["embedding"]) == ctx.embedder.dim
    scores = sorted(f["box"]["probability"] for f in faces)
    assert scores[0] < scores[1]
    between = (scores[0] + scores[1]) / 2
    r = client.post(f"/api/v1/detection/detect?det_prob_threshold={between}&status=true",
                    headers=W, json={"file": both})
    assert [f["box"]["probability"] for f in r.json()["result"]] == [scores[1]]
    assert r.json()["plugins_versions"]["calculator"] == ctx.embedder.model
    r = client.post("/api/v1/verification/verify", headers=W,
                    json={"source_image": b64(data_dir, "biden.jpg"), "target_image": both})
    (result,) = r.json()["result"]
    matches = result["face_matches"]
    assert len(matches) == 2 and matches[0]["similarity"] >= 0.5 > matches[1]["similarity"]
    assert matches[0]["box"] == faces[1]["box"]
    r = client.get("/api/v1/recognition/faces?size=1&page=1", headers=R)
    assert r.json()["faces"][0]["subject"] == "Joe Biden"
    assert (r.json()["total_pages"], r.json()["total_elements"]) == (2, 2)
    r = client.put("/api/v1/recognition/subjects/Joe Biden", headers=W,
                   json={"subject": "Barack Obama"})
    assert r.json() == {"updated": True}
    r = client.get("/api/v1/recognition/subjects", headers=R)
    assert r.json() == {"subjects": ["Barack Obama"]}
    r = client.delete("/api/v1/recognition/faces?subject=Barack Obama", headers=W)
    assert r.json() == {"deleted": 2}


# --- CompreFace's Python SDK against `facemoe serve` ------------------------------------------


@pytest.fixture(scope="module")
def sdk_python() -> Path:
    """The SDK's own venv (made once, kept under cache/); skips where PyPI is out of reach."""
    python = SDK_VENV / "bin" / "python"
    if not (SDK_VENV / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(SDK_VENV)], check=True,
                       timeout=300)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", SDK, "urllib3<2"],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            pytest.skip(f"cannot install {SDK}: {lines[-1] if lines else done.returncode}")
        (SDK_VENV / ".installed").write_text(SDK + "\n")
    return python


def test_compreface_sdk_against_facemoe_serve(sdk_python: Path, tmp_path: Path,
                                              data_dir: Path) -> None:
    from benchmarks.rtsp_camera import free_port

    raw = yaml.safe_load(paths.default_config().read_text())
    raw.setdefault("web", {})["api_keys"] = API_KEYS
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--config", str(config), "--port", str(port),
         "--gallery", str(tmp_path / "gallery.db")], cwd=REPO, stdout=log,
        stderr=subprocess.STDOUT, env={**{k: v for k, v in os.environ.items()
                                          if not k.startswith("FACEMOE_WEB_")},
                                       "FACEMOE_WEB_TOKEN": TOKEN})  # so keys pass the auth check
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=3).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "facemoe serve did not answer in 90 s"
                time.sleep(0.3)
        done = subprocess.run(
            [str(sdk_python), str(REPO / "tests" / "compreface_sdk_client.py"),
             "http://127.0.0.1", str(port), KEY, READ_ONLY_KEY, str(data_dir / "videos")],
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout)
    finally:
        server.terminate()
        server.wait(10)
        log.close()
    started = (tmp_path / "serve.log").read_text()
    assert f"serving the review UI on http://127.0.0.1:{port}/" in started  # serve says where
    obama, biden = out["add"]["image_id"], out["add_bytes"]["image_id"]
    assert out["add"]["subject"] == "Barack Obama" and obama != biden
    assert sorted((f["image_id"], f["subject"]) for f in out["faces"]["faces"]) == sorted(
        [(obama, "Barack Obama"), (biden, "Joe Biden")])
    assert out["subjects"] == {"subjects": ["Barack Obama", "Joe Biden"]}
    (face,) = out["recognize"]["result"]
    assert [s["subject"] for s in face["subjects"]] == ["Barack Obama", "Joe Biden"]
    assert face["subjects"][0]["similarity"] >= 0.5 > face["subjects"][1]["similarity"]
    (face,) = out["recognize_bytes"]["result"]
    assert face["subjects"][0]["subject"] == "Joe Biden" and len(face["landmarks"]) == 5
    assert out["verify_stored"]["result"][0]["similarity"] >= 0.5
    same, other = out["verify_same"]["result"][0], out["verify_other"]["result"][0]
    assert same["face_matches"][0]["similarity"] >= 0.5 > other["face_matches"][0]["similarity"]
    assert len(out["detect"]["result"]) == 1
    assert out["read_only_recognize"]["result"][0]["subjects"][0]["subject"] == "Barack Obama"
    assert out["read_only_add"] == out["read_only_delete"] == {
        "message": "this API key is read-only", "code": 403}
    assert out["delete_face"] == {"image_id": biden, "subject": "Joe Biden"}
    assert out["delete_subject"] == {"subject": "Barack Obama"}
    assert out["subjects_after"] == {"subjects": ["Joe Biden"]}
    assert out["faces_after"]["faces"] == [] and out["faces_after"]["total_elements"] == 0
