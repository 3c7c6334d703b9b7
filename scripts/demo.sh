#!/usr/bin/env bash
# The main job, on a fresh machine: installs what it needs into ./.venv (as scripts/test.sh does), trains the tiny
# preset on the built-in data (a few minutes on a 2-core CPU, with a progress bar), fuses held-out built-in pairs of
# the three tasks with that model and with the weights that ship in the package, and writes fused NIfTI files, a PNG
# montage per task and a metrics JSON beside the staged classical baseline into runs/demo (or $1).
# Extra arguments after the folder go to scripts/demo.py (e.g. --train-args "--steps 100").
set -euo pipefail
cd "$(dirname "$0")/.."
UNIFUSE_NO_BROWSER=1 source scripts/setup.sh                  # the demo needs no browser
export MPLBACKEND=Agg
out="${1:-runs/demo}"; shift || true
exec .venv/bin/python scripts/demo.py --out "$out" "$@"
