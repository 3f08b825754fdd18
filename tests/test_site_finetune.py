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
from trainer.site import (
    HELDOUT,
    TRAIN,
    VAL,
    FrozenSplit,
    Prepared,
    SiteConfig,
    _train_mode,
    _validate,
    cache_prefix,
    embed_cached,
    identification,
    onnx_prefix,
    train,
    trains,
    val_split,
)

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
    # the cache runs the prefix in ONNX Runtime: the same features (to float16's precision)
    runner = onnx_prefix(split)
    assert runner is not None
    crops = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    fast, slow = cache_prefix(split, crops, 2, runner), cache_prefix(split, crops, 2)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=1e-2,
                               atol=1e-2 * float(slow.float().abs().max()))


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


@pytest.mark.unit
def test_validation_tracks_are_whole_event_tracks_and_leave_one_to_train() -> None:
    # person 0: photo + 3 event tracks; person 1: photo + 1 event track; person 2: 2 tracks
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    track = np.array([-1, 1, 1, 2, 2, 3, 3, -2, 4, 5, 5, 6, 6])
    split = np.array([TRAIN] * 9 + [TRAIN, TRAIN, HELDOUT, HELDOUT])
    out = val_split(labels, split, track, 1, np.random.default_rng(0))
    assert out[0] == TRAIN and out[7] == TRAIN  # photos always train
    assert (out[labels == 1] == TRAIN).all()  # one event track: nothing to spare
    assert (out[11:] == HELDOUT).all() and (out[9:11] == TRAIN).all()  # held-out untouched
    val = set(track[out == VAL])
    assert len(val) == 1 and val < {1, 2, 3}  # one whole track of person 0 ...
    assert set(track[(out == TRAIN) & (labels == 0)]) & {1, 2, 3}  # ... and 2 still train
    for t in val:
        assert (out[track == t] == VAL).all()
    assert (val_split(labels, split, track, 0, np.random.default_rng(0)) == split).all()


@pytest.mark.unit
def test_identification_margin_and_accuracy() -> None:
    emb = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.2, 0.8], [0.8, 0.2]], np.float32)
    labels = np.array([0, 1, 0, 1, 1])
    split = np.array([TRAIN, TRAIN, HELDOUT, HELDOUT, HELDOUT])
    track = np.array([1, 2, 3, 4, 5])
    r = identification(emb, labels, split, track)
    assert (r["correct"], r["tracks"]) == (2, 3)  # track 5 looks like person 0
    n = np.linalg.norm
    cos = [(e / n(e)) for e in emb[2:]]
    expect = np.mean([cos[0][0] - cos[0][1], cos[1][1] - cos[1][0], cos[2][1] - cos[2][0]])
    assert r["margin"] == pytest.approx(expect, abs=1e-4)


@pytest.mark.unit
def test_batch_norm_statistics_stay_the_start_models_while_training() -> None:
    model = create_model("sface")
    _train_mode(model)
    before = {n: b.clone() for n, b in model.named_buffers()}
    model(torch.rand(4, 3, 112, 112) * 255)
    after = dict(model.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert model.training and any(m.training for m in model.modules()
                                  if isinstance(m, torch.nn.Dropout))


def _synthetic_site(lr: float) -> tuple[Prepared, SiteConfig]:
    """A random dense SFace cut at its head, and prefix features of 4 people (3 event tracks
    each, one of them for validation) that its head cannot yet tell apart."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("sface").eval()
    split = FrozenSplit(model, trains(model, "head"))
    people, per = 4, 3
    base = torch.randn(people, 1024, 7, 7)
    rows = [(p, t) for p in range(people) for t in range(per) for _ in range(2)]
    feats = torch.stack([base[p] + 0.8 * torch.randn(1024, 7, 7) for p, _ in rows]).half()
    labels = np.array([p for p, _ in rows])
    track = np.array([1 + p * per + t for p, t in rows])
    part = val_split(labels, np.full(len(rows), TRAIN), track, 1, rng)
    anchors = torch.randn(8, 1024, 7, 7).half()
    prep = Prepared(model, None, {}, {}, split, {"label_names": np.arange(people)}, labels,
                    part, track, feats, feats[:0], np.zeros(0, np.int64), anchors,
                    torch.from_numpy(embed_cached(split, anchors)), embed_cached(split, feats),
                    0.0)
    cfg = SiteConfig.model_validate({
        "model": {"init_from": "unused"}, "data": {"anchor_pool": "unused"},
        "optim": {"lr": lr, "steps": 20, "site_batch": 8, "anchor_batch": 4, "eval_every": 5,
                  "train": "head"}})
    return prep, cfg


@pytest.mark.unit
def test_the_step_is_chosen_on_validation_tracks() -> None:
    prep, cfg = _synthetic_site(lr=0.0)  # nothing can improve: the start model is kept
    start = {n: p.clone() for n, p in prep.model.named_parameters()}
    run = train(cfg, prep)
    assert run["chosen_step"] == 0 and [h["step"] for h in run["history"]] == [5, 10, 15, 20]
    assert all(torch.equal(start[n], p) for n, p in prep.model.named_parameters())
    prep, cfg = _synthetic_site(lr=1e-3)  # the head learns the people: a later step wins
    start_val = _validate(prep)
    run = train(cfg, prep)
    assert run["chosen_step"] > 0 and run["val"]["margin"] > start_val["margin"]
    assert run["val"]["margin"] == max(h["val"]["margin"] for h in run["history"])
    chosen = next(h for h in run["history"] if h["step"] == run["chosen_step"])
    assert chosen["val"] == run["val"] == _validate(prep)  # left at the chosen step


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
        .replace("anchor_faces: 400", "anchor_faces: 12")
        .replace("steps: 80", "steps: 4")
        .replace("site_batch: 16", "site_batch: 4")
        .replace("anchor_batch: 32", "anchor_batch: 4")
        .replace("runs/site-moe", str(work / "run")))
    small = recipe.read_text()  # the recipe's sizes were found and shrunk (or the test is slow)
    assert all(k in small for k in ("anchor_faces: 12", "steps: 4", "anchor_batch: 4"))
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
