#!/usr/bin/env bash
# Same-session A/B of the serving path: Kiln built from BASELINE (a commit, default
# HEAD~1) against Kiln built from the working tree, on the serving benchmark's network and
# client, in alternating rounds (bench/serving/ab.py). For refactors that must not cost
# speed. Takes about 5 minutes on 2 cores after the builds (KILN_BENCH_SECONDS per cell, 5;
# KILN_BENCH_AB_ROUNDS, 5).
#
#   bench/serving/ab.sh [BASELINE]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
baseline="${1:-HEAD~1}"
commit="$(git rev-parse --short "$baseline")"
# The baseline is built from a clean checkout of its commit in the same target directory
# (same feature set: only Kiln's own crates rebuild), then copied aside.
out="/var/tmp/kiln-ab-$commit"
if [ ! -x "$out/kiln" ]; then
    tree="$(mktemp -d /var/tmp/kiln-ab-tree.XXXXXX)"
    git worktree add --detach "$tree" "$commit" >/dev/null
    (cd "$tree" && kiln_build)
    mkdir -p "$out"
    cp "$CARGO_TARGET_DIR/debug/kiln" "$out/kiln"
    git worktree remove --force "$tree"
fi
kiln_build
[ -x "$KILN_VENV/bin/python" ] || python3 -m venv "$KILN_VENV"
"$KILN_VENV/bin/pip" install -q --disable-pip-version-check 'tritonclient[grpc]==2.73.0' 'numpy<3'
current="$(git rev-parse --short HEAD)"
git diff --quiet HEAD -- . || current="$current+changes"
KILN_BENCH_BASELINE_BIN="$out/kiln" KILN_BENCH_BASELINE_COMMIT="$commit" \
    KILN_BENCH_CURRENT_COMMIT="$current" exec "$KILN_VENV/bin/python" bench/serving/ab.py
