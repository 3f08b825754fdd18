"""`app.gallery.transfer`: the export file is written privately through the one writer, and
import refuses zip bombs, manifests larger than the archive, padded crops and bad fields."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import plant_symlinks

pytestmark = pytest.mark.unit


def test_export_does_not_follow_a_planted_temporary(tmp_path: Path, no_gallery_key) -> None:
    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import crops, unit

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    # every name the old code could pick (it used the pid) and the VideoWriter's ".part"
    plant_symlinks(out, [f".g.zip.{pid}.tmp" for pid in range(os.getpid() - 5, os.getpid() + 5)],
           victim)
    rng = np.random.default_rng(0)
    with Gallery(tmp_path / "a.db", "facemoe-edge", "0.1.0") as g:
        g.enroll("alice", unit(rng, 2), ["a", "b"], [0.5, 0.5], crops(rng, 2))
        with pytest.raises(Exception, match="is a directory"):
            g.export(out)
        g.export(out / "g.zip")
    assert victim.read_text() == "precious\n"
    assert os.stat(out / "g.zip").st_mode & 0o777 == 0o600


def _real_export(tmp_path: Path, data_dir: Path) -> Path:
    """An export of two LFW people, with their photos as 192x192 kept crops."""
    import cv2
    import numpy as np

    from app.gallery import Gallery
    from tests.gallery_helpers import unit

    lfw = data_dir / "lfw" / "lfw-deepfunneled"
    rng = np.random.default_rng(0)
    with Gallery(tmp_path / "src.db", "facemoe-edge", "0.1.0") as g:
        for name in ("Zydrunas_Ilgauskas", "Joan_Collins"):
            photo = cv2.imread(str(lfw / name / f"{name}_0001.jpg"))
            crop = cv2.resize(photo[29:221, 29:221], (192, 192))
            g.enroll(name.replace("_", " "), unit(rng, 1), [f"{name}_0001.jpg"], [0.7], [crop])
        return Path(g.export(tmp_path / "g.zip").path)


def _tampered(src: Path, dest: Path, *, replace: dict[str, bytes | int] | None = None,
              manifest_edit=None) -> Path:
    """A copy of an export with members replaced (bytes, or an int: that many zero bytes,
    deflated) and the manifest edited, re-checksummed so only the content is at fault."""
    import hashlib
    import json
    import zipfile

    from app.gallery.transfer import _TRAILER

    replace = replace or {}
    with zipfile.ZipFile(src) as zin:
        manifest = json.loads(zin.read("manifest.json"))
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                name = info.filename
                if name == "manifest.json":
                    continue
                new = replace.get(name)
                if isinstance(new, int):  # a bomb: written in chunks, hashed on the way
                    digest = hashlib.sha256()
                    with zout.open(name, "w", force_zip64=True) as fh:
                        for _ in range(new >> 20):
                            fh.write(b"\0" * (1 << 20))
                            digest.update(b"\0" * (1 << 20))
                    manifest["entries"][name] = digest.hexdigest()
                    continue
                data = zin.read(name) if new is None else new
                manifest["entries"][name] = hashlib.sha256(data).hexdigest()
                zout.writestr(name, data)
            if manifest_edit is not None:
                manifest_edit(manifest)
            zout.writestr("manifest.json", json.dumps(manifest))
            zout.comment = _TRAILER + b"0" * 64
    data = bytearray(dest.read_bytes())
    data[-64:] = hashlib.sha256(bytes(data[:-64])).hexdigest().encode()
    dest.write_bytes(bytes(data))
    return dest


def _import_in_child(export: Path, db: Path) -> tuple[str, float, float]:
    """(error or 'ok', seconds, growth of the peak RSS in MB) of an import in a fresh
    process (the imports and the gallery are loaded before the peak is first read)."""
    import subprocess
    import sys

    script = (
        "import resource, sys, time\n"
        "from app.gallery import Gallery, GalleryError\n"
        "result = 'ok'\n"
        "with Gallery(sys.argv[2], 'facemoe-edge', '0.1.0') as g:\n"
        "    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    t = time.monotonic()\n"
        "    try:\n"
        "        g.import_file(sys.argv[1])\n"
        "    except GalleryError as e:\n"
        "        result = str(e)\n"
        "print(result); print(time.monotonic() - t)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(export), str(db)],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent,
                          env={**os.environ, "FACEMOE_GALLERY_KEY": ""})
    assert proc.returncode == 0, proc.stderr
    result, seconds, rss = proc.stdout.strip().splitlines()
    return result, float(seconds), float(rss)


@pytest.mark.slow
def test_import_refuses_a_zip_bomb_from_the_directory(tmp_path: Path, data_dir: Path,
                                                      no_gallery_key) -> None:
    import zipfile

    good = _real_export(tmp_path, data_dir)
    with zipfile.ZipFile(good) as zf:
        crop = next(n for n in zf.namelist() if n.endswith(".jpg"))
    bomb = _tampered(good, tmp_path / "bomb.zip", replace={crop: 1 << 30})
    assert bomb.stat().st_size < 4 << 20
    result, seconds, rss = _import_in_child(bomb, tmp_path / "dst.db")
    assert result == (f"export {bomb} is not a valid FaceMoE gallery export: member {crop} "
                      f"would unpack to {1 << 30} bytes (at most {1 << 20} in an archive of "
                      f"4 entries)")
    assert seconds < 5 and rss < 100, (seconds, rss)
    assert _import_in_child(good, tmp_path / "ok.db")[0] == "ok"


def _with_manifest(src: Path, dest: Path, manifest: bytes) -> Path:
    """`src` with its manifest replaced by `manifest` (deflated), whole-file sum redone."""
    import hashlib
    import zipfile

    from app.gallery.transfer import _TRAILER

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename != "manifest.json":
                zout.writestr(info.filename, zin.read(info))
        zout.writestr("manifest.json", manifest)
        zout.comment = _TRAILER + b"0" * 64
    data = bytearray(dest.read_bytes())
    data[-64:] = hashlib.sha256(bytes(data[:-64])).hexdigest().encode()
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.slow
def test_import_bounds_the_manifest_to_the_archive(tmp_path: Path, data_dir: Path,
                                                   no_gallery_key) -> None:
    """A ~130 KB archive whose manifest inflates to 128 MB of `{},` is refused from the zip
    directory (before: json.loads of all of it, 3.36 GB); one nested 2,000 deep is refused
    in one line (before: a RecursionError traceback)."""
    good = _real_export(tmp_path, data_dir)
    bomb = _with_manifest(good, tmp_path / "manifest-bomb.zip",
                          b"[" + b"{}," * ((128 << 20) // 3) + b"{}]")
    assert bomb.stat().st_size < 1 << 20
    result, seconds, rss = _import_in_child(bomb, tmp_path / "a.db")
    assert result.startswith(f"export {bomb} is not a valid FaceMoE gallery export: member "
                             f"manifest.json would unpack to "), result
    assert seconds < 5 and rss < 100, (seconds, rss)

    levels = "".join(f'["{k:08x}{k * 2654435761 % 2**32:08x}",' for k in range(2000))
    nested = _with_manifest(good, tmp_path / "nested.zip", (levels + "]" * 2000).encode())
    result, _, _ = _import_in_child(nested, tmp_path / "b.db")
    assert result == (f"export {nested} is not a valid FaceMoE gallery export: its manifest "
                      f"nests deeper than 16 levels")


@pytest.mark.slow
def test_import_refuses_padded_crops(tmp_path: Path, data_dir: Path, no_gallery_key) -> None:
    """Crops padded with zeros up to the crop limit deflate to almost nothing: refused by
    their inflation from the directory (before: 1.3 MB of them took 1.13 GB)."""
    import zipfile

    good = _real_export(tmp_path, data_dir)
    with zipfile.ZipFile(good) as zf:
        crops = {n: zf.read(n) for n in zf.namelist() if n.endswith(".jpg")}
    padded = _tampered(good, tmp_path / "padded.zip",
                       replace={n: jpeg + bytes((1 << 20) - len(jpeg) - 1)
                                for n, jpeg in crops.items()})
    result, seconds, rss = _import_in_child(padded, tmp_path / "dst.db")
    assert "would inflate" in result and "(at most 4)" in result, result
    assert "\n" not in result and seconds < 5 and rss < 50, (seconds, rss)


@pytest.mark.parametrize("case, message", [
    ("crop_not_jpeg", "the stored crop is not a readable JPEG"),
    ("crop_too_big", "the stored crop is 500x500, not 192x192 or 112x112"),
    ("long_source", "source must be a string of at most 1024 characters"),
    ("nan_quality", "quality nan is not in [0, 1]"),
    ("bad_date", "date 9999-01-01T00:00:00+00:00 is out of range"),
    ("long_name", "identity name is too long"),
    ("inf_vector", "imported vectors must be finite"),
])
def test_import_validates_crops_and_fields(tmp_path: Path, data_dir: Path, no_gallery_key,
                                           case: str, message: str) -> None:
    import json
    import zipfile

    import cv2
    import numpy as np

    from app.gallery import Gallery, GalleryError

    good = _real_export(tmp_path, data_dir)
    with zipfile.ZipFile(good) as zf:
        manifest = json.loads(zf.read("manifest.json"))
    template = manifest["identities"][0]["templates"][0]
    replace: dict[str, bytes | int] = {}
    edit = None
    if case == "crop_not_jpeg":
        replace[template["crop"]] = b"\xff\xd8 not really a jpeg"
    elif case == "crop_too_big":
        replace[template["crop"]] = cv2.imencode(".jpg", np.zeros((500, 500, 3), np.uint8))[1]
        replace[template["crop"]] = replace[template["crop"]].tobytes()
    elif case == "inf_vector":
        vec = np.zeros(manifest["dim"], "<f4")
        vec[0] = np.inf
        replace[template["vector"]] = vec.tobytes()
    else:
        def edit(m: dict) -> None:
            t = m["identities"][0]["templates"][0]
            if case == "long_source":
                t["source"] = "x" * 5000
            elif case == "nan_quality":
                t["quality"] = float("nan")
            elif case == "bad_date":
                t["created_at"] = "9999-01-01T00:00:00+00:00"
            elif case == "long_name":
                m["identities"][0]["name"] = "y" * 300
    bad = _tampered(good, tmp_path / "bad.zip", replace=replace, manifest_edit=edit)
    with Gallery(tmp_path / "dst.db", "facemoe-edge", "0.1.0") as g:
        with pytest.raises(GalleryError, match=re.escape(message)) as err:
            g.import_file(bad)
        assert "\n" not in str(err.value)
        assert g.identities() == []
