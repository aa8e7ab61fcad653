#!/usr/bin/env bash
# Sets up vswitch on a fresh Debian 12 machine, as root: the system packages it needs,
# a virtualenv in .venv with the project (Cython core built) and its test extras.
# Safe to run again; it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/apt-need.sh
# openvswitch-switch: the benchmark's Open vSwitch peer (bench/bench_ovs.py starts its own
# daemons). mmdebstrap + buildah: scripts/build-image.sh (the container image, built from
# Debian packages with no registry; tests/runtimes/test_rehearsal.py runs it). etcd-client:
# etcdctl, with which tests/integration/test_cluster_e2e.py writes forged records into etcd.
apt_need setup python3 python3-venv python3-dev gcc iproute2 iputils-ping iperf3 tcpdump \
    containernetworking-plugins iptables nftables procps openvswitch-switch etcd-server etcd-client \
    mmdebstrap buildah

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# The build requirements live in the venv too (no build isolation), so that
# `setup.py build_ext --inplace` can rebuild the core in the work tree.
.venv/bin/python -m pip install -q "setuptools>=77" wheel "cython>=3.0" "numpy>=1.24"
echo "setup: installing vswitch with its test, plot and runtimes extras (builds the Cython core)"
.venv/bin/python -m pip install -q --no-build-isolation -e '.[test,plot,runtimes]'
# Build the extension in place as well: the work tree, which pytest puts first on
# sys.path, then always holds the current core.
.venv/bin/python setup.py -q build_ext --inplace >/dev/null
# containerd, podman, Go + libcni and busybox for the real-runtime tests (tests/runtimes).
scripts/setup-runtimes.sh .venv/bin/python
echo "setup: done"
