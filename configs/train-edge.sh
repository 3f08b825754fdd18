#!/usr/bin/env bash
# Reproduce the shipped default model, facemoe-edge 0.2.0: a uniform weight average ("model
# soup") of three runs of this repository's trainer on the training pool in ../shared/data.
# On the 2-core CPU: about 3.3 hours of training (78.8 + 79.7 + 39.2 min), then the release
# step measures the threshold and routing and writes models/facemoe-edge.
#   configs/train-edge.sh            (from the repository root, after ./install.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
facemoe=.venv/bin/facemoe
[ -f cache/pool.npz ] || $facemoe data prepare \
    --teacher ../shared/data/teacher/dlib_resnet_v1.npz --out-pool cache/pool.npz
$facemoe train --config configs/train-edge.yaml        # 1: from scratch, 13 epochs
$facemoe train --config configs/train-edge-warm.yaml   # 2: warm restart of 1, 14 epochs
$facemoe train --config configs/train-edge-kd.yaml     # 3: distillation only from 1, 8 epochs
$facemoe soup --out runs/edge-soup/model --version 0.2.0 \
    runs/facemoe-edge/model runs/edge-warm-restart/model runs/edge-kd-restart/model
cp configs/train-edge.yaml runs/edge-soup/config.yaml  # the held-out split for the threshold
.venv/bin/python benchmarks/release_model.py runs/edge-soup models/facemoe-edge
$facemoe eval lfw --root ../shared/data/lfw/lfw-deepfunneled --pairs ../shared/data/lfw/pairs.txt \
    --model models/facemoe-edge --probe-res 32 --probe-res 24 --probe-res 16 \
    --roc models/facemoe-edge/lfw_roc.png --write-manifest --json
