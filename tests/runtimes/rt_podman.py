"""A private podman 4.3 for one test module: own root, runroot, tmpdir and containers.conf.

Theory of operation: every ``podman`` command runs with ``CONTAINERS_CONF`` pointing at a
containers.conf under the test's directory (nofile and nproc limits runc can set
without CAP_SYS_RESOURCE; ``network_backend = "cni"``, the chain's CNI
bin and conf dirs, the file events logger, cgroupfs, runc) and with ``--root``,
``--runroot`` (a short path under the temporary dir: podman caps its length), ``--tmpdir``, ``--volumepath`` and ``--storage-driver vfs`` on the command
line, so it shares nothing with the node's podman. Containers run from a busybox root
filesystem directory (``--rootfs``), one directory per container; no image store is used.
``remove_all`` force-removes every container of this private podman (each removal runs
the CNI DEL), and podman holds no daemon, so nothing else needs stopping.
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import tempfile

from tools.busybox_image import remove_rootfs, write_rootfs

_CONF = """\
[containers]
default_ulimits = [{ulimits}]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin_dir}"]
network_config_dir = "{conf_dir}"
default_network = "{network}"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base}/events.log"
runtime = "runc"
tmp_dir = "{base}/tmp"
static_dir = "{base}/root/libpod"
volume_path = "{base}/volumes"
"""


def _ulimits() -> str:
    """Limits the containers can be given without CAP_SYS_RESOURCE (absent here).

    podman's default raises nofile and nproc to 1048576, which runc cannot set. nofile at
    the node's hard limit works; nproc at the node's hard limit still failed with EPERM
    under podman 4.3/runc 1.1.5 here (lower values work), so it is capped at 4096.
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
    nproc = 4096 if nproc == resource.RLIM_INFINITY else min(nproc, 4096)
    return f'"nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"'


class Podman:
    def __init__(self, base_dir: str, bin_dir: str, conf_dir: str, network: str):
        self.base_dir = base_dir
        self.network = network
        os.makedirs(base_dir, exist_ok=True)
        # podman refuses a runroot path longer than 50 characters.
        self.runroot = tempfile.mkdtemp(prefix="vsrt-pm-")
        self.conf_path = os.path.join(base_dir, "containers.conf")
        with open(self.conf_path, "w") as f:
            f.write(_CONF.format(bin_dir=bin_dir, conf_dir=conf_dir, network=network,
                                 base=base_dir, ulimits=_ulimits()))
        self.env = dict(os.environ, CONTAINERS_CONF=self.conf_path,
                        TMPDIR=os.path.join(base_dir, "tmp"))
        os.makedirs(self.env["TMPDIR"], exist_ok=True)
        self.global_args = ["--root", os.path.join(base_dir, "root"),
                            "--runroot", self.runroot,
                            "--tmpdir", os.path.join(base_dir, "tmp"),
                            "--volumepath", os.path.join(base_dir, "volumes"),
                            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
                            "--events-backend", "file", "--network-config-dir", conf_dir]
        self._rootfs_dirs: list[str] = []

    def __call__(self, *args: str, check: bool = True, timeout_s: float = 120.0) -> str:
        cmd = ["podman", *self.global_args, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env,
                             timeout=timeout_s, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def run_detached(self, name: str, command: list[str], publish: list[str] = ()) -> str:
        """``podman run -d --rootfs`` on the chain's network; returns the container id."""
        rootfs = write_rootfs(os.path.join(self.base_dir, "rootfs", name))
        self._rootfs_dirs.append(rootfs)
        args = ["run", "-d", "--name", name, "--network", self.network]
        for p in publish:
            args += ["-p", p]
        return self(*args, "--rootfs", rootfs, *command).strip()

    def ip(self, name: str) -> str:
        return self("inspect", "-f",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name).strip()

    def netns_path(self, name: str) -> str:
        return self("inspect", "-f", "{{.NetworkSettings.SandboxKey}}", name).strip()

    def remove_all(self) -> None:
        self("rm", "-a", "-f", "-t", "0", check=False)
        for d in self._rootfs_dirs:
            remove_rootfs(d)
        self._rootfs_dirs.clear()

    def close(self) -> None:
        """Removes every container, then the short-path runroot."""
        self.remove_all()
        subprocess.run(["umount", "-R", "-l", self.runroot], capture_output=True)
        shutil.rmtree(self.runroot, ignore_errors=True)
