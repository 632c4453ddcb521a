#!/usr/bin/env bash
# Serving while training: the demo model's throughput and latency at concurrency 4 and 32,
# idle and while a training job runs, on `kiln up` with 1 and 2 workers, with training
# slices (the default) and without (--training-slice-ms 0). Writes
# bench/train-serve/results.json and the train-serve section of docs/benchmarks.md.
# Extra arguments go to run.py (e.g. --seconds 10).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
kiln_build
exec "$KILN_VENV/bin/python" bench/train-serve/run.py "$@"
