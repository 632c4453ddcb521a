#!/usr/bin/env bash
# Training throughput of Kiln against Keras and PyTorch on this machine; prints a Markdown
# report (see docs/benchmarks.md). Builds Kiln and a virtualenv with tensorflow-cpu and
# torch (several GiB) outside the clone. Extra arguments go to run.py (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
kiln_build
BENCH_VENV="${KILN_BENCH_VENV:-/var/tmp/kiln-bench-venv}"
if [ ! -x "$BENCH_VENV/bin/python" ]; then
  python3 -m venv "$BENCH_VENV"
fi
"$BENCH_VENV/bin/pip" install -q numpy tensorflow-cpu torch
exec "$BENCH_VENV/bin/python" bench/training/run.py --kiln "$KILN_BIN" "$@"
