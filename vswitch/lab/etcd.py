"""etcd v3 for the tests and the lab: one member, or a three-member cluster, on loopback.

Theory of operation: ``Etcd`` runs Debian's ``etcd`` binary (package ``etcd-server``) as a
subprocess listening on 127.0.0.1 only, on two ports that were free when it was built
(client and peer; the kernel picks them by binding port 0), with a data dir and a log file
under a temporary work dir that ``cleanup`` removes. ``start`` waits until the member
answers ``GET /health`` with ``{"health": "true"}``. ``stop`` sends SIGTERM (then SIGKILL
after a grace period) and ``kill9`` SIGKILL, each to the PID this object started and to
nothing else; ``restart`` starts it again on the same ports with the same data dir (so
revisions and leases survive, as after a crash or a reboot), or with a wiped data dir
(``wipe=True``: an etcd restored from nothing). ``EtcdCluster(n)`` is n such members that
form one raft cluster (``--initial-cluster``), for quorum tests; a member of it restarts
with ``--initial-cluster-state existing`` and rejoins with its data dir.

``tls=True`` makes the client URLs https with a throwaway CA, server and client
certificates made by the ``openssl`` command line (``client_cert_auth``: the member then
demands a client certificate signed by that CA), the way real deployments run etcd.

Imports no pytest; only the standard library.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ETCD_BINARY = "etcd"


def etcd_unavailable() -> str | None:
    """Why an etcd member cannot be started here, or None."""
    if shutil.which(ETCD_BINARY) is None:
        return "needs the etcd binary (Debian package etcd-server; scripts/setup.sh installs it)"
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made
    with ``openssl`` in ``directory``. Paths: ``ca``, ``server_cert``, ``server_key``,
    ``client_cert``, ``client_key``."""

    def __init__(self, directory: Path):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.ca, ca_key = d / "ca.pem", d / "ca-key.pem"
        self.server_cert, self.server_key = d / "server.pem", d / "server-key.pem"
        self.client_cert, self.client_key = d / "client.pem", d / "client-key.pem"
        ossl = shutil.which("openssl")
        if ossl is None:
            raise RuntimeError("tls=True needs the openssl command line (Debian package openssl)")

        def run(*args):
            r = subprocess.run([ossl, *map(str, args)], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"openssl {' '.join(map(str, args))} failed: {r.stderr.strip()}")

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=vswitch-test-ca",
            "-keyout", ca_key, "-out", self.ca)
        for cert, key, cn, ext in (
                (self.server_cert, self.server_key, "etcd-server",
                 "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"),
                (self.client_cert, self.client_key, "vswitch-client", "extendedKeyUsage=clientAuth\n")):
            csr, extfile = d / f"{cn}.csr", d / f"{cn}.ext"
            extfile.write_text(ext)
            run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", key, "-out", csr)
            run("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", ca_key, "-CAcreateserial",
                "-days", "2", "-extfile", extfile, "-out", cert)


class Etcd:
    """One etcd member on loopback; see the module docstring.

    ``Etcd()`` alone is a single-member cluster; ``EtcdCluster`` builds members that know
    each other through ``initial_cluster``.
    """

    def __init__(self, name: str = "m0", *, workdir: Path | None = None, tls: TlsFiles | None = None,
                 client_port: int | None = None, peer_port: int | None = None,
                 initial_cluster: str | None = None, cluster_token: str | None = None):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="vswitch-etcd-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.tls = tls
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.data_dir = self.workdir / f"{name}.data"
        self.log_path = self.workdir / f"{name}.log"
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_token = cluster_token or f"vswitch-{os.getpid()}-{self.client_port}"
        self.proc: subprocess.Popen | None = None
        self._started_once = False

    @property
    def url(self) -> str:
        """The client URL (the endpoint to give a client)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def _argv(self) -> list[str]:
        argv = [ETCD_BINARY, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster,
                "--initial-cluster-token", self.cluster_token,
                "--initial-cluster-state", "existing" if self._started_once else "new",
                # no v2 API, no metrics listener of its own; logs to our file
                "--enable-v2=false", "--logger", "zap", "--log-outputs", "stderr"]
        if self.tls:
            argv += ["--cert-file", str(self.tls.server_cert), "--key-file", str(self.tls.server_key),
                     "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth"]
        return argv

    def spawn(self) -> None:
        """Start the process without waiting for health (a cluster's members must all be
        started before any of them is healthy)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"etcd member {self.name} is already running (pid {self.proc.pid})")
        # A data dir that exists means this member was a member before: rejoin.
        self._started_once = self._started_once or self.data_dir.exists()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self._started_once = True

    def start(self, timeout_s: float = 15.0) -> "Etcd":
        self.spawn()
        self.wait_healthy(timeout_s)
        return self

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1.0, context=self._ssl_context()) as r:
                return json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd member {self.name} exited with {self.proc.returncode}: "
                                   f"{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.1)
        raise TimeoutError(f"etcd member {self.name} at {self.url} not healthy after {timeout_s} s: "
                           f"{self.log_tail()}")

    def log_tail(self, n_chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int, grace_s: float) -> None:
        if not self.running:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to our PID, SIGKILL if it is still alive after ``grace_s``."""
        self._signal(signal.SIGTERM, grace_s)

    def kill9(self) -> None:
        """SIGKILL to our PID (a crash: nothing is flushed beyond what etcd fsynced)."""
        self._signal(signal.SIGKILL, 10.0)

    def restart(self, *, wipe: bool = False, timeout_s: float = 15.0, wait: bool = True) -> "Etcd":
        """Stop if running, then start on the same ports; the data dir is kept unless ``wipe``
        (a single member only: a wiped cluster member cannot rejoin its cluster)."""
        self.stop()
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self._started_once = False
        self.spawn()
        if wait:
            self.wait_healthy(timeout_s)
        return self

    def cleanup(self) -> None:
        self.kill9()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Etcd":
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.cleanup()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


class EtcdCluster:
    """``n`` etcd members on loopback forming one cluster (3 for quorum tests).

    ``members[i]`` is an ``Etcd``; ``endpoints`` lists their client URLs.
    """

    def __init__(self, n: int = 3, *, tls: bool = False):
        if n < 1:
            raise ValueError(f"an etcd cluster needs at least 1 member, got n={n}")
        self.workdir = Path(tempfile.mkdtemp(prefix="vswitch-etcdc-"))
        self.tls = TlsFiles(self.workdir / "tls") if tls else None
        peer_ports = [free_port() for _ in range(n)]
        names = [f"m{i}" for i in range(n)]
        initial = ",".join(f"{nm}=http://127.0.0.1:{p}" for nm, p in zip(names, peer_ports))
        token = f"vswitch-{os.getpid()}-{peer_ports[0]}"
        self.members = [Etcd(nm, workdir=self.workdir, tls=self.tls, peer_port=p,
                             initial_cluster=initial, cluster_token=token)
                        for nm, p in zip(names, peer_ports)]

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    def start(self, timeout_s: float = 30.0) -> "EtcdCluster":
        for m in self.members:
            m.spawn()
        for m in self.members:
            m.wait_healthy(timeout_s)
        return self

    def cleanup(self) -> None:
        for m in self.members:
            m.kill9()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()
