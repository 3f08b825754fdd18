"""`facemoe finetune --from-gallery`: the site fine-tune from the gallery's labels, end to end.

1. the site pool from the gallery (`app.sitepool`: named tracks, whole tracks held out);
2. the recipe (`trainer.site`) from the shipped model's trainer artifact;
3. LFW before and after (native and 16 px: the forgetting check), when LFW is given;
4. the record in the gallery of which identities the model learned from (an erasure then
   marks it for retraining: `app.gallery.training`), the model card (names the gallery) and
   the operator's report `site_report.md` next to `site_report.json`.
Switching the product to the new model is `facemoe use-model DIR` (`app.sitemodel`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.config import AppConfig
from app.gallery import Gallery
from app.sitepool import HELDOUT, PoolRules, build_site_pool, save_pool
from trainer.manifest import model_id, read_manifest
from trainer.preprocess import CropTemplate
from trainer.site import load_site_config, site_finetune

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lfw:
    root: Path
    pairs: Path
    probe_res: tuple[int, ...] = (16,)
    before: Path | None = None  # `facemoe eval lfw --json` of the start model, measured once


def lfw_results(report: dict) -> dict[str, float]:
    """{'native': %, '16px': %, ...} of a `facemoe eval lfw --json` report."""
    return {str(k): float(v["accuracy"]) for k, v in report["results"].items()}


def lfw_accuracy(app_cfg: AppConfig, lfw: Lfw, model_dir: str) -> dict[str, float]:
    """{'native': %, '16px': %, ...}: `facemoe eval lfw`'s 10-fold accuracy of `model_dir`."""
    from app.evaluate import eval_lfw

    return lfw_results(eval_lfw(app_cfg, lfw.root, lfw.pairs, list(lfw.probe_res),
                                model_dir=model_dir))


def finetune_from_gallery(config: str | Path, gallery: Gallery, app_cfg: AppConfig, *,
                          overrides: dict[str, Any] | None = None,
                          rules: PoolRules | None = None, lfw: Lfw | None = None) -> dict:
    """Run steps 1-4 (see the module); returns the report (also in the run directory)."""
    t0 = time.time()
    cfg = load_site_config(config, overrides)
    template = CropTemplate.from_manifest(read_manifest(cfg.model.init_from))
    # SitePoolError (too little named) before anything is written
    pool = build_site_pool(gallery, template, rules or PoolRules())
    out = Path(cfg.run.out_dir)
    pool_path = save_pool(pool, out / "site-pool.npz")
    cfg = load_site_config(config, {**(overrides or {}), "data.site_pool": str(pool_path)})
    run_dir = site_finetune(cfg)
    report = json.loads((run_dir / "site_report.json").read_text())
    if lfw is not None:
        t_lfw = time.time()
        after = lfw_accuracy(app_cfg, lfw, report["model_dir"])
        if lfw.before is not None:  # the start model's own measurement, reused
            measured = json.loads(lfw.before.read_text())
            before = lfw_results(measured)
            report["lfw_before_from"] = {"file": str(lfw.before), "model": measured["model"]}
        else:
            before = lfw_accuracy(app_cfg, lfw, cfg.model.init_from)
        report["lfw"] = {"before": {k: before[k] for k in after}, "after": after}
        report["seconds"]["lfw"] = round(time.time() - t_lfw, 1)
    tracks = _training_tracks(pool)
    manifest = read_manifest(report["model_dir"])
    model = "@".join(model_id(manifest))  # as the gallery names it
    gallery.trained.record(model, report["model_sha256"], str(Path(report["model_dir"])
                                                                .resolve()), tracks)
    report["model"] = model
    report["seconds"]["end_to_end"] = round(time.time() - t0, 1)
    (run_dir / "site_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (run_dir / "site_report.md").write_text(render_report(report))
    (Path(report["model_dir"]) / "MODEL_CARD.md").write_text(model_card(report))
    return report


def _training_tracks(pool) -> dict[int, int]:
    """identity id -> training tracks (and photos) of it in the pool."""
    out: dict[int, int] = {}
    for label, identity in enumerate(pool.identity_ids):
        rows = (pool.labels == label) & (pool.split != HELDOUT)
        out[int(identity)] = int(len(np.unique(pool.track[rows])))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _lfw_rows(report: dict) -> list[str]:
    if "lfw" not in report:
        return ["LFW: not measured (give --lfw-root and --lfw-pairs)."]
    b, a = report["lfw"]["before"], report["lfw"]["after"]
    rows = []
    if "lfw_before_from" in report:
        src = report["lfw_before_from"]
        rows += [f"LFW before: {src['model']}, measured once ({src['file']}).", ""]
    rows += ["| LFW (10 folds) | before | after | change |", "|---|---|---|---|"]
    rows += [f"| {k} | {b[k]:.2f} | {a[k]:.2f} | "
             f"{a[k] - b[k]:+.2f} |" for k in b]
    return rows


def _expert_rows(report: dict) -> list[str]:
    layers = report["experts"]["moe_layers"]
    if not layers:
        top = report["experts"]["most_changed_tensors"]
        return ["Dense model (no experts); the tensors that changed most (L2 of the change): "
                + ", ".join(f"{k} {v}" for k, v in list(top.items())[:4]) + "."]
    rows = ["| layer | expert | change (L2) | share of the site's tokens |", "|---|---|---|---|"]
    for layer in layers:
        rows += [f"| {layer['layer']} | {e['expert']} | {e['change_l2']} | "
                 f"{'-' if e['site_token_share'] is None else _pct(e['site_token_share'])} |"
                 for e in layer["experts"]]
    return rows


def _validation_rows(report: dict) -> list[str]:
    v = report.get("validation") or {}
    chosen = v.get("at_chosen_step")
    if not chosen:
        return [f"- No validation tracks (a person needs 2+ training tracks): the model is "
                f"the one after all {report['steps']} steps."]
    step = v["chosen_step"]
    return [f"- The step was chosen on {chosen['tracks']} validation tracks (one training track "
            f"per person, kept out of training; the step whose mean margin between a track's own "
            f"person and the nearest other is widest): step {step} of {report['steps']} "
            f"(margin {chosen['margin']}, {chosen['correct']} of {chosen['tracks']} named "
            f"right)"
            + (": no step beat the start model, so the model is the start model's function."
               if step == 0 else ".")]


def render_report(report: dict) -> str:
    """The operator's report (Markdown)."""
    ident = report["site_heldout_identification"]
    b, a = ident["before"], ident["after"]
    pool = report["pool"]
    s = report["seconds"]
    lines = [
        f"# Site fine-tune: {report['model']}",
        "",
        f"- Trained from gallery `{report['gallery']}`: {pool['identities']} named people, "
        f"{pool['train_tracks']} training tracks and photos ({pool['train_faces']} faces; "
        f"{pool.get('val_tracks', 0)} of the tracks kept out for validation); "
        f"{pool['heldout_tracks']} tracks of {pool['heldout_identities']} people held out "
        f"whole for the check below (never trained on).",
        f"- Started from `{report['start_model']['dir']}` "
        f"({report['start_model']['architecture']}).",
        f"- Identification of the held-out tracks (top-1 among the {pool['identities']} "
        f"people): **{_pct(b['accuracy'])} -> {_pct(a['accuracy'])}** "
        f"({b['correct']} -> {a['correct']} of {a['tracks']}).",
        *_validation_rows(report),
        f"- General faces kept: mean cosine of the new model's embeddings of the anchor faces "
        f"to the start model's {report['anchor_cosine_to_start']}.",
        "",
        *_lfw_rows(report),
        "",
        "Which experts changed:",
        "",
        *_expert_rows(report),
        "",
        f"Time on this machine: frozen-prefix cache {s['prefix_cache']} s, training "
        f"{s['train']} s ({report['steps']} steps)"
        + (f", LFW check {s['lfw']} s" if "lfw" in s else "")
        + (f"; {s['end_to_end']} s end to end." if "end_to_end" in s else "."),
        "",
        "Use it: `facemoe use-model " + report["model_dir"] + " --config APP.yaml` "
        "(re-embeds the gallery); back: `facemoe use-model " + report["start_model"]["dir"]
        + "` or the model you ran before, e.g. `models/sface`. The new model has no open-set "
        "calibration of its own: matching uses its fixed threshold until "
        "`facemoe calibrate --write` measures one.",
        "",
        "Privacy: the gallery records which people this model learned from; if any of them is "
        "erased, `facemoe gallery check` and the erasure's report name this model for "
        "retraining.",
    ]
    return "\n".join(lines) + "\n"


def model_card(report: dict) -> str:
    return "\n".join([
        f"# {report['model']} (site fine-tune)",
        "",
        f"Fine-tuned from `{report['start_model']['dir']}` "
        f"({report['start_model']['name']}@{report['start_model']['version']}) on the named "
        f"faces of the gallery `{report['gallery']}` (`facemoe finetune --from-gallery`; "
        f"{report['pool']['identities']} people, identity ids in manifest.json `data`). "
        "It carries what it learned from those people: it belongs to that site, and an "
        "erasure of any of them makes `facemoe gallery check` list it for retraining.",
        "",
        "Distilled to its starting model's outputs on general faces of the shared teacher pool "
        "(no LFW evaluation identity).",
        "",
        "## Measured",
        "",
        render_report(report).split("\n", 2)[2],
    ]) + "\n"
