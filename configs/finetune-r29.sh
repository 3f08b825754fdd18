#!/usr/bin/env bash
# The shipped default (dlib-resnet-v1, imported) and the low-resolution fine-tunes of the model
# card's ablation: FaceMoE upcycled from dlib's public-domain face ResNet v1 (facemoe-r29) and
# the dense network, each fine-tuned in two stages on the training pool in ../shared/data
# (never an LFW evaluation identity) with two recipes; then the release step (threshold on
# held-out CelebA identities, routing) and the LFW evaluation of each. About 3 h on 2 cores.
#   configs/finetune-r29.sh          (from the repository root, after ./install.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
facemoe=.venv/bin/facemoe
lfw=(--root ../shared/data/lfw/lfw-deepfunneled --pairs ../shared/data/lfw/pairs.txt
     --probe-res 32 --probe-res 24 --probe-res 16)
$facemoe import dlib --architecture facemoe-r29 --name facemoe-r29 --out cache/r29-init
$facemoe import dlib --out cache/dlib-init
mkdir -p runs/dlib-base && cp configs/experiments/finetune-dlib-dense.yaml runs/dlib-base/config.yaml
rm -rf runs/dlib-base/model && cp -r cache/dlib-init runs/dlib-base/model
.venv/bin/python benchmarks/release_model.py runs/dlib-base models/dlib-resnet-v1
$facemoe eval lfw "${lfw[@]}" --model models/dlib-resnet-v1 --roc models/dlib-resnet-v1/lfw_roc.png \
    --write-manifest --json
[ -f cache/pool150.npz ] || $facemoe data prepare --model cache/dlib-init \
    --teacher ../shared/data/teacher/dlib_resnet_v1.npz --out-pool cache/pool150.npz
# each pair shares the machine: one thread per run
for recipe in "finetune-r29.yaml experiments/finetune-dlib-dense.yaml" \
              "experiments/finetune-r29-kd.yaml experiments/finetune-dlib-dense-kd.yaml"; do
  for c in $recipe; do $facemoe train --config "configs/$c" & done
  wait
done
for run in facemoe-r29 dlib-dense-ft facemoe-r29-kd dlib-dense-kd; do
  $facemoe eval lfw "${lfw[@]}" --model "runs/$run/model" --json
done
