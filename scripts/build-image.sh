#!/usr/bin/env bash
# Builds the vswitch container image from Debian packages, with no registry pull, as root:
#
#   1. the wheel: `pip wheel` of `git archive COMMIT` (the commit's files, not the work
#      tree's), built with the venv's Cython and numpy headers (NumPy 2 headers target the
#      1.23 C API by default, so the core runs on Debian 12's numpy 1.24);
#   2. the root filesystem: mmdebstrap --variant=minbase of Debian 12 (bookworm) with
#      python3, iproute2, nftables (vswitchd execs only `nft`, for ipMasq) and the runtime
#      dependencies that Debian 12 has in a version that works: python3-numpy (1.24),
#      python3-requests, python3-futurist, python3-pbr (etcd3gw's dependencies);
#   3. a virtualenv /opt/vswitch with the system site-packages (Debian's python3 is
#      "externally managed", PEP 668, so pip does not write into /usr) holding the wheel and
#      the two dependencies from PyPI, downloaded here on the build host and installed
#      offline, each because Debian 12's is too old: pyroute2 (Debian's 0.7.2 answers
#      None to msg.get("IFLA_ADDRESS"), which vswitch/daemon/netlink.py relies on; the
#      version the venv's tests run with is pinned) and etcd3gw (Debian's 2.0.0; the
#      cluster mode needs >= 2.7, vswitch/cluster/store.py);
#   4. a smoke test in the root filesystem (imports, the Cython core forwards a frame);
#   5. `buildah from scratch` + the root filesystem + config, committed as
#      vswitch:VERSION-SHORTCOMMIT and tagged vswitch:latest (local storage, the one podman
#      and buildah share), and vswitch:VERSION-src-KEY, KEY a hash of the build's inputs
#      (below): the cache.
#
# The cache: KEY hashes everything the image is made of that is not fetched from Debian:
# the commit's files except the folders no package and no build step reads (tests, docs,
# examples, deploy, tools, scripts, .ci, Containerfile, conftest.py, .gitignore: git's
# tree hashes of all the others: vswitch, cni, bench, ext, setup.py, pyproject.toml,
# README.md, LICENSE and anything added later), this script's own text, the two PyPI pins,
# and the venv's Cython and numpy (they build the core). A commit whose KEY was built
# already (a commit that changed only tests or docs) gets that image under its own tag,
# not rebuilt: its code is the same, file for file. The label
# org.opencontainers.image.revision names the commit that built it.
#
# Entry points: ENTRYPOINT vswitch-entrypoint (vswitch/daemon/entrypoint.py: runs vswitchd,
# gives the uplink NIC back if it dies), CMD vswitchd; `vswitchctl install-cni ...` as the
# command of an init container. The Containerfile beside this script builds the same image
# from a registry's debian:12 for people who have one.
#
# Usage: scripts/build-image.sh [--commit REF] [--tag NAME:TAG] [--force]
#   --commit REF   build this commit (default HEAD)
#   --tag N:T      the image name (default vswitch:VERSION-SHORTCOMMIT)
#   --force        build even if the inputs were built already (default: an image of the
#                  same inputs is reused, so the tests build an image once per change of
#                  what goes into it, not once per commit)
# Prints the image name on its last line of stdout.
set -euo pipefail
self=$(readlink -f "$0")
cd "$(dirname "$0")/.."
repo=$PWD

commit=HEAD tag= force=0
while [ $# -gt 0 ]; do
    case $1 in
        --commit) commit=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --force) force=1; shift ;;
        *) echo "build-image: unknown argument $1 (accepted: --commit REF, --tag NAME:TAG, --force)" >&2; exit 2 ;;
    esac
done
if [ "$(id -u)" -ne 0 ]; then
    echo "build-image: must run as root (mmdebstrap chroots, buildah writes /var/lib/containers)" >&2
    exit 1
fi
for tool in mmdebstrap buildah git; do
    command -v "$tool" >/dev/null || { echo "build-image: $tool missing: run scripts/setup.sh" >&2; exit 1; }
done
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || { echo "build-image: $python missing: run scripts/setup.sh" >&2; exit 1; }

sha=$(git rev-parse --verify "$commit^{commit}")
short=$(git rev-parse --short=12 "$sha")
version=$(git show "$sha:vswitch/__init__.py" | sed -n 's/^__version__ = "\(.*\)"$/\1/p')
[ -n "$version" ] || { echo "build-image: no __version__ in vswitch/__init__.py at $short" >&2; exit 1; }
tag=${tag:-vswitch:$version-$short}
etcd3gw_req='etcd3gw>=2.7'
pyroute2_req=pyroute2==$("$python" -c 'import importlib.metadata as m; print(m.version("pyroute2"))')

# the cache key (see the top): excluded are top-level entries of the commit that no build
# step reads; every other one counts by its git tree or blob hash
build_tools=$("$python" -c 'import Cython, numpy; print("cython", Cython.__version__, "numpy", numpy.__version__)')
key=$( { git ls-tree "$sha" | grep -v -E $'\t(tests|docs|examples|deploy|tools|scripts|\\.ci|Containerfile|conftest\\.py|\\.gitignore)$'
         sha256sum < "$self"; echo "$etcd3gw_req $pyroute2_req $build_tools"; } | sha256sum | cut -c1-16)
cache_tag=vswitch:$version-src-$key

if [ "$force" = 0 ] && buildah inspect --type image "$cache_tag" >/dev/null 2>&1; then
    echo "build-image: the inputs of $short were built already ($cache_tag); not rebuilt (--force rebuilds)" >&2
    buildah tag "$cache_tag" "$tag" vswitch:latest
    echo "localhost/$tag"
    exit 0
fi

work=$(mktemp -d /var/tmp/vswitch-image.XXXXXX)
ctr=
cleanup() {
    [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "build-image: wheel of $short (version $version)" >&2
mkdir -p "$work/src" "$work/wheels"
git archive "$sha" | tar -x -C "$work/src"
# no build isolation: the venv has the build requirements (setuptools, Cython, numpy), and
# nothing is fetched for the build
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" "$work/src" >&2
"$python" -m pip download -q --no-deps --only-binary=:all: -d "$work/wheels" "$etcd3gw_req" "$pyroute2_req" >&2
ls "$work/wheels" >&2

echo "build-image: root filesystem (mmdebstrap, Debian 12 minbase)" >&2
# The hooks run on the host with the root filesystem at "$1".
mmdebstrap --quiet --variant=minbase --mode=root \
    --include=python3,python3-venv,python3-numpy,python3-requests,python3-futurist,python3-pbr,iproute2,nftables \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="mkdir -p \"\$1/tmp/wheels\" && cp $work/wheels/*.whl \"\$1/tmp/wheels/\"" \
    --customize-hook='chroot "$1" python3 -m venv --system-site-packages /opt/vswitch' \
    --customize-hook='chroot "$1" sh -c "/opt/vswitch/bin/pip install -q --no-index --no-deps --no-cache-dir /tmp/wheels/*.whl"' \
    --customize-hook='chroot "$1" /opt/vswitch/bin/pip uninstall -q -y pip setuptools' \
    --customize-hook='for s in vswitchd vswitchctl vswitch-cni; do ln -s /opt/vswitch/bin/$s "$1/usr/local/bin/$s"; done' \
    --customize-hook='printf "#!/bin/sh\nexec /opt/vswitch/bin/python -m vswitch.daemon.entrypoint \"\$@\"\n" > "$1/usr/local/bin/vswitch-entrypoint" && chmod 755 "$1/usr/local/bin/vswitch-entrypoint"' \
    --customize-hook='chroot "$1" /opt/vswitch/bin/python -c "import numpy, pyroute2, etcd3gw, vswitch.daemon.main, vswitch.daemon.entrypoint, vswitch_cni.plugin; from vswitch import datapath; print(\"build-image: smoke:\", datapath.module().__name__, \"numpy\", numpy.__version__, \"pyroute2\", pyroute2.__version__)"' \
    --customize-hook='chroot "$1" vswitchd --version && chroot "$1" vswitchctl install-cni --help >/dev/null && command -v nft >/dev/null' \
    --customize-hook='rm -rf "$1/tmp/wheels" "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/*.bin; find "$1/opt/vswitch" -name __pycache__ -prune -o -name "*.pyc" -print0 | xargs -0r rm -f' \
    bookworm "$work/rootfs.tar" >&2

echo "build-image: committing $tag (buildah)" >&2
ctr=$(buildah from scratch)
buildah add "$ctr" "$work/rootfs.tar" / >/dev/null
buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --entrypoint '["/usr/local/bin/vswitch-entrypoint"]' --cmd vswitchd \
    --label org.opencontainers.image.title=vswitch \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.revision="$sha" \
    --label vswitch.build-inputs="$key" \
    --label org.opencontainers.image.base.name=debian:bookworm-minbase \
    "$ctr"
buildah commit -q --rm "$ctr" "$tag" >/dev/null
ctr=
buildah tag "$tag" "$cache_tag" vswitch:latest
# one image per build would pile up (about 260 MB each on a CI machine that builds every
# change): drop this project's older tags (commit and cache tags; an image goes with its
# last tag); an image a container still uses stays
for old in $(buildah images --format '{{.Name}}:{{.Tag}}' 2>/dev/null | grep '^localhost/vswitch:' || true); do
    case "$old" in
        "localhost/$tag"|"localhost/$cache_tag"|localhost/vswitch:latest|*-next) ;;
        *) buildah rmi "$old" >/dev/null 2>&1 && echo "build-image: removed the older $old" >&2 ;;
    esac
done
echo "build-image: built $tag" >&2
echo "localhost/$tag"
