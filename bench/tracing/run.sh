#!/usr/bin/env bash
# Kiln's throughput at concurrency 32 (batch 1) with traces exported at 100% sampling, at
# 1%, and with tracing off, to an OTLP sink (`kiln-bench otlp-sink`) on this machine.
# Writes bench/tracing/results.json and the "Tracing overhead" section of
# docs/benchmarks.md, and, where valgrind is installed, instructions per request counted by
# callgrind. About 6 minutes (KILN_BENCH_SECONDS per run, 10; KILN_BENCH_ROUNDS, 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
kiln_build
exec python3 bench/tracing/run.py
