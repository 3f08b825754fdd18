"""Site fine-tuning from the review UI's labels (`facemoe finetune --from-gallery`).

Unit: the frozen-prefix cut equals the whole network (dense and upcycled), `use-model`'s config
edit. End to end (small, real data): three CelebA people (training-side identities) enrolled
from one photo each and rendered into a low-resolution clip, processed by `facemoe process`,
named through the REST API of a real `facemoe serve` by the benchmark's reviewer; then the pool
(whole tracks held out), the one-line refusal, the fine-tune with its report and model card,
the erasure that marks the model for retraining, and the switch to the model and back.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from app.config import ConfigError
from app.erasure import Outputs, erase
from app.gallery import Gallery
from app.gallery.db import IdentityRow
from app.sitemodel import set_model_dir
from app.sitepool import PoolRules, SitePoolError, build_site_pool
from tests.gallery_helpers import event
from trainer.models import create_model
from trainer.preprocess import ARCFACE_112
from trainer.site import HELDOUT, TRAIN, FrozenSplit

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.unit
@pytest.mark.parametrize("arch, cut", [("sface", "head"), ("facemoe-sface", "stages.3.6")])
def test_frozen_prefix_cut_computes_the_whole_network(arch: str, cut: str) -> None:
    torch.manual_seed(0)
    model = create_model(arch).eval()
    split = FrozenSplit(model)
    assert split.cut == cut
    x = torch.rand(2, 3, 112, 112) * 255
    with torch.no_grad():
        torch.testing.assert_close(split.suffix(split.prefix(x)), model(x))
    trainable = {id(p) for n, p in model.named_parameters() if model.probe_trainable(n)}
    frozen = {id(p) for b in split._prefix for p in b.parameters()}
    assert trainable and frozen and not trainable & frozen


@pytest.mark.unit
@pytest.mark.parametrize("text, expect", [
    ("gallery:\n  path: g.db\n", "gallery:\n  path: g.db\nmodel:\n  dir: \"m/x\"\n"),
    ("model:\n  dir: models/sface  # shipped\n  threads: 2\ngallery:\n  path: g.db\n",
     "model:\n  dir: \"m/x\"\n  threads: 2\ngallery:\n  path: g.db\n"),
    ("# site\nmodel:\n    threads: 2\n", "# site\nmodel:\n    dir: \"m/x\"\n    threads: 2\n"),
])
def test_use_model_sets_model_dir_and_keeps_the_rest(text: str, expect: str) -> None:
    assert set_model_dir(text, "m/x") == expect


@pytest.mark.unit
def test_use_model_refuses_an_inline_model_section() -> None:
    with pytest.raises(ConfigError, match="inline"):
        set_model_dir("model: {dir: a}\n", "b")


def _named_tracks(g: Gallery, tracks: dict[str, int], rng: np.random.Generator) -> None:
    """Enroll each person from one photo and store `tracks[name]` named events with 2 crops."""
    n = 0
    for name, count in tracks.items():
        g.enroll(name, rng.normal(size=(1, 128)), ["photo.jpg"], [0.9],
                 [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)])
        evs = []
        for _ in range(count):
            n += 1
            evs.append(replace(event(n, name), crops=[
                (0.9, rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)) for _ in range(2)]))
        g.add_events(evs, crops=2)


@pytest.mark.unit
@pytest.mark.usefixtures("no_gallery_key")
def test_too_little_is_refused_naming_what_is_missing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with Gallery(tmp_path / "g.db", "m", "1") as g:
        _named_tracks(g, {"ada": 3, "bob": 1, "cy": 2}, rng)
        with pytest.raises(SitePoolError) as err:
            build_site_pool(g, ARCFACE_112, PoolRules(min_identities=3, min_tracks=2))
        msg = str(err.value)
        assert "\n" not in msg and "2 identities have 2+ named tracks" in msg
        assert "'bob' has 1" in msg and "3 are needed" in msg
        pool = build_site_pool(g, ARCFACE_112, PoolRules(min_identities=2, min_tracks=2))
    # bob's one track trains; ada and cy each keep a training track and hold one out whole
    assert pool.summary()["heldout_identities"] == 2
    assert not set(pool.track[pool.split == HELDOUT]) & set(pool.track[pool.split == TRAIN])
    assert pool.crops.shape[1:] == (112, 112, 3)


@pytest.mark.unit
@pytest.mark.usefixtures("no_gallery_key")
def test_an_erasure_marks_the_models_trained_on_the_person(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    with Gallery(tmp_path / "g.db", "m", "1") as g:
        _named_tracks(g, {"ada": 2, "bob": 2}, rng)
        with g.store.db.read("ids") as session:
            ids = dict(session.execute(select(IdentityRow.name, IdentityRow.id)).all())
        model_dir = tmp_path / "site-model"
        model_dir.mkdir()
        g.trained.record("site@1", "ab" * 32, str(model_dir), {ids["ada"]: 2, ids["bob"]: 2})
        g.trained.record("other@1", "cd" * 32, str(model_dir), {ids["bob"]: 1})
        assert g.trained.needs_retraining() == []
        report = erase(g, Outputs(), name="ada")
        assert report.models_to_retrain == ["site@1"]
        assert "site@1" in report.summary()
        retrain = g.trained.needs_retraining()
        assert [(r.model, r.erased) for r in retrain] == [("site@1", 1)]
        assert "retrain it" in retrain[0].line()


def facemoe(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "app.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    if check and done.returncode:
        raise AssertionError(f"facemoe {args} failed: {done.stderr[-1500:]}")
    return done


@pytest.fixture(scope="module")
def site(tmp_path_factory, shared_dir: Path, data_dir: Path):
    """The stand-in site (benchmarks/site_finetune.py at its smallest), a small anchor pool
    (UTKFace faces of the teacher pool) and the upcycled start model."""
    pytest.importorskip("httpx", reason="the reviewer talks to facemoe serve with httpx")
    from app.dataprep import prepare_teacher_pool
    from benchmarks import site_finetune as bench

    if not (REPO / "models" / "sface" / "model.onnx").is_file():
        pytest.skip("SFace is not installed (install.sh imports it to models/sface)")
    work = tmp_path_factory.mktemp("site")
    config, db, info = bench.build_site(shared_dir, work / "site", people=3, tracks=2,
                                        cameras=1, seed=1)
    teacher = np.load(data_dir / "teacher" / "dlib_resnet_v1.npz")
    pick = [i for i, p in enumerate(teacher["paths"]) if str(p).startswith("utkface/")][:24]
    subset = work / "teacher-subset.npz"
    np.savez(subset, **{k: teacher[k][pick] for k in ("paths", "embeddings", "landmarks")})
    prepare_teacher_pool(subset, data_dir, work / "anchors.npz")
    start = work / "facemoe-sface"
    facemoe("import", "sface", "--architecture", "facemoe-sface", "--out", start)
    recipe = work / "recipe.yaml"
    recipe.write_text(
        (REPO / "configs" / "finetune-site.yaml").read_text()
        .replace("cache/facemoe-sface-init", str(start))
        .replace("cache/pool112.npz", str(work / "anchors.npz"))
        .replace("anchor_faces: 200", "anchor_faces: 12")
        .replace("steps: 120", "steps: 4")
        .replace("site_batch: 16", "site_batch: 4")
        .replace("anchor_batch: 16", "anchor_batch: 4")
        .replace("runs/site-moe", str(work / "run")))
    return {"work": work, "config": config, "db": db, "info": info, "recipe": recipe,
            "start": start}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.usefixtures("no_gallery_key")
def test_site_finetune_from_the_reviewers_labels(site) -> None:
    info, db, work = site["info"], site["db"], site["work"]
    assert info["review"]["refused"] == 0 and info["review"]["named"] >= 1
    assert info["review"]["named"] + info["review"]["confirmed"] >= 5  # of 6 tracks

    # too little: one line that says what is missing, nothing written
    short = facemoe("data", "prepare", "--from-gallery", db, "--out-pool", work / "no.npz",
                    "--min-identities", "5", check=False)
    assert short.returncode == 1 and len(short.stderr.strip().splitlines()) == 1
    assert "5 are needed" in short.stderr and "name more events" in short.stderr
    assert not (work / "no.npz").exists()

    # the pool: whole tracks held out per identity, never a held-out crop in training
    out = json.loads(facemoe("data", "prepare", "--from-gallery", db, "--out-pool",
                             work / "pool.npz", "--json").stdout)
    assert out["identities"] == 3 and out["heldout_identities"] == 3
    assert stat.S_IMODE((work / "pool.npz").stat().st_mode) == 0o600
    pool = np.load(work / "pool.npz")
    held = set(pool["track"][pool["split"] == HELDOUT])
    trained = set(pool["track"][pool["split"] == TRAIN])
    assert held and not held & trained
    for label in range(3):
        mine = pool["labels"] == label
        assert (mine & (pool["split"] == TRAIN)).any() and (mine & (pool["split"] == HELDOUT)).any()

    # the fine-tune, its report and the model card naming the gallery
    report = json.loads(facemoe("finetune", "--config", site["recipe"], "--from-gallery", db,
                                "--app-config", site["config"], "--json").stdout)
    ident = report["site_heldout_identification"]
    assert ident["before"]["tracks"] == ident["after"]["tracks"] == out["heldout_tracks"]
    assert report["anchor_cosine_to_start"] > 0.9
    experts = report["experts"]["moe_layers"][0]["experts"]
    assert len(experts) == 4 and all(e["change_l2"] > 0 for e in experts)
    model_dir = Path(report["model_dir"])
    card = (model_dir / "MODEL_CARD.md").read_text()
    assert str(db) in card and "site fine-tune" in card
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["data"]["site_gallery"] == str(db)
    assert "held-out tracks" in (model_dir.parent / "site_report.md").read_text()

    # switch to it (re-embeds the gallery) and back
    start = site["start"]
    facemoe("use-model", model_dir, "--config", site["config"])
    assert f'dir: "{model_dir}"' in site["config"].read_text()
    listed = json.loads(facemoe("gallery", "settings", "--config", site["config"],
                                "--json").stdout)
    assert listed["model"] == report["model"]
    facemoe("use-model", start, "--config", site["config"])
    listed = json.loads(facemoe("gallery", "settings", "--config", site["config"],
                                "--json").stdout)
    assert listed["model"].startswith("facemoe-sface@")

    # privacy: erasing someone it learned from marks the model for retraining
    check = json.loads(facemoe("gallery", "check", "--config", site["config"], "--json").stdout)
    assert check["models_to_retrain"] == []
    removed = facemoe("gallery", "remove", str(pool["label_names"][0]), "--config",
                      site["config"])
    assert report["model"] in removed.stdout + removed.stderr
    check = facemoe("gallery", "check", "--config", site["config"], "--json")
    retrain = json.loads(check.stdout)["models_to_retrain"]
    assert [r["model"] for r in retrain] == [report["model"]]
    assert retrain[0]["model_sha256"] == report["model_sha256"]
