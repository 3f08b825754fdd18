"""Turn raw photos into aligned 112x112 training data with the product's own detector and aligner.

Two inputs are supported:
- a folder of raw photos, one sub-folder per identity (`prepare_folder`), written as a folder
  of aligned JPEG crops that `trainer.data.ImageFolderDataset` reads;
- the teacher file of ../shared/data/teacher (`prepare_teacher_pool`), whose stored YuNet
  landmarks are reused, written as one compact .npz (crops, teacher targets, labels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from app.align import ARCFACE_112, CropTemplate, align_face
from app.detect import Detector
from app.faces import FaceError, aligned_face, read_image
from app.fsutil import atomic_write
from trainer.media import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareReport:
    written: int
    skipped_no_face: list[str]
    skipped_unreadable: list[str]


def prepare_folder(src: Path, dst: Path, detector: Detector) -> PrepareReport:
    """Align the largest face of each image under src/<identity>/ (`app.faces`) onto ArcFace
    112 and write it to dst/<identity>/<stem>.jpg (atomically, private; a second image with the
    same stem, e.g. a.jpg and a.tif, becomes <stem>-1.jpg); images directly in `src` go to
    dst/unlabelled/. Unreadable (also truncated) and faceless images are listed."""
    src, dst = Path(src), Path(dst)
    images = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images under {src}")
    written, no_face, unreadable, taken = 0, [], [], set()
    for path in tqdm(images, desc="prepare", unit="img"):
        try:
            image = read_image(path)
        except FaceError as e:
            log.warning("skipped: %s", e)
            unreadable.append(str(path))
            continue
        try:
            crop = aligned_face(image, detector, "largest", ARCFACE_112, source=str(path)).crop
        except FaceError:
            no_face.append(str(path))
            continue
        identity = path.parent.name if path.parent != src else "unlabelled"
        ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise OSError(f"cannot encode the aligned face of {path} as JPEG")
        out, n = dst / identity / f"{path.stem}.jpg", 0
        while out in taken:
            n += 1
            out = dst / identity / f"{path.stem}-{n}.jpg"
        taken.add(out)
        with atomic_write(out) as f:
            f.write(jpeg.tobytes())
        written += 1
    return PrepareReport(written, no_face, unreadable)


def _eval_identities(data_root: Path) -> set[str]:
    return set((data_root / "lfw" / "eval_identities.txt").read_text().split())


def prepare_teacher_pool(
    teacher_npz: Path, data_root: Path, out: Path, template: CropTemplate = ARCFACE_112
) -> int:
    """Align every teacher-pool image with its stored landmarks into one .npz.

    Keys: crops uint8[N,S,S,3] BGR on `template`, teacher float32[N,128] (raw dlib descriptors),
    labels int64[N] (identity index, -1 when unlabelled), label_names, paths.
    Refuses any image of an LFW evaluation identity (they must never be trained on).
    """
    t = np.load(teacher_npz)
    paths, lms = t["paths"], t["landmarks"].reshape(-1, 5, 2)
    banned = _eval_identities(data_root)
    celeb_ids = dict(
        line.split()
        for line in (data_root / "celeba299" / "identities.txt").read_text().splitlines()
    )
    crops = np.empty((len(paths), template.size, template.size, 3), np.uint8)
    names: list[str] = []
    for i, rel in enumerate(tqdm(paths, desc="align pool", unit="img")):
        parts = Path(rel).parts
        if parts[0] == "lfw":
            if parts[-2] in banned:
                raise ValueError(f"{rel} is an LFW evaluation identity: refusing to train on it")
            names.append("lfw:" + parts[-2])
        elif parts[0] == "celeba299":
            names.append("celeba:" + celeb_ids[parts[-1]])
        else:
            names.append("")
        image = cv2.imread(str(data_root / rel), cv2.IMREAD_COLOR)
        if image is None:
            raise OSError(f"cannot read {data_root / rel}")
        crops[i] = align_face(image, lms[i], template)
    label_names = sorted({n for n in names if n})
    index = {n: i for i, n in enumerate(label_names)}
    labels = np.array([index.get(n, -1) for n in names], np.int64)
    with atomic_write(out) as tmp:  # faces: private, like every file of faces
        np.savez(
            tmp,
            crops=crops,
            teacher=t["embeddings"].astype(np.float32),
            labels=labels,
            label_names=np.array(label_names),
            paths=paths,
        )
    log.info(
        "wrote %d aligned faces (%d labelled identities) to %s", len(paths), len(label_names), out
    )
    return len(paths)
