#!/usr/bin/env bash
# Builds the vswitch container image from Debian packages, with no registry pull, as root:
#
#   1. the wheel: `pip wheel` of `git archive COMMIT` (the commit's files, not the work
#      tree's), built with the venv's Cython and numpy headers (NumPy 2 headers target the
#      1.23 C API by default, so the core runs on Debian 12's numpy 1.24);
#   2. the base root filesystem: mmdebstrap --variant=minbase of Debian 12 (bookworm) with
#      python3, iproute2, nftables (vswitchd execs only `nft`, for ipMasq) and the runtime
#      dependencies that Debian 12 has in a version that works: python3-numpy (1.24),
#      python3-requests, python3-futurist, python3-pbr (etcd3gw's dependencies), and a
#      virtualenv /opt/vswitch with the system site-packages (Debian's python3 is
#      "externally managed", PEP 668, so pip does not write into /usr) holding the two
#      dependencies from PyPI, downloaded here on the build host and installed offline,
#      each because Debian 12's is too old: pyroute2 (Debian's 0.7.2 answers None to
#      msg.get("IFLA_ADDRESS"), which vswitch/daemon/netlink.py relies on; the version the
#      venv's tests run with is pinned) and etcd3gw (Debian's 2.0.0; the cluster mode needs
#      >= 2.7, vswitch/cluster/store.py); committed as the image vswitch-base:BASEKEY;
#   3. `buildah from` that base: the wheel installed into the venv (chroot into the mounted
#      container, as mmdebstrap's hooks do), pip removed, the entry points;
#   4. a smoke test in the root filesystem (imports, the Cython core loads, the commands run);
#   5. config, committed as vswitch:VERSION-SHORTCOMMIT and tagged vswitch:latest (local
#      storage, the one podman and buildah share) and vswitch:VERSION-src-KEY, KEY a hash
#      of the build's inputs (below): the cache.
#
# Two caches, so that a commit does not pay for what it did not change:
# - the image: KEY hashes everything the image is made of that is not fetched from Debian:
#   the commit's files except the folders no package and no build step reads (tests, docs,
#   examples, deploy, tools, scripts, .ci, Containerfile, conftest.py, .gitignore: git's
#   tree hashes of all the others: vswitch, cni, bench, ext, setup.py, pyproject.toml,
#   README.md, LICENSE and anything added later), this script's own text, the two PyPI
#   pins, and the venv's Cython and numpy (they build the core). A commit whose KEY was
#   built already (a commit that changed only tests or docs) gets that image under its own
#   tag, not rebuilt: its code is the same, file for file. The label
#   org.opencontainers.image.revision names the commit that built it.
# - the compiled core (Cython and gcc, about half of the wheel's time): CORE_KEY hashes its
#   inputs: ext/, setup.py, pyproject.toml, vswitch/datapath/consts.py and gen_consts.py
#   (setup.py generates ext/consts.pxi from them), Cython, numpy and the interpreter; kept in
#   /var/cache/vswitch-image/core-CORE_KEY (VSWITCH_IMAGE_CACHE), the last one only.
# - the base (step 2, about half of a build): BASEKEY hashes this script's text, the PyPI
#   pins and the ISO week (Debian's updates come in within a week); a commit that changed
#   the code builds only the wheel and step 3 onwards on it.
#
# Entry points: ENTRYPOINT vswitch-entrypoint (vswitch/daemon/entrypoint.py: runs vswitchd,
# gives the uplink NIC back if it dies), CMD vswitchd; `vswitchctl install-cni ...` as the
# command of an init container. The Containerfile beside this script builds the same image
# from a registry's debian:12 for people who have one.
#
# Usage: scripts/build-image.sh [--commit REF] [--tag NAME:TAG] [--force]
#   --commit REF   build this commit (default HEAD)
#   --tag N:T      the image name (default vswitch:VERSION-SHORTCOMMIT)
#   --force        build everything, the base too, even if the inputs were built already
#                  (default: an image of the same inputs is reused, so the tests build an
#                  image once per change of what goes into it, not once per commit)
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
mkdir -p "$work/src" "$work/wheels" "$work/deps"
git archive "$sha" | tar -x -C "$work/src"
# no build isolation: the venv has the build requirements (setuptools, Cython, numpy), and
# nothing is fetched for the build
# The compiled core is reused when its inputs are the same (see the top): the generated C,
# consts.pxi and the extension go back into the tree as a previous build left them, newer
# than their sources, so cythonize and build_ext find them up to date; the Python files
# are always copied from this commit (build/lib holds nothing else of the cache)
core_key=$( { git ls-tree -r "$sha" -- ext setup.py pyproject.toml vswitch/datapath/consts.py vswitch/datapath/gen_consts.py
              echo "$build_tools $("$python" -c 'import sys, sysconfig; print(sys.version, sysconfig.get_platform())')"
            } | sha256sum | cut -c1-16)
core_cache=${VSWITCH_IMAGE_CACHE:-/var/cache/vswitch-image}/core-$core_key
restore_core() {
    # a copy first: another build may replace the cache meanwhile (then this one compiles)
    cp -r "$core_cache" "$work/core" 2>/dev/null && [ -f "$work/core/files" ] || return
    while read -r f; do
        [ -f "$work/core/$f" ] || return
    done < "$work/core/files"
    while read -r f; do
        mkdir -p "$(dirname "$work/src/$f")" && cp "$work/core/$f" "$work/src/$f" &&
            touch "$work/src/$f" || return     # in this order: the C, then the extension
    done < "$work/core/files"
}
if [ "$force" = 0 ] && [ -f "$core_cache/files" ]; then
    if restore_core; then
        echo "build-image: the compiled core of these sources is reused ($core_cache)" >&2
    else
        echo "build-image: the compiled core's cache could not be read; compiling" >&2
        rm -f "$work/src/ext/consts.pxi" "$work/src/ext/_datapath.c"; rm -rf "$work/src/build"
    fi
fi
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" "$work/src" >&2
ls "$work/wheels" >&2
save_core() {
    rm -rf "${core_cache%/*}"/core-* && mkdir -p "$core_cache.tmp" || return
    (cd "$work/src" && { echo ext/consts.pxi; echo ext/_datapath.c; find build -path '*/vswitch/datapath/_core*.so'; }) \
        > "$core_cache.tmp/files" || return
    [ "$(wc -l < "$core_cache.tmp/files")" = 3 ] || return
    while read -r f; do
        mkdir -p "$(dirname "$core_cache.tmp/$f")" && cp "$work/src/$f" "$core_cache.tmp/$f" || return
    done < "$core_cache.tmp/files"
    mv "$core_cache.tmp" "$core_cache"
}
[ -f "$core_cache/files" ] || save_core || echo "build-image: the compiled core was not kept (next build compiles it)" >&2

# step 2, the base (see the top): everything of the image that is not this commit's
base_key=$( { sha256sum < "$self"; echo "$etcd3gw_req $pyroute2_req $(date -u +%G-W%V)"; } | sha256sum | cut -c1-16)
base_tag=vswitch-base:$base_key
if [ "$force" = 1 ] || ! buildah inspect --type image "$base_tag" >/dev/null 2>&1; then
    "$python" -m pip download -q --no-deps --only-binary=:all: -d "$work/deps" "$etcd3gw_req" "$pyroute2_req" >&2
    ls "$work/deps" >&2
    echo "build-image: root filesystem (mmdebstrap, Debian 12 minbase) for $base_tag" >&2
    # The hooks run on the host with the root filesystem at "$1".
    mmdebstrap --quiet --variant=minbase --mode=root \
        --include=python3,python3-venv,python3-numpy,python3-requests,python3-futurist,python3-pbr,iproute2,nftables \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook="mkdir -p \"\$1/tmp/wheels\" && cp $work/deps/*.whl \"\$1/tmp/wheels/\"" \
        --customize-hook='chroot "$1" python3 -m venv --system-site-packages /opt/vswitch' \
        --customize-hook='chroot "$1" sh -c "/opt/vswitch/bin/pip install -q --no-index --no-deps --no-cache-dir /tmp/wheels/*.whl"' \
        --customize-hook='rm -rf "$1/tmp/wheels" "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/*.bin; find "$1/opt/vswitch" -name __pycache__ -prune -o -name "*.pyc" -print0 | xargs -0r rm -f' \
        bookworm "$work/rootfs.tar" >&2
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$work/rootfs.tar" / >/dev/null
    rm -f "$work/rootfs.tar"
    buildah commit -q --rm "$ctr" "$base_tag" >/dev/null
    ctr=
    # older bases go (an image still used by a container or another image stays)
    for old in $(buildah images --format '{{.Name}}:{{.Tag}}' 2>/dev/null | grep '^localhost/vswitch-base:' || true); do
        [ "$old" = "localhost/$base_tag" ] || { buildah rmi "$old" >/dev/null 2>&1 && echo "build-image: removed the older $old" >&2; } || true
    done
else
    echo "build-image: root filesystem: $base_tag (built already)" >&2
fi

echo "build-image: installing the wheel on $base_tag" >&2
ctr=$(buildah from "$base_tag")
root=$(buildah mount "$ctr")
# in the root filesystem, as mmdebstrap's hooks run: chroot, with /proc and /dev mounted in
# a mount namespace of its own (gone when it exits)
in_root() {
    unshare --mount --propagation private sh -c \
        'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && exec chroot "$0" "$@"' "$root" "$@"
}
mkdir -p "$root/tmp/wheels"
cp "$work/wheels"/*.whl "$root/tmp/wheels/"
in_root sh -c "/opt/vswitch/bin/pip install -q --no-index --no-deps --no-cache-dir /tmp/wheels/*.whl" >&2
in_root /opt/vswitch/bin/pip uninstall -q -y pip setuptools >&2
for s in vswitchd vswitchctl vswitch-cni; do ln -s /opt/vswitch/bin/$s "$root/usr/local/bin/$s"; done
printf '#!/bin/sh\nexec /opt/vswitch/bin/python -m vswitch.daemon.entrypoint "$@"\n' > "$root/usr/local/bin/vswitch-entrypoint"
chmod 755 "$root/usr/local/bin/vswitch-entrypoint"
# the smoke test (step 4)
in_root /opt/vswitch/bin/python -c "import numpy, pyroute2, etcd3gw, vswitch.daemon.main, vswitch.daemon.entrypoint, vswitch_cni.plugin; from vswitch import datapath; print('build-image: smoke:', datapath.module().__name__, 'numpy', numpy.__version__, 'pyroute2', pyroute2.__version__)" >&2
in_root vswitchd --version >&2
in_root vswitchctl install-cni --help >/dev/null
in_root sh -c 'command -v nft' >/dev/null
rm -rf "$root/tmp/wheels"
find "$root/opt/vswitch" -name __pycache__ -prune -o -name "*.pyc" -print0 | xargs -0r rm -f
buildah umount "$ctr" >/dev/null

echo "build-image: committing $tag (buildah)" >&2
buildah config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --entrypoint '["/usr/local/bin/vswitch-entrypoint"]' --cmd vswitchd \
    --label org.opencontainers.image.title=vswitch \
    --label org.opencontainers.image.version="$version" \
    --label org.opencontainers.image.revision="$sha" \
    --label vswitch.build-inputs="$key" \
    --label org.opencontainers.image.base.name=debian:bookworm-minbase \
    --label vswitch.base="$base_tag" \
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
