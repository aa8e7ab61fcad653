"""Container images and root filesystems made from the host's static busybox, offline.

Theory of operation: there is no registry to pull from, so tests build their own images.
The root filesystem holds ``/bin/busybox`` (Debian's ``busybox-static``, a static binary)
and one relative symlink per applet (``/bin/sh -> busybox``): relative links resolve
inside the container's root, wherever the snapshotter mounts it. ``/etc/passwd``,
``/etc/group`` and empty mount points complete it.

``write_oci_archive`` writes an OCI image layout as a tar (``oci-layout``, ``index.json``,
``blobs/sha256/...``): one uncompressed layer shared by every image named, and one config
and manifest per image, so a sandbox ("pause") image and a workload image cost one layer.
Each manifest in the index carries both ``io.containerd.image.name`` and
``org.opencontainers.image.ref.name`` with the full reference, which is what
``ctr images import`` names the images by. Output is deterministic (fixed mtimes, sorted
entries), so the same busybox gives the same digests.

``write_rootfs`` writes the same tree into a directory, for ``podman run --rootfs``.

Usage: ``python -m tools.busybox_image OUT.tar NAME=CMD...`` (CMD is a shell string).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile

BUSYBOX = "/bin/busybox"
_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
            "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
_DIRS = ("bin", "dev", "etc", "proc", "root", "run", "sys", "tmp", "var", "www")
_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1 localhost\n",
}


def busybox_path() -> str:
    """The static busybox to put in images; a clear error when it is missing or dynamic."""
    if not os.path.isfile(BUSYBOX):
        raise FileNotFoundError(f"{BUSYBOX} is missing: install the Debian package busybox-static")
    with open(BUSYBOX, "rb") as f:
        head = f.read(4096)
    if b"ld-linux" in head or b".interp" in head:
        raise RuntimeError(f"{BUSYBOX} is dynamically linked: install busybox-static")
    return BUSYBOX


def applets(busybox: str | None = None) -> list[str]:
    out = subprocess.run([busybox or busybox_path(), "--list"], check=True,
                         capture_output=True, text=True).stdout
    return sorted(a for a in out.split() if a and "/" not in a and a != "busybox")


def go_arch() -> str:
    machine = platform.machine()
    if machine not in _GO_ARCH:
        raise RuntimeError(f"unknown machine architecture {machine!r}; known: {sorted(_GO_ARCH)}")
    return _GO_ARCH[machine]


def _layer_tar() -> bytes:
    """The root filesystem as an uncompressed, deterministic tar."""
    busybox = busybox_path()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(info, data=None):
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        for d in _DIRS:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            add(info)
        with open(busybox, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(data)
        info.mode = 0o755
        add(info, data)
        for name in applets(busybox):
            info = tarfile.TarInfo(f"bin/{name}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            info.mode = 0o777
            add(info)
        for path, text in sorted(_FILES.items()):
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            add(info, data)
    return buf.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    info = tarfile.TarInfo(f"blobs/sha256/{digest}")
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))
    return f"sha256:{digest}"


def write_oci_archive(path: str, images: dict[str, list[str]]) -> dict[str, str]:
    """Writes an OCI layout tar holding one image per ``{reference: cmd argv}``.

    Returns ``{reference: manifest digest}``. References must be full
    (``localhost/vswitch-test/busybox:1``).
    """
    if not images:
        raise ValueError("write_oci_archive needs at least one image")
    for ref in images:
        if "/" not in ref or ":" not in ref.rsplit("/", 1)[-1]:
            raise ValueError(f"image reference {ref!r} must be full, like localhost/x/y:tag")
    layer = _layer_tar()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    digests = {}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add_json(name, obj):
            data = json.dumps(obj, sort_keys=True).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))

        add_json("oci-layout", {"imageLayoutVersion": "1.0.0"})
        layer_digest = _blob(tar, layer)
        manifests = []
        for ref, cmd in sorted(images.items()):
            config = {
                "architecture": go_arch(), "os": "linux",
                "config": {"Cmd": list(cmd), "Env": ["PATH=/bin"], "WorkingDir": "/"},
                "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                "history": [{"created_by": "tools/busybox_image.py"}],
            }
            config_bytes = json.dumps(config, sort_keys=True).encode()
            config_digest = _blob(tar, config_bytes)
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": len(config_bytes)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": layer_digest, "size": len(layer)}],
            }
            manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
            manifest_digest = _blob(tar, manifest_bytes)
            digests[ref] = manifest_digest
            manifests.append({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": len(manifest_bytes),
                "platform": {"architecture": go_arch(), "os": "linux"},
                "annotations": {"io.containerd.image.name": ref,
                                "org.opencontainers.image.ref.name": ref},
            })
        add_json("index.json", {"schemaVersion": 2, "manifests": manifests})
    return digests


def write_rootfs(directory: str) -> str:
    """Writes the busybox root filesystem into ``directory`` (created); returns it."""
    os.makedirs(directory, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(_layer_tar())) as tar:
        if hasattr(tarfile, "tar_filter"):  # Python 3.11.4+: keep modes, refuse escapes
            tar.extractall(directory, filter="tar")
        else:
            tar.extractall(directory)
    return directory


def remove_rootfs(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        print("usage: python -m tools.busybox_image OUT.tar REF=SHELL-COMMAND...",
              file=sys.stderr)
        return 2
    images = {a.split("=", 1)[0]: ["/bin/sh", "-c", a.split("=", 1)[1]] for a in argv[1:]}
    for ref, digest in write_oci_archive(argv[0], images).items():
        print(f"{ref} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
