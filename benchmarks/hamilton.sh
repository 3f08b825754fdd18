#!/usr/bin/env bash
# The README's end-to-end benchmark: enroll two people from stills, then process the Hamilton clip.
# Usage: benchmarks/hamilton.sh [SHARED_DIR]   (prints the `process --json` summary)
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${1:-${FACEMOE_SHARED:-../shared}}"
v="$shared/data/videos"
db="$(mktemp -d)/gallery.db"
.venv/bin/facemoe enroll "Lin-Manuel Miranda" "$v/lin-manuel-miranda.png" --gallery "$db" >&2
.venv/bin/facemoe enroll "Alex Lacamoire" "$v/alex-lacamoire.png" --gallery "$db" >&2
.venv/bin/facemoe process "$v/short_hamilton_clip.mp4" --gallery "$db" --no-progress --json
