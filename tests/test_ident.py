"""`facemoe eval ident`: closed-set rank-N identification (first image per identity = gallery)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.config import AppConfig
from app.evaluate import eval_identification, identity_images

pytestmark = pytest.mark.unit


def _cfg(model_dir: Path) -> AppConfig:
    model = {"dir": str(model_dir), "backend": "torch", "threads": 1}
    return AppConfig.model_validate({"model": model})


def test_identity_images_orl(data_dir):
    by_id = identity_images(data_dir / "orl")
    assert len(by_id) == 40 and sum(map(len, by_id.values())) == 400
    assert list(by_id)[:3] == ["s1", "s2", "s3"]  # natural order
    assert by_id["s1"][:3] == ["s1/1.pgm", "s1/2.pgm", "s1/3.pgm"]
    assert by_id["s1"][-1] == "s1/10.pgm"


def test_identity_images_list_file(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    lst = tmp_path / "ids.txt"
    lst.write_text("# comment\nb10.jpg 7\nb2.jpg 7\n\na.jpg 3\n")
    assert identity_images(tmp_path, lst) == {"3": ["a.jpg"], "7": ["b2.jpg", "b10.jpg"]}
    lst.write_text("lonely\n")
    with pytest.raises(ValueError, match="expected 'filename identity'"):
        identity_images(tmp_path, lst)
    with pytest.raises(FileNotFoundError):
        identity_images(tmp_path / "missing")


def test_eval_identification_orl(tiny_model_dir, data_dir):
    report = eval_identification(_cfg(tiny_model_dir), data_dir / "orl", probe_res=[16])
    assert report["identities"] == 40 and report["images"] == 400
    assert report["gallery"] == 40 and report["distractors"] == 0 and report["unreadable"] == 0
    assert report["probes"] == 360 - report["no_face"]
    assert set(report["results"]) == {"native", "16px"}
    for res in report["results"].values():
        assert 0.0 <= res["rank1"] <= res["rank5"] <= 100.0
    json.dumps(report)


def test_eval_identification_split_no_face_and_distractors(tiny_model_dir, data_dir, tmp_path):
    """A first image without a face hands the gallery role to the next; a one-image identity
    is a distractor; unreadable files are counted."""
    orl = data_dir / "orl"
    root = tmp_path / "people"
    for ident, n in (("s1", 3), ("s2", 2), ("s3", 1)):
        (root / ident).mkdir(parents=True)
        for i in range(1, n + 1):
            shutil.copy(orl / ident / f"{i}.pgm", root / ident / f"{i + 1}.pgm")
    blank = np.full((112, 92, 3), 90, np.uint8)
    cv2.imwrite(str(root / "s1" / "1.png"), blank)  # no face; sorts first
    (root / "s2" / "9.jpg").write_bytes(b"not an image")
    report = eval_identification(_cfg(tiny_model_dir), root)
    assert (report["identities"], report["images"]) == (3, 8)
    assert (report["gallery"], report["probes"], report["distractors"]) == (3, 3, 1)
    assert (report["no_face"], report["unreadable"]) == (1, 1)


def test_cli_eval_ident(tiny_model_dir, data_dir, tmp_path, capsys):
    from app.cli import main

    root = tmp_path / "orl"
    for ident in ("s1", "s2", "s3", "s4"):
        shutil.copytree(data_dir / "orl" / ident, root / ident)
    cfg = tmp_path / "app.yaml"
    cfg.write_text(f"model: {{dir: {tiny_model_dir}, backend: torch, threads: 1}}\n")
    rc = main(["eval", "ident", "--root", str(root), "--config", str(cfg), "--probe-res", "16",
               "--probe-res", "12", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out)
    assert (report["gallery"], report["probes"]) == (4, 36 - report["no_face"])
    assert set(report["results"]) == {"native", "16px", "12px"}
    assert all(set(r) == {"rank1", "rank5"} for r in report["results"].values())
    rc = main(["eval", "ident", "--root", str(tmp_path / "nope"), "--config", str(cfg)])
    assert rc == 1 and "facemoe: error: no such image folder" in capsys.readouterr().err
