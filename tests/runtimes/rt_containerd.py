"""A private containerd for one test session: its own root, state, socket and CNI dirs.

Theory of operation: ``Containerd.start`` writes a version-2 ``config.toml`` under a
temporary directory (root, state, gRPC and ttrpc addresses, the opt plugin's path, the CRI
plugin with runc through the v2 shim and the cgroupfs driver, netns mounts under the state
dir, ``restrict_oom_score_adj`` because the machine lacks CAP_SYS_RESOURCE, the sandbox
image we import, and the CNI bin and conf dirs the test controls). It starts
``containerd --config`` as a child, waits for the CRI ``Version`` call to answer, and
imports the busybox images with ``ctr images import`` into the ``k8s.io`` namespace.

``stop`` removes whatever pods are still there through the CRI (so the CNI DEL runs), then
sends SIGTERM to the PID it started (SIGKILL after a grace period), kills any shim whose
command line names our private address, unmounts what is left under root and state, and
removes the directory. Nothing is ever stopped by name.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

from tools.busybox_image import write_oci_archive
from tools.cri import CriClient, CriError

IMAGE = "localhost/vswitch-test/busybox:1"
PAUSE_IMAGE = "localhost/vswitch-test/pause:1"
# The workload image's default command; tests pass their own.
_IMAGES = {IMAGE: ["/bin/sh"], PAUSE_IMAGE: ["/bin/sleep", "2147483647"]}

_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{address}"

[ttrpc]
  address = "{address}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"""


class Containerd:
    """One containerd process with a private configuration under ``base_dir``."""

    def __init__(self, base_dir: str, cni_bin_dir: str, cni_conf_dir: str):
        self.base_dir = base_dir
        self.cni_bin_dir = cni_bin_dir
        self.cni_conf_dir = cni_conf_dir
        self.root = os.path.join(base_dir, "root")
        self.state = os.path.join(base_dir, "state")
        self.address = os.path.join(base_dir, "containerd.sock")
        self.config_path = os.path.join(base_dir, "config.toml")
        self.log_path = os.path.join(base_dir, "containerd.log")
        self.proc: subprocess.Popen | None = None
        self.cri: CriClient | None = None

    # -- life cycle --------------------------------------------------------------------

    def start(self, timeout_s: float = 60.0) -> "Containerd":
        os.makedirs(self.base_dir, exist_ok=True)
        with open(self.config_path, "w") as f:
            f.write(_CONFIG.format(
                root=self.root, state=self.state, address=self.address,
                opt=os.path.join(self.base_dir, "opt"), pause=PAUSE_IMAGE,
                runc=_which("runc"), cni_bin=self.cni_bin_dir, cni_conf=self.cni_conf_dir))
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(["containerd", "--config", self.config_path],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        self.cri = CriClient(self.address)
        try:
            self.cri.wait_ready(timeout_s, proc=self.proc)
            self.import_images()
        except Exception as exc:
            self.stop()
            raise RuntimeError(f"containerd did not start: {exc}\n{self.log_tail()}") from exc
        return self

    def import_images(self) -> None:
        archive = os.path.join(self.base_dir, "images.tar")
        write_oci_archive(archive, _IMAGES)
        self.ctr("images", "import", "--all-platforms", archive)
        listed = self.ctr("images", "ls", "-q")
        missing = [ref for ref in _IMAGES if ref not in listed.split()]
        if missing:
            raise RuntimeError(f"ctr import did not create {missing}; ctr lists: {listed!r}")

    def ctr(self, *args: str, timeout_s: float = 60.0) -> str:
        cmd = ["ctr", "--address", self.address, "-n", "k8s.io", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def remove_all_pods(self) -> list[str]:
        """Stops and removes every pod still known; returns errors instead of raising."""
        errors = []
        if self.cri is None or self.proc is None or self.proc.poll() is not None:
            return errors
        try:
            pods = self.cri.list_pods()
        except CriError as exc:
            return [str(exc)]
        for pod in pods:
            for call in (self.cri.stop_pod, self.cri.remove_pod):
                try:
                    call(pod.id)
                except CriError as exc:
                    errors.append(str(exc))
        return errors

    def stop(self) -> None:
        self.remove_all_pods()
        if self.cri is not None:
            self.cri.close()
            self.cri = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._kill_our_shims()
        self._unmount_under(self.base_dir)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # -- cleanup helpers ---------------------------------------------------------------

    def _kill_our_shims(self) -> None:
        """SIGKILLs containerd-shim processes started for our address (and only those)."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") \
                    and self.address.encode() in argv:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    @staticmethod
    def _unmount_under(path: str) -> None:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        for point in sorted((p for p in points if p.startswith(path + "/")),
                            key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)


def _which(name: str) -> str:
    for d in os.environ.get("PATH", "/usr/sbin:/usr/bin").split(":") + ["/usr/sbin", "/usr/bin"]:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    raise FileNotFoundError(f"{name} not found in PATH: install the Debian package {name}")


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Polls ``predicate`` until it returns a true value; raises naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
