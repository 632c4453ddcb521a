#!/usr/bin/env bash
# Kiln against Seldon MLServer and NVIDIA Triton (PyTriton) serving the same network, and
# against a bare tonic floor, with the same client on this machine; then Kiln's sharded
# against unsharded latency and its data-parallel training speed-up. Writes
# bench/serving/results.json and the "Serving against MLServer and Triton" section of
# docs/benchmarks.md. Takes about 15 minutes on 2 cores (KILN_BENCH_SECONDS per cell, 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
kiln_build

# One virtualenv per server: their pins do not agree with each other.
bench_venv() {
    local dir="$1"; shift
    [ -x "$dir/bin/python" ] || python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$@"
}
MLSERVER_VENV="${KILN_BENCH_MLSERVER_VENV:-/var/tmp/kiln-bench-mlserver}"
PYTRITON_VENV="${KILN_BENCH_PYTRITON_VENV:-/var/tmp/kiln-bench-pytriton}"
# PyTriton's Python-backend stub embeds its own libpython 3.11, older than some 3.11
# standard libraries (3.11.7's multiprocessing calls RLock._recursion_count, which the
# stub's interpreter lacks); Debian's Python 3.11 matches it.
if [ ! -x "$PYTRITON_VENV/bin/python" ]; then
    kiln_apt_install python3-venv
    /usr/bin/python3 -m venv "$PYTRITON_VENV"
fi
# uvloop 0.22 and later refuse MLServer 1.7's get_event_loop() in its worker processes.
bench_venv "$MLSERVER_VENV" 'mlserver==1.7.1' 'mlserver-sklearn==1.7.1' 'uvloop<0.22'
bench_venv "$PYTRITON_VENV" 'nvidia-pytriton==0.7.0'
[ -x "$KILN_VENV/bin/python" ] || python3 -m venv "$KILN_VENV"
"$KILN_VENV/bin/pip" install -q --disable-pip-version-check 'tritonclient[grpc]==2.73.0' 'numpy<3'
export KILN_BENCH_MLSERVER_PY="$MLSERVER_VENV/bin/python"
export KILN_BENCH_PYTRITON_PY="$PYTRITON_VENV/bin/python"
exec "$KILN_VENV/bin/python" bench/serving/run.py
