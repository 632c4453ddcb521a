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
