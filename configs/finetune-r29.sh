#!/usr/bin/env bash
# Reproduce the shipped default model, facemoe-r29: FaceMoE upcycled from dlib's public-domain
# face ResNet v1 and fine-tuned for low resolution in two stages on the training pool in
# ../shared/data (never an LFW evaluation identity); then the dense ablation, the release step
# (threshold on held-out CelebA identities, routing) and the LFW evaluation of both.
#   configs/finetune-r29.sh          (from the repository root, after ./install.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
facemoe=.venv/bin/facemoe
lfw=(--root ../shared/data/lfw/lfw-deepfunneled --pairs ../shared/data/lfw/pairs.txt
     --probe-res 32 --probe-res 24 --probe-res 16)
$facemoe import dlib --architecture facemoe-r29 --name facemoe-r29 --out cache/r29-init
$facemoe import dlib --out cache/dlib-init
[ -f cache/pool150.npz ] || $facemoe data prepare --model cache/dlib-init \
    --teacher ../shared/data/teacher/dlib_resnet_v1.npz --out cache/pool150.npz
# the two runs share the machine: one thread each
$facemoe train --config configs/finetune-r29.yaml &
$facemoe train --config configs/experiments/finetune-dlib-dense.yaml &
wait
.venv/bin/python benchmarks/release_model.py runs/facemoe-r29 models/facemoe-r29
$facemoe eval lfw "${lfw[@]}" --model models/facemoe-r29 --roc models/facemoe-r29/lfw_roc.png \
    --write-manifest --json
$facemoe eval lfw "${lfw[@]}" --model runs/dlib-dense-ft/model --json   # the ablation
$facemoe eval lfw "${lfw[@]}" --model cache/dlib-init --json            # the starting point
