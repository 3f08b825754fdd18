"""`facemoe eval lfw`: the official 10-fold protocol on faces found and aligned by the app.

Cross-resolution probes (`--probe-res N`): the second image's face is given the resolution it
has in an NxN ArcFace-112 crop (downsampled with INTER_AREA, upsampled back with INTER_CUBIC,
the STACK.md baseline protocol) and then aligned to the model's own template, so N means the
same face resolution for every model. Landmarks are cached in the user cache (by content hash).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from app.align import CROP_SIZE, STORE, TEMPLATE, align_face, degrade_to, recut
from app.config import AppConfig
from app.detect import Detector
from app.embed import Embedder
from app.faces import FaceError, aligned_face, find_face, read_image
from app.fsutil import atomic_write
from app.runtime import make_detector
from trainer.evaluate import Pair, plot_roc, read_lfw_pairs, roc, verification_report
from trainer.media import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


def find_pair_faces(
    root: Path, pairs: list[Pair], detector: Detector
) -> tuple[dict[str, np.ndarray], list[str]]:
    """`find_faces` of every image in `pairs`."""
    return find_faces(root, sorted({p.left for p in pairs} | {p.right for p in pairs}), detector)


def find_faces(
    root: Path, names: list[str], detector: Detector
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Landmarks float32[5, 2] per image (the most central face: LFW is centred), and the
    faceless images. Cached by content hash in the user cache (detection is the slow part)."""
    key = hashlib.sha256(("\n".join(names) + str(root.resolve())).encode()).hexdigest()[:16]
    cache = (
        Path(os.environ.get("FACEMOE_CACHE", Path.home() / ".cache" / "facemoe"))
        / f"lfw-landmarks-{key}.npz"
    )
    if cache.is_file():
        d = np.load(cache)
        return dict(zip(d["names"].tolist(), d["landmarks"], strict=True)), d["missing"].tolist()
    marks, missing = {}, []
    for name in tqdm(names, desc="detect", unit="img"):
        image, det = _read(root, name), None
        if image is not None:
            with contextlib.suppress(FaceError):  # no face: counted as missing
                det = find_face(image, detector, "central", source=name)
        if det is None:
            missing.append(name)
            # the ArcFace template on the image's central half stands in, so the pair still
            # counts (the protocol scores all 6,000 pairs)
            h, w = (250, 250) if image is None else image.shape[:2]
            marks[name] = (TEMPLATE / CROP_SIZE * np.float32([w / 2, h / 2])
                           + np.float32([w / 4, h / 4]))
        else:
            marks[name] = np.asarray(det.landmarks, np.float32).reshape(5, 2)
    with atomic_write(cache) as f:
        np.savez(f, names=np.array(list(marks)), landmarks=np.stack(list(marks.values())),
                 missing=np.array(missing, dtype=str))
    return marks, missing


def _read(root: Path, name: str) -> np.ndarray | None:
    """The image, or None when it is unreadable (`app.faces.read_image`: also truncated)."""
    try:
        return read_image(root / name)
    except FaceError:
        return None


def evaluate_pairs(
    embedder: Embedder,
    root: Path,
    marks: dict[str, np.ndarray],
    pairs: list[Pair],
    probe_res: list[int],
) -> tuple[dict[str, dict], dict[str, tuple]]:
    """Native: every image aligned straight onto the model's template. Probe N: the right
    image's face at the resolution of an NxN ArcFace crop (`app.align.degrade_to` on the kept
    geometry), then re-cut onto the model's template, so N means the same for every model."""
    names = list(marks)
    index = {n: i for i, n in enumerate(names)}
    template = embedder.template
    probed = {p.right for p in pairs}
    native, kept = [], {}
    for n in tqdm(names, desc="align", unit="img"):  # each image read once, not kept
        image = _read(root, n)
        image = np.zeros((250, 250, 3), np.uint8) if image is None else image
        native.append(align_face(image, marks[n], template))
        if n in probed:
            kept[n] = align_face(image, marks[n], STORE)
    clean = embedder.embed(np.stack(native))
    left = np.array([index[p.left] for p in pairs])
    right_names = [p.right for p in pairs]
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    results, curves = {}, {}
    for res in [None, *probe_res]:
        if res is None:
            right = clean[[index[n] for n in right_names]]
        else:
            right = embedder.embed(
                np.stack([recut(degrade_to(kept[n], res), template) for n in right_names])
            )
        scores = np.sum(clean[left] * right, axis=1)
        label = "native" if res is None else f"{res}px"
        results[label] = verification_report(scores, same, folds)
        far, tar, _ = roc(scores, same)
        curves[label] = (far, tar)
    return results, curves


def eval_lfw(
    cfg: AppConfig,
    root: Path,
    pairs_file: Path,
    probe_res: list[int] | None,
    model_dir: str | None = None,
    roc_png: str | None = None,
    write_manifest: bool = False,
) -> dict:
    if not root.is_dir():
        raise FileNotFoundError(f"no such LFW image folder: {root}")
    pairs = read_lfw_pairs(pairs_file)
    model_cfg = cfg.model if model_dir is None else cfg.model.model_copy(update={"dir": model_dir})
    embedder = Embedder.from_config(
        model_cfg.dir, model_cfg.backend, model_cfg.threads, model_cfg.batch_size
    )
    marks, missing = find_pair_faces(root, pairs, make_detector(cfg))
    results, curves = evaluate_pairs(embedder, root, marks, pairs, probe_res or [])
    report = {
        "benchmark": "lfw",
        "model": embedder.model,
        "backend": embedder.backend.name,
        "images": len(marks),
        "no_face": len(missing),
        "results": results,
    }
    if roc_png:
        report["roc_png"] = str(plot_roc(curves, roc_png))
    if write_manifest:
        from trainer.artifact import update_metrics

        update_metrics(model_cfg.dir, {"lfw": results})
    return report


# --- `facemoe eval ident`: closed-set rank-N identification ------------------------------------


def _natural_key(name: str) -> list:
    """'s2/10.pgm' after 's2/9.pgm': digit runs compare as numbers."""
    import re

    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def identity_images(root: Path, list_file: Path | None = None) -> dict[str, list[str]]:
    """Identity -> image paths relative to `root`, naturally sorted.

    Without `list_file`: one sub-folder of `root` per identity (its image files, any depth).
    With it: lines `filename identity` (filename relative to `root`; blank lines and lines
    starting with '#' are skipped).
    """
    if not root.is_dir():
        raise FileNotFoundError(f"no such image folder: {root}")
    by_id: dict[str, list[str]] = {}
    if list_file is not None:
        if not list_file.is_file():
            raise FileNotFoundError(f"no such list file: {list_file}")
        for n, line in enumerate(list_file.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise ValueError(f"{list_file}:{n}: expected 'filename identity', got {line!r}")
            by_id.setdefault(parts[1], []).append(parts[0])
    else:
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            files = [
                p.relative_to(root).as_posix()
                for p in d.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ]
            if files:
                by_id[d.name] = files
    if not by_id:
        raise FileNotFoundError(
            f"no identity images under {root}"
            + ("" if list_file else " (expected one sub-folder per identity)")
        )
    ordered = sorted(by_id.items(), key=lambda kv: _natural_key(kv[0]))
    return {k: sorted(v, key=_natural_key) for k, v in ordered}


def eval_identification(
    cfg: AppConfig,
    root: Path,
    probe_res: list[int] | None = None,
    list_file: Path | None = None,
    model_dir: str | None = None,
    ranks: tuple[int, ...] = (1, 5),
    progress: bool = False,
) -> dict:
    """Closed-set rank-N identification on raw photos grouped by identity.

    Each image is detected (largest face) and aligned by the app. Per identity the first image
    with a face (natural sort order) is its gallery template and the rest are probes; an
    identity with one usable image is a gallery distractor only. Probes are optionally
    degraded to NxN (`probe_res`; INTER_AREA down, INTER_CUBIC back up) while the gallery stays
    at native resolution. Images without a face or unreadable are counted and left out.
    """
    from trainer.evaluate import rank_n_identification

    by_id = identity_images(root, list_file)
    m = cfg.model if model_dir is None else cfg.model.model_copy(update={"dir": model_dir})
    embedder = Embedder.from_config(m.dir, m.backend, m.threads, m.batch_size)
    detector = make_detector(cfg)
    gallery, gallery_ids, probes, probe_ids = [], [], [], []
    no_face, unreadable = [], []
    total = sum(len(v) for v in by_id.values())
    bar = tqdm(total=total, desc="detect+align", unit="img", disable=not progress)
    for ident, files in by_id.items():
        first = True
        for name in files:
            bar.update(1)
            image = _read(root, name)
            if image is None:
                unreadable.append(name)
                continue
            try:
                crop = aligned_face(image, detector, "largest", STORE, source=name).crop
            except FaceError:
                no_face.append(name)
                continue
            if first:
                gallery.append(crop)
                gallery_ids.append(ident)
                first = False
            else:
                probes.append(crop)
                probe_ids.append(ident)
    bar.close()
    if not gallery:
        raise ValueError(f"no face found in any of the {total} images under {root}")
    g_emb = embedder.embed_kept(np.stack(gallery))
    ids = np.array(gallery_ids)
    p_ids = np.array(probe_ids)
    results: dict[str, dict] = {}
    for res in [None, *(probe_res or [])]:
        if not probes:
            break
        batch = probes if res is None else [degrade_to(c, res) for c in probes]
        p_emb = embedder.embed_kept(batch)
        label = "native" if res is None else f"{res}px"
        results[label] = rank_n_identification(g_emb, ids, p_emb, p_ids, ranks)
    with_probes = set(probe_ids)
    return {
        "benchmark": "ident",
        "root": str(root),
        "model": embedder.model,
        "backend": embedder.backend.name,
        "identities": len(by_id),
        "images": total,
        "gallery": len(gallery),
        "probes": len(probes),
        "distractors": sum(1 for i in gallery_ids if i not in with_probes),
        "no_face": len(no_face),
        "unreadable": len(unreadable),
        "results": results,
    }


# --- `facemoe eval openset`: 1:N identification with strangers (NIST FRVT 1:N style) -----------


def eval_open_set(
    cfg: AppConfig,
    root: Path,
    eval_list: Path,
    sizes: tuple[int, ...] = (100, 1000),
    probe_res: list[int] | None = None,
    model_dir: str | None = None,
    mated_per_id: int = 4,
    nonmated: int = 3000,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """A gallery of N people (one photo each), mated probes (up to `mated_per_id` other photos
    of each) and `nonmated` probes of people not enrolled, all LFW evaluation identities
    (`eval_list`, measurement only). Probes at native and `probe_res` face resolutions, the
    gallery sharp. Reports FNIR at FPIR 1% and 0.1% (thresholds read off the non-mated probes'
    best scores, as FRVT does) and what the model's calibrated open-set rule (`app.openset`,
    fitted on other people) gives at rates 1% and 0.1%: its threshold, FPIR and FNIR."""
    from dataclasses import replace

    from app.runtime import open_set
    from trainer.evaluate import open_set_identification

    m = cfg.model if model_dir is None else cfg.model.model_copy(update={"dir": model_dir})
    embedder = Embedder.from_config(m.dir, m.backend, m.threads, m.batch_size)
    wanted = set(eval_list.read_text().split())
    by_id = {k: v for k, v in identity_images(root).items() if k in wanted}
    rng = np.random.default_rng(seed)
    multi = sorted(k for k, v in by_id.items() if len(v) >= 2)
    if len(multi) < max(sizes):
        raise ValueError(f"{len(multi)} identities with 2+ photos under {root}; "
                         f"a gallery of {max(sizes)} needs as many")
    enrolled = [multi[i] for i in rng.permutation(len(multi))[:max(sizes)]]
    others = sorted(set(by_id) - set(enrolled))
    stranger_photos = [p for k in others for p in by_id[k]]
    stranger_photos = [stranger_photos[i] for i in sorted(
        rng.choice(len(stranger_photos), min(nonmated, len(stranger_photos)), replace=False))]
    gallery_photos = [by_id[k][0] for k in enrolled]
    mated_photos = [(p, i) for i, k in enumerate(enrolled) for p in by_id[k][1:1 + mated_per_id]]
    names = sorted(set(gallery_photos) | {p for p, _ in mated_photos} | set(stranger_photos))
    marks, missing = find_faces(root, names, make_detector(cfg))
    kept = {}
    for n in tqdm(names, desc="align", unit="img", disable=not progress):
        image = _read(root, n)
        kept[n] = align_face(np.zeros((250, 250, 3), np.uint8) if image is None else image,
                             marks[n], STORE)
    gallery = embedder.embed_kept(np.stack([kept[n] for n in gallery_photos]))
    mated_ids = np.array([i for _, i in mated_photos])
    rule = open_set(cfg, embedder)
    results: dict[str, dict] = {}
    for res in [None, *(probe_res or [])]:
        def emb(photos: list[str], res: int | None = res) -> np.ndarray:
            crops = [kept[n] if res is None else degrade_to(kept[n], res) for n in photos]
            return embedder.embed_kept(crops)

        mated, strangers = emb([p for p, _ in mated_photos]), emb(stranger_photos)
        label = "native" if res is None else f"{res}px"
        results[label] = {}
        for n in sizes:
            inside = mated_ids < n
            row = open_set_identification(gallery[:n], mated[inside], mated_ids[inside],
                                          strangers)
            for r in (0.01, 0.001) if rule.calibrated else ():
                row.update(_rule_rates(replace(rule, rate=r), gallery[:n], mated[inside],
                                       mated_ids[inside], strangers, res))
            results[label][f"N={n}"] = row
    return {
        "benchmark": "openset",
        "model": embedder.model,
        "rule": rule.describe(max(sizes)),
        "gallery_photos": max(sizes),
        "mated_probes": int(len(mated_photos)),
        "nonmated_probes": len(stranger_photos),
        "no_face": len(missing),
        "results": results,
    }


def _rule_rates(rule, gallery: np.ndarray, mated: np.ndarray, mated_ids: np.ndarray,
                strangers: np.ndarray, res: int | None) -> dict[str, float]:
    """FPIR and FNIR (%) of the open-set rule (`app.match.Matcher` with `rule`: threshold
    and margin) for a gallery of one photo per person; probes' faces at `res` px."""
    from app.match import Matcher

    names = [str(i) for i in range(len(gallery))]
    matcher = Matcher(names, gallery, rule)
    def named(probes: np.ndarray) -> list[str | None]:
        return [matcher.match(p, res).identity for p in probes]

    hits = named(mated)
    fnir = np.mean([h != str(i) for h, i in zip(hits, mated_ids, strict=True)]) * 100
    fpir = np.mean([h is not None for h in named(strangers)]) * 100
    key = f"rule_{rule.rate:g}"
    return {f"{key}_threshold": matcher.threshold_at(res),
            f"{key}_margin": rule.margin(len(gallery), res),
            f"{key}_fpir": round(float(fpir), 2), f"{key}_fnir": round(float(fnir), 2)}
