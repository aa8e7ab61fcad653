#!/usr/bin/env bash
# Installs what tests/runtimes/ needs on a fresh Debian 12 machine, as root:
#   containerd + runc          the CRI runtime (its CRI plugin is built in)
#   podman                     podman 4.3, run with network_backend = "cni"
#   containernetworking-plugins the reference chain (bridge, host-local, portmap, bandwidth)
#   golang-go + golang-github-appc-cni-dev  to build tools/libcni-client offline
#   busybox-static             the only binary in the images and root filesystems we build
#   iptables, iproute2         portmap's backend; ip netns / tc for the tests
# and, into the Python that runs the tests, grpcio + grpcio-tools for tools/cri (the CRI is
# gRPC over HTTP/2; grpcio-tools compiles tools/cri/cri_v1_api.proto at run time).
#
# Usage: scripts/setup-runtimes.sh [PYTHON]   (default: .venv/bin/python if present, else
# python3). Safe to run again; it only adds what is missing. Services are not started:
# the tests start their own containerd, and nothing here enables a system one.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-runtimes: must run as root (it installs Debian packages)" >&2
    exit 1
fi

python=${1:-}
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

. scripts/apt-need.sh
apt_need setup-runtimes containerd runc podman containernetworking-plugins golang-go \
    golang-github-appc-cni-dev busybox-static iptables iproute2

if ! "$python" -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
    echo "setup-runtimes: installing grpcio and grpcio-tools into $python"
    "$python" -m pip install -q 'grpcio>=1.50' 'grpcio-tools>=1.50'
fi

# Fail here, not in the tests, when something is still missing.
for tool in containerd ctr runc podman go busybox iptables-save; do
    command -v "$tool" >/dev/null || { echo "setup-runtimes: $tool missing after install" >&2; exit 1; }
done
test -d /usr/share/gocode/src/github.com/containernetworking/cni/libcni || {
    echo "setup-runtimes: libcni sources missing (golang-github-appc-cni-dev)" >&2; exit 1; }
"$python" -c 'import grpc; grpc.protos_and_services' >/dev/null
echo "setup-runtimes: done"
