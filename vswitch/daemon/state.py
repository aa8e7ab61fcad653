"""The daemon's state: what it holds in memory, and the file that survives a restart.

Theory of operation
-------------------
``STATE_DIR/state.json`` holds one JSON object: ``version``, ``host`` (the host port's
name, MAC and gateway addresses), ``uplink`` (the NIC's original addresses, gateway
routes and sysctls, or null), ``attachments`` (every attachment record with its
switch port id) and, in cluster mode, ``cluster`` (the node's leased subnets). In memory, ``State.data`` is that object and ``State.attachments`` maps
(container id, ifname) to the live records; a snapshot puts the live records into the
object.

Writes are atomic: the bytes go to ``state.json.tmp``, which is fsynced, renamed over
``state.json``, and the directory is fsynced, so a crash leaves the old file or the new
one, never a mix. An operation takes the snapshot on the loop thread and hands the write
to the kernel thread (``job()``), which does it before the operation replies; attach and
detach hand it to their group-commit writer instead (``vswitch.daemon.pods.StateWriter``).
Writes from several threads take turns (a lock), and each snapshot is numbered: one older
than the snapshot already on disk is not written, since the newer one holds its changes.

Until the daemon has re-adopted the saved attachments at start (``adopted``), a
snapshot keeps the saved ones as they were: a write during start-up (the uplink saves
the NIC's addresses before it moves them) must not drop pods not yet re-adopted.
"""
from __future__ import annotations

import json
import os
import threading

from vswitch.daemon.attachment import public

STATE_VERSION = 1


class State:
    def __init__(self, state_dir: str):
        self.dir = state_dir
        self.path = os.path.join(state_dir, "state.json")
        self.data = {"version": STATE_VERSION, "host": {}, "uplink": None, "attachments": []}
        self.attachments: dict[tuple, dict] = {}    # (container id, ifname) -> record
        self.adopted = False      # the saved attachments were re-adopted (safe to rewrite them)
        self.seq = 0              # snapshots taken (loop thread); the last one's number
        self._written_seq = 0     # the number of the snapshot on disk
        self._write_lock = threading.Lock()

    @property
    def host(self) -> dict:
        """The host port's entry: ``name``, ``mac``, ``gateways`` (``gw/prefixlen``)."""
        return self.data.setdefault("host", {})

    @property
    def uplink(self) -> dict | None:
        """The uplink's saved originals (``name``, ``addresses``, ``routes``, ``sysctl``)."""
        return self.data.get("uplink")

    @uplink.setter
    def uplink(self, saved: dict | None):
        self.data["uplink"] = saved

    @property
    def cluster(self) -> dict | None:
        """Cluster mode's lease (``node_name``, ``cluster_cidrs``, ``subnets``), kept so a
        restarted daemon re-claims the same subnets (``vswitch.daemon.cluster``)."""
        return self.data.get("cluster")

    @cluster.setter
    def cluster(self, lease: dict | None):
        self.data["cluster"] = lease

    def saved_attachments(self) -> list[dict]:
        """The attachment records of the file read at start (to re-adopt)."""
        return self.data.get("attachments", [])

    def load(self):
        """Read the file if there is one; an unknown format stops the daemon."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        try:
            with open(self.path) as f:
                st = json.load(f)
        except FileNotFoundError:
            return
        if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
            raise SystemExit(f"vswitchd: state file {self.path} has an unknown format; "
                             f"move it away to start empty")
        self.data = st

    def snapshot(self) -> bytes:
        """The state as it is now (taken on the loop thread; written by the kernel thread)."""
        if self.adopted:
            self.data["attachments"] = [public(a) for a in self.attachments.values()]
        self.seq += 1
        # compact: the C encoder (indent would run json's Python encoder, ~5 ms at 50 pods
        # on the loop thread for every attach and detach; `jq .` shows it indented)
        return json.dumps(self.data, sort_keys=True).encode()

    def save(self):
        data = self.snapshot()
        self.write(data, self.seq)

    def job(self):
        """A kernel job writing the state as it is now (for ``yield`` in an operation)."""
        data = self.snapshot()
        return (self.write, data, self.seq)

    def write(self, data: bytes, seq: int | None = None):
        """Write ``data`` (snapshot number ``seq``) unless a newer snapshot is on disk."""
        with self._write_lock:
            if seq is not None and seq <= self._written_seq:
                return
            self._write(data)
            if seq is not None:
                self._written_seq = seq

    def _write(self, data: bytes):
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def remove(self):
        """No attachment left: no file either."""
        for path in (self.path, self.path + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
