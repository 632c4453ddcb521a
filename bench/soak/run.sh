#!/usr/bin/env bash
# Soak: 5 minutes (or --seconds N) of mixed inference and training on a multi-process
# cluster with a worker killed every 20 s (bench/soak/soak.py). Writes
# bench/soak/results.json; docs/reliability.md reports its figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
kiln_system_deps
kiln_build
export KILN_BIN="$CARGO_TARGET_DIR/debug/kiln"
exec "$KILN_VENV/bin/python" bench/soak/soak.py --out bench/soak/results.json "$@"
