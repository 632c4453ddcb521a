# Sourced by Kiln's scripts: installs what a fresh Debian machine with only the Rust
# toolchain lacks, and sets the shared build directory.

# One target directory outside the clone, shared by every build, test and CI run on this
# machine: a cold Burn + wgpu build takes about 20 minutes on 2 cores; a warm one seconds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/kiln-target}"
# The Python virtualenv for the client tests, kept beside it for the same reason.
export KILN_VENV="${KILN_VENV:-/var/tmp/kiln-venv}"

kiln_apt_install() {
    # Install Debian packages that are missing; needs root (or sudo).
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "kiln: installing ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The system packages, then the `kiln` binary (debug profile, the one the tests use), as
# $KILN_BIN, and the benchmark servers' `kiln-bench` as $KILN_BENCH_BIN: what every
# benchmark script starts with.
kiln_build() {
    kiln_system_deps
    cargo build -p kiln -p kiln-bench --bins
    export KILN_BIN="$CARGO_TARGET_DIR/debug/kiln"
    export KILN_BENCH_BIN="$CARGO_TARGET_DIR/debug/kiln-bench"
}

kiln_system_deps() {
    # protoc compiles the .proto files; Mesa's lavapipe gives wgpu a Vulkan device on
    # machines without a GPU (used only when asked for: --device wgpu:cpu).
    # etcd is cluster mode's state store; the tests start their own on loopback ports.
    local pkgs=(mesa-vulkan-drivers)
    command -v protoc >/dev/null 2>&1 || pkgs+=(protobuf-compiler)
    command -v etcd >/dev/null 2>&1 || pkgs+=(etcd-server)
    command -v etcdctl >/dev/null 2>&1 || pkgs+=(etcd-client)
    kiln_apt_install "${pkgs[@]}"
}

# Triton's Performance Analyzer, for the perf_analyzer test and the serving benchmark. The
# binary ships inside the tritonclient 2.51.0 wheel (later wheels need a newer glibc); it
# links libb64 (Debian) and the CUDA runtime library (PyPI), which it loads even on a
# machine without a GPU. Installed in a virtualenv of its own (the client tests use a newer
# tritonclient), with a wrapper that finds the library. Sets KILN_PERF_ANALYZER.
export KILN_PA_VENV="${KILN_PA_VENV:-/var/tmp/kiln-pa-venv}"
kiln_perf_analyzer() {
    kiln_apt_install libb64-0d
    local wrapper="$KILN_PA_VENV/bin/kiln-perf-analyzer"
    if [ ! -x "$wrapper" ]; then
        [ -x "$KILN_PA_VENV/bin/pip" ] || python3 -m venv "$KILN_PA_VENV"
        "$KILN_PA_VENV/bin/pip" install -q --disable-pip-version-check \
            'tritonclient==2.51.0' 'nvidia-cuda-runtime-cu12>=12,<13'
        local lib
        lib="$("$KILN_PA_VENV/bin/python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(list(nvidia.cuda_runtime.__path__)[0], "lib"))')"
        printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
            "$lib" "$KILN_PA_VENV/bin/perf_analyzer" > "$wrapper"
        chmod +x "$wrapper"
    fi
    export KILN_PERF_ANALYZER="$wrapper"
}

# Prometheus, for the test that evaluates the autoscaling queries (deploy/kubernetes/
# components) against real workers. Only the server binary is needed: it is taken from
# Debian's package without installing it (installing would start a system service).
# Sets KILN_PROMETHEUS.
export KILN_PROMETHEUS="${KILN_PROMETHEUS:-/var/tmp/kiln-prometheus/prometheus}"
kiln_prometheus() {
    [ -x "$KILN_PROMETHEUS" ] && return 0
    local dir
    dir="$(mktemp -d)"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    (cd "$dir" && { apt-get download prometheus >/dev/null 2>&1 \
        || { $sudo apt-get update -qq && apt-get download prometheus >/dev/null; }; })
    dpkg-deb -x "$dir"/prometheus_*.deb "$dir/root"
    mkdir -p "$(dirname "$KILN_PROMETHEUS")"
    cp "$dir/root/usr/bin/prometheus" "$KILN_PROMETHEUS"
    rm -rf "$dir"
}
