#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs everything it needs into ./.venv (CPU torch),
# then fails when
#   - a notebook is not clean (nbdev-clean would change it) or holds widget state / bulky outputs,
#   - the package is out of sync with the notebooks (nbdev-export would change unifuse/),
#   - a notebook fails (nbdev-test: cells flagged `slow` or `cuda` are skipped),
#   - a test in tests/ fails (pytest --slow: every test; its summary line is the last line printed).
# The quick local loop is `.venv/bin/python -m pytest tests` (tests marked slow skipped).
# Environment: PYTHON (interpreter for the venv, default python3), UNIFUSE_SKIP_INSTALL=1 (reuse .venv as is).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
step() { printf '\n== %s (%ds)\n' "$1" "$((SECONDS - t0))" >&2; }

step "install"
source scripts/setup.sh
V=.venv/bin
export MPLBACKEND=Agg PYTHONDONTWRITEBYTECODE=1

snapshot() { find "$@" -type f \( -name '*.ipynb' -o -name '*.py' \) ! -path '*/.ipynb_checkpoints/*' -print0 \
               | sort -z | xargs -0 sha1sum; }

step "notebooks clean (nbdev-clean changes nothing)"
before=$(snapshot nbs); $V/nbdev-clean >/dev/null; after=$(snapshot nbs)
if [ "$before" != "$after" ]; then
  echo "FAIL: nbdev-clean changed these notebooks; run .venv/bin/nbdev-clean and commit them:" >&2
  diff <(echo "$before") <(echo "$after") | grep '^>' | awk '{print "  " $3}' >&2; exit 1
fi
$V/python - <<'PY'
import json, pathlib, sys
bad = []
for p in sorted(pathlib.Path("nbs").glob("*.ipynb")):
    nb = json.loads(p.read_text())
    if "widgets" in nb.get("metadata", {}): bad.append(f"{p}: widget state in metadata.widgets (strip it)")
    dead = sum("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for c in nb["cells"] for o in c.get("outputs", []))
    if dead: bad.append(f"{p}: {dead} saved widget view(s) with no state (record with scripts/run_nb.py: it keeps their PNG)")
    if p.stat().st_size > 1_000_000: bad.append(f"{p}: {p.stat().st_size/1e6:.1f} MB, over 1 MB (smaller figures, fewer outputs)")
if bad: sys.exit("FAIL: notebook hygiene\n  " + "\n  ".join(bad))
PY

step "package in sync (nbdev-export changes nothing)"
before=$(snapshot unifuse); $V/nbdev-export; after=$(snapshot unifuse)
if [ "$before" != "$after" ]; then
  echo "FAIL: nbdev-export changed unifuse/ (the package was out of sync with nbs/); commit both:" >&2
  diff <(echo "$before") <(echo "$after") | grep '^[<>]' | awk '{print "  " $3}' | sort -u >&2; exit 1
fi

step "notebooks (nbdev-test; slow and cuda cells skipped)"
$V/nbdev-test --timing

step "pytest"
exec $V/python -m pytest -q -p no:cacheprovider --slow tests
