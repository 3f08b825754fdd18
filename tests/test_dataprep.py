"""`facemoe data prepare`: raw photos -> aligned training folder (--input/--out-dir), teacher
file -> training pool (--teacher/--out-pool), and the option rules between the two."""

from __future__ import annotations

import json
import re
import shlex
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest

from app.cli import build_parser, main
from app.dataprep import prepare_folder
from app.faces import read_image
from app.yunet import FaceDetector

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def photos(tmp_path: Path, data_dir: Path) -> Path:
    """raw/<identity>/ of real photos: a .jpg and the same photo as .tif, an unreadable file,
    a faceless crop of a real photo (its lower part: shoulders, no face), and one photo
    directly in raw/."""
    pairs = data_dir / "deepface_pairs"
    raw = tmp_path / "raw"
    (raw / "alice").mkdir(parents=True)
    (raw / "bob").mkdir()
    (raw / "alice" / "img1.jpg").write_bytes((pairs / "img1.jpg").read_bytes())
    assert cv2.imwrite(str(raw / "bob" / "img17.tif"), read_image(pairs / "img17.jpg"))
    (raw / "bob" / "broken.jpg").write_text("not an image\n")
    couple = read_image(pairs / "couple.jpg")
    assert cv2.imwrite(str(raw / "bob" / "shoulders.png"), couple[250:])
    (raw / "img2.jpg").write_bytes((pairs / "img2.jpg").read_bytes())
    (raw / "bob" / "notes.txt").write_text("not a photo suffix: ignored\n")
    return raw


def test_prepare_folder_aligns_the_faces_of_every_suffix(photos: Path, tmp_path: Path,
                                                         detector: FaceDetector) -> None:
    out = tmp_path / "aligned"
    report = prepare_folder(photos, out, detector)
    assert report.written == 3
    assert report.skipped_no_face == [str(photos / "bob" / "shoulders.png")]
    assert report.skipped_unreadable == [str(photos / "bob" / "broken.jpg")]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["alice/img1.jpg", "bob/img17.jpg", "unlabelled/img2.jpg"]
    for f in files:
        crop = cv2.imread(str(out / f))
        assert crop.shape == (112, 112, 3)
        assert stat.S_IMODE((out / f).stat().st_mode) == 0o600  # faces are private
    # the .tif's crop is the face of the photo it was converted from
    from app.align import ARCFACE_112
    from app.faces import aligned_face

    src = read_image(photos / "bob" / "img17.tif")
    own = aligned_face(src, detector, "largest", ARCFACE_112, source="img17").crop
    written = cv2.imread(str(out / "bob" / "img17.jpg")).astype(np.float32)
    assert np.abs(written - own).mean() < 3  # JPEG quality 95 only


def test_photos_with_one_stem_are_all_kept(tmp_path: Path, data_dir: Path,
                                           detector: FaceDetector) -> None:
    """carol/a.jpg and carol/a.tif (two different people's photos) both become crops."""
    pairs = data_dir / "deepface_pairs"
    raw = tmp_path / "raw" / "carol"
    raw.mkdir(parents=True)
    (raw / "a.jpg").write_bytes((pairs / "img1.jpg").read_bytes())
    assert cv2.imwrite(str(raw / "a.tif"), read_image(pairs / "img17.jpg"))
    out = tmp_path / "aligned"
    assert prepare_folder(tmp_path / "raw", out, detector).written == 2
    crops = [cv2.imread(str(out / "carol" / n)).astype(np.float32) for n in ("a.jpg", "a-1.jpg")]
    assert np.abs(crops[0] - crops[1]).mean() > 20  # two faces, not one written twice


def test_prepare_folder_without_photos(tmp_path: Path, detector: FaceDetector) -> None:
    (tmp_path / "empty" / "x").mkdir(parents=True)
    (tmp_path / "empty" / "x" / "a.txt").write_text("no photos\n")
    with pytest.raises(FileNotFoundError, match="no images under"):
        prepare_folder(tmp_path / "empty", tmp_path / "out", detector)
    assert not (tmp_path / "out").exists()


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "{raw}", "--out", "{tmp}/pool.npz"],
         "--out is split in two: --out-dir DIR with --input, --out-pool FILE.npz with --teacher"),
        (["--input", "{raw}", "--out-pool", "{tmp}/pool.npz"],
         "--input writes a folder of aligned images: give --out-dir DIR"),
        (["--input", "{raw}", "--out-dir", "{tmp}/pool.npz"],
         "a folder named like a pool file; pools are written by --teacher with --out-pool"),
        (["--input", "{raw}", "--out-dir", "{tmp}/file.txt"], "file.txt: is a file; give a folder"),
        (["--input", "{raw}", "--out-dir", "{tmp}/aligned", "--model", "{tmp}"],
         "--model applies to --teacher only"),
        (["--input", "{raw}", "--out-dir", "{tmp}/aligned", "--data-root", "{tmp}"],
         "--data-root applies to --teacher only"),
        (["--teacher", "{tmp}/t.npz", "--out-dir", "{tmp}/aligned"],
         "--teacher writes one pool file: give --out-pool FILE.npz"),
        (["--teacher", "{tmp}/t.npz", "--out-pool", "{tmp}/pool"],
         "the pool file's name must end in .npz"),
        (["--teacher", "{tmp}/t.npz", "--out-pool", "{tmp}/dir.npz"],
         "dir.npz: is a directory; give a FILE.npz"),
        (["--teacher", "{tmp}/t.npz", "--input", "{raw}", "--out-pool", "{tmp}/p.npz"],
         "needs one of --input DIR"),
        (["--out-dir", "{tmp}/aligned"], "needs one of --input DIR"),
    ],
)
def test_wrong_option_combinations_fail_in_one_line_before_writing(
        args: list[str], message: str, tmp_path: Path, capsys) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "notes.txt").write_text("x\n")
    (tmp_path / "file.txt").write_text("x\n")
    (tmp_path / "dir.npz").mkdir()
    before = sorted(tmp_path.rglob("*"))
    argv = ["data", "prepare", *(a.format(raw=raw, tmp=tmp_path) for a in args)]
    rc, out, err = _cli(argv, capsys)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("facemoe: error: data prepare")
    assert message in err
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_prepare_folder(photos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "aligned"
    rc, stdout, err = _cli(["data", "prepare", "--input", str(photos), "--out-dir", str(out),
                            "--json"], capsys)
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["out"] == str(out) and report["written"] == 3
    assert len(report["no_face"]) == 1 and len(report["unreadable"]) == 1
    assert (out / "bob" / "img17.jpg").is_file()


def test_cli_teacher_pool_defaults_to_arcface_112(tmp_path: Path, data_dir: Path,
                                                  capsys) -> None:
    """Three real teacher rows (CelebA) -> a pool of ArcFace 112 crops, whatever model the app
    config names (the shipped default's template is dlib's 150)."""
    from trainer.data import load_pool

    t = np.load(data_dir / "teacher" / "dlib_resnet_v1.npz")
    rows = [i for i, p in enumerate(t["paths"]) if str(p).startswith("celeba299/")][:3]
    small = tmp_path / "teacher" / "three.npz"
    small.parent.mkdir()
    np.savez(small, **{k: t[k][rows] for k in t.files})
    pool = tmp_path / "cache" / "pool.npz"
    rc, stdout, err = _cli(["data", "prepare", "--teacher", str(small), "--data-root",
                            str(data_dir), "--out-pool", str(pool), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(stdout) == {"out": str(pool), "faces": 3}
    faces = load_pool(pool)
    assert faces.crops.shape == (3, 112, 112, 3) and faces.teacher.shape == (3, 128)
    assert (faces.labels >= 0).all()


def test_the_recipe_scripts_use_the_current_options() -> None:
    """Every `facemoe data prepare` in configs/*.sh parses and passes the option rules."""
    from app.cli.train import _data_prepare_outputs

    found = 0
    for script in sorted((REPO_ROOT / "configs").glob("*.sh")):
        text = script.read_text().replace("\\\n", " ")
        for line in re.findall(r"facemoe data prepare ([^\n;|&]*)", text):
            args = build_parser().parse_args(["data", "prepare", *shlex.split(line)])
            _data_prepare_outputs(args)
            assert args.teacher and args.out_pool.endswith(".npz"), script.name
            found += 1
    assert found >= 2
