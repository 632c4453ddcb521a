#!/usr/bin/env bash
# Set up and start the embedded cluster: `scripts/up.sh [kiln up flags…]`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
kiln_system_deps
cargo build --bin kiln
exec "$CARGO_TARGET_DIR/debug/kiln" up "$@"
