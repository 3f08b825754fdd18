#!/usr/bin/env bash
# The low-resolution fine-tunes of SFace for the model card's ablation: FaceMoE upcycled from
# OpenCV Zoo's SFace (facemoe-sface, equal to SFace at step 0) and the dense port (sface), each
# fine-tuned in two stages on the 112 px training pool in ../shared/data (never an LFW evaluation
# identity) by distillation from the frozen SFace (install.sh's models/sface, ONNX) on the clean
# crops; then the LFW evaluation of each at native / 32 / 24 / 16 px. Sized for a GPU: on the
# 2-core CPU one epoch of facemoe-sface (about 16,000 faces at 1-3 faces/s) takes hours.
#   configs/finetune-sface-moe.sh          (from the repository root, after ./install.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
facemoe=.venv/bin/facemoe
lfw=(--root ../shared/data/lfw/lfw-deepfunneled --pairs ../shared/data/lfw/pairs.txt
     --probe-res 32 --probe-res 24 --probe-res 16)
[ -f models/sface/model.onnx ] || .venv/bin/python -m trainer.importers.sface models/sface
$facemoe import sface --architecture facemoe-sface --out cache/facemoe-sface-init
$facemoe import sface --out cache/sface-init
[ -f cache/pool112.npz ] || $facemoe data prepare \
    --teacher ../shared/data/teacher/dlib_resnet_v1.npz --out-pool cache/pool112.npz
# the pair shares the machine: one thread per run (run.threads)
for c in finetune-sface-moe.yaml experiments/finetune-sface-dense.yaml; do
  $facemoe train --config "configs/$c" &
done
wait
for run in facemoe-sface sface-dense-ft; do
  $facemoe eval lfw "${lfw[@]}" --model "runs/$run/model" --json
done
