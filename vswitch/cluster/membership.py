"""Cluster membership: this node's subnet lease and record in etcd, and the other nodes.

Theory of operation. Keys (``prefix`` defaults to ``/vswitch/``)::

    <prefix>subnets/<net>-<plen>  {"node": NAME}            one per leased node subnet
    <prefix>nodes/<NAME>          {"name", "node_ip", "vtep_mac", "pod_cidrs"}  (records.py)

all bound to the node's one etcd lease, so when a node stops renewing it (crash, partition)
etcd deletes its subnets and record after the TTL and every watcher sees the deletes.

Two daemon threads, so the caller (vswitchd's packet loop) never waits on etcd:

* the **lease thread** registers and then keeps the lease alive every TTL/3. Registering =
  grant a lease; for each family take the subnet the caller saved (``previous_subnets``) or,
  failing that, one the store already names as this node's, when it is free or ours
  (ours: replaced with a compare-``mod_revision`` transaction, which moves it to the new
  lease), else a random free one, each claimed by one create-if-absent transaction
  (compare ``create_revision == 0``) that a racing node loses cleanly: it re-reads and picks
  again; then put the record. A cluster CIDR with no free subnet is fatal (``ClusterFull``:
  the thread ends, ``on_fatal`` is called, ``wait_registered`` raises it). A keep-alive that
  says the lease is gone (it expired while this node was cut off, or etcd lost its data)
  registers again at once, the same subnets first.
* the **watch thread** lists ``<prefix>nodes/`` once, then watches it from the listed
  revision + 1, applying PUT/DELETE events to a table of peers; after a broken stream it
  resumes from the last revision it applied, re-lists when etcd says that revision was
  compacted, and re-lists when etcd's revision went backwards or its cluster id changed
  (an etcd restored from nothing). Every time the set of *other* nodes changes it calls
  ``on_peers(sorted list of Peer)``; a record that is not valid (records.py) is ignored
  and logged once per revision, and counted.

While etcd cannot be reached both threads retry with a capped backoff and nothing is
forgotten: the peer table stays as it was (fail static: forwarding goes on with the last
known peers), ``status()`` says ``connected: False`` and since when, and when etcd is back
the lease is renewed (or re-registered) and the watch resumes, without a restart. Callbacks
run on these threads: they must be quick and must not call ``close``.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import random
import threading
import time
from typing import Callable, Iterable

from vswitch.cluster import records, subnets
from vswitch.cluster.records import Peer
from vswitch.cluster.store import Compacted, Store, StoreError, Tls, WatchStream, parse_endpoints
from vswitch.cluster.subnets import ClusterFull, ClusterSpec

log = logging.getLogger("vswitch.cluster")

DEFAULT_PREFIX = "/vswitch/"
DEFAULT_LEASE_TTL_S = 10
_CLAIM_ATTEMPTS = 64


class MembershipError(Exception):
    """Registration cannot succeed as configured (fatal for this node)."""


class Membership:
    """This node's membership; see the module docstring. ``start()``, then ``close()``."""

    def __init__(self, *, cluster_cidrs, node_subnet_size, node_name: str, node_ip: str, vtep_mac: str,
                 etcd_endpoints, etcd_ca: str | None = None, etcd_cert: str | None = None,
                 etcd_key: str | None = None, prefix: str = DEFAULT_PREFIX,
                 lease_ttl_s: int = DEFAULT_LEASE_TTL_S, previous_subnets: Iterable[str] = (),
                 on_peers: Callable[[list[Peer]], None] | None = None,
                 on_subnets: Callable[[tuple[str, ...]], None] | None = None,
                 on_fatal: Callable[[Exception], None] | None = None,
                 request_timeout_s: float = 2.0, retry_max_s: float = 2.0):
        self.spec = ClusterSpec.parse(cluster_cidrs, node_subnet_size)
        self.node_name = records.check_node_name(node_name)
        self.node_ip = records.check_ip(node_ip)
        self.vtep_mac = records.check_mac(vtep_mac)
        if not isinstance(prefix, str) or not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} is not accepted: a key prefix beginning and ending with '/'")
        self.prefix = prefix
        if not isinstance(lease_ttl_s, int) or not 2 <= lease_ttl_s <= 3600:
            raise ValueError(f"lease_ttl_s {lease_ttl_s!r} is not accepted: whole seconds, 2..3600")
        self.lease_ttl_s = lease_ttl_s
        self._previous = {}
        for s in previous_subnets or ():
            try:
                net = ipaddress.ip_network(s, strict=True)
            except ValueError:
                log.warning("membership: ignoring saved subnet %r (not a CIDR)", s)
                continue
            self._previous[net.version] = net
        parse_endpoints(etcd_endpoints)             # errors now, not in a thread
        self._endpoints = etcd_endpoints
        self._tls = Tls(etcd_ca, etcd_cert, etcd_key)
        self._timeout_s = float(request_timeout_s)
        self._retry_max_s = float(retry_max_s)
        self.on_peers, self.on_subnets, self.on_fatal = on_peers, on_subnets, on_fatal

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._lease_wakeup = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch: WatchStream | None = None
        self._rng = random.Random()
        # state (read through status(); written by the two threads under _lock)
        self._lease_id = 0
        self._lease_ttl_left_s = 0
        self._subnets: tuple[str, ...] = ()
        self._lease_ok = False
        self._watch_ok = False
        self._connected = False
        self._since = time.time()
        self._last_revision = 0
        self._cluster_id: str | None = None
        self._last_error: str | None = None
        self._fatal: Exception | None = None
        self._registrations = 0
        self._rewrite_record = False               # our record was deleted by someone: put it again
        self._relist_wanted = False                # the lease vanished: etcd may have lost its data
        self._relists = 0
        self._ignored_records = 0
        self._ignored_seen: set[tuple[str, int]] = set()
        self._table: dict[str, Peer] = {}          # node name → record (others and ours)
        self._peers: tuple[Peer, ...] = ()          # last list given to on_peers

    # -- public ------------------------------------------------------------------------

    def start(self) -> "Membership":
        if self._threads:
            raise RuntimeError("membership already started")
        for name, target in (("lease", self._lease_loop), ("watch", self._watch_loop)):
            t = threading.Thread(target=target, name=f"vswitch-cluster-{name}-{self.node_name}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def wait_registered(self, timeout_s: float) -> tuple[str, ...]:
        """This node's leased subnets once registered; raises the fatal error if registration
        cannot succeed, ``TimeoutError`` (with the last etcd error) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self._registered.wait(0.05):
            if self._fatal is not None:
                raise self._fatal
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.node_name} not registered in etcd after {timeout_s} s; "
                                   f"last error: {self._last_error or 'none'}")
        return self.subnets

    @property
    def subnets(self) -> tuple[str, ...]:
        """The node subnets this node holds (IPv4 first): save them, pass them back next start."""
        return self._subnets

    @property
    def peers(self) -> list[Peer]:
        return list(self._peers)

    def status(self) -> dict:
        with self._lock:
            return {
                "node_name": self.node_name, "connected": self._connected, "since": self._since,
                "registered": self._registered.is_set(), "subnets": list(self._subnets),
                "lease_id": self._lease_id, "lease_ttl_s": self._lease_ttl_left_s,
                "last_revision": self._last_revision, "peers": len(self._peers),
                "registrations": self._registrations, "relists": self._relists,
                "ignored_records": self._ignored_records, "last_error": self._last_error,
                "fatal": str(self._fatal) if self._fatal else None,
            }

    def close(self, revoke: bool = True, timeout_s: float = 5.0) -> bool:
        """Stop both threads. ``revoke`` deletes this node's keys at once (a clean leave);
        without it the keys live until the lease's TTL runs out (as after a crash). Returns
        whether the lease was revoked."""
        self._stop.set()
        self._lease_wakeup.set()
        w = self._watch
        if w is not None:
            w.close()
        for t in self._threads:
            t.join(timeout_s)
        if revoke and self._lease_id:
            try:
                Store(self._endpoints, self._tls, self._timeout_s).revoke(self._lease_id)
                return True
            except StoreError as exc:
                log.warning("membership %s: lease revoke on leave failed (keys expire after the TTL): %s",
                            self.node_name, exc)
        return False

    def __enter__(self) -> "Membership":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- shared state ------------------------------------------------------------------

    def _set_health(self, *, lease_ok: bool | None = None, watch_ok: bool | None = None,
                    error: str | None = None) -> None:
        with self._lock:
            if lease_ok is not None:
                self._lease_ok = lease_ok
            if watch_ok is not None:
                self._watch_ok = watch_ok
            if error is not None:
                self._last_error = error
            connected = self._lease_ok and self._watch_ok
            if connected != self._connected:
                self._connected = connected
                self._since = time.time()
                changed = True
            else:
                changed = False
        if changed:
            if connected:
                log.info("membership %s: connected to etcd (revision %d)", self.node_name, self._last_revision)
            else:
                log.warning("membership %s: etcd unavailable, keeping the last %d known peers: %s",
                            self.node_name, len(self._peers), self._last_error)

    def _sleep(self, seconds: float, event: threading.Event | None = None) -> bool:
        """Wait; True if the membership is stopping."""
        (event or self._stop).wait(seconds)
        return self._stop.is_set()

    # -- the lease thread --------------------------------------------------------------

    def _lease_loop(self) -> None:
        store = Store(self._endpoints, self._tls, self._timeout_s)
        backoff_s = 0.1
        while not self._stop.is_set():
            try:
                if not self._lease_id:
                    self._register(store)
                elif self._rewrite_record:
                    self._rewrite_record = False
                    self._register(store, reuse_lease=True)
                else:
                    ttl = store.keepalive(self._lease_id)
                    if ttl <= 0:
                        log.warning("membership %s: lease %x is gone (expired or etcd lost it); "
                                    "registering again", self.node_name, self._lease_id)
                        with self._lock:
                            self._lease_id = 0
                            self._relist_wanted = True
                        w = self._watch
                        if w is not None:
                            w.close()
                        continue
                    with self._lock:
                        self._lease_ttl_left_s = ttl
                self._set_health(lease_ok=True)
                backoff_s = 0.1
                self._lease_wakeup.clear()
                if self._sleep(max(0.2, self.lease_ttl_s / 3.0), self._lease_wakeup):
                    return
            except ClusterFull as exc:
                fatal = MembershipError(f"node {self.node_name}: {exc}")
                with self._lock:
                    self._fatal = fatal
                    self._last_error = str(fatal)
                log.error("membership %s: %s", self.node_name, fatal)
                self._call(self.on_fatal, fatal)
                return
            except StoreError as exc:
                self._set_health(lease_ok=False, error=str(exc))
                w = self._watch          # the watch may hang on the same dead member: restart it
                if w is not None:
                    w.close()
                if self._sleep(backoff_s):
                    return
                backoff_s = min(self._retry_max_s, backoff_s * 2)
            except Exception as exc:     # a bug or an unexpected answer: log, keep the thread
                log.exception("membership %s: lease thread error", self.node_name)
                self._set_health(lease_ok=False, error=f"{type(exc).__name__}: {exc}")
                if self._sleep(self._retry_max_s):
                    return

    def _owner(self, kv: dict) -> str | None:
        try:
            obj = json.loads(kv["value"])
            return obj.get("node") if isinstance(obj, dict) else None
        except ValueError:
            return None

    def _register(self, store: Store, reuse_lease: bool = False) -> None:
        if reuse_lease and self._lease_id:
            lease_id = self._lease_id
        else:
            lease_id, ttl = store.grant(self.lease_ttl_s)
            with self._lock:
                self._lease_id = lease_id
                self._lease_ttl_left_s = ttl
        value = json.dumps({"node": self.node_name})
        claimed = []
        for fam in self.spec.families:
            claimed.append(str(self._claim(store, fam, lease_id, value)))
        record = Peer(self.node_name, self.node_ip, self.vtep_mac, records.check_cidrs(claimed))
        store.put(self.prefix + "nodes/" + self.node_name, record.to_json(), lease_id)
        with self._lock:
            self._subnets = tuple(claimed)
            self._registrations += 1
        for s in claimed:
            self._previous[ipaddress.ip_network(s).version] = ipaddress.ip_network(s)
        log.info("membership %s: registered with lease %x, subnets %s", self.node_name, lease_id,
                 ", ".join(claimed))
        self._registered.set()
        self._call(self.on_subnets, tuple(claimed))

    def _claim(self, store: Store, fam: subnets.FamilySpec, lease_id: int, value: str):
        base = self.prefix + "subnets/"
        for _ in range(_CLAIM_ATTEMPTS):
            _, kvs = store.range_prefix(base)
            held = {}
            for kv in kvs:
                net = subnets.parse_subnet_key(kv["key"][len(base):])
                if net is not None and fam.contains(net):
                    held[net] = kv
            ours = [n for n, kv in held.items() if self._owner(kv) == self.node_name]
            prev = self._previous.get(fam.family)
            if prev is None or not fam.contains(prev):
                prev = min(ours) if ours else None
            if prev is not None and prev in held and self._owner(held[prev]) == self.node_name:
                if store.replace(base + subnets.subnet_key(prev), value, lease_id, held[prev]["mod_revision"]):
                    return prev
                continue                            # it changed under us: look again
            taken = set(held)       # ours too: one not chosen above expires with its old lease
            cand = subnets.pick_free(fam, taken, prev, self._rng)
            if store.create(base + subnets.subnet_key(cand), value, lease_id):
                return cand
            log.info("membership %s: subnet %s was taken meanwhile, choosing again", self.node_name, cand)
        raise StoreError(f"could not claim a /{fam.node_prefix} subnet of {fam.cluster_cidr} in "
                         f"{_CLAIM_ATTEMPTS} attempts (every candidate was taken meanwhile)")

    # -- the watch thread --------------------------------------------------------------

    def _watch_loop(self) -> None:
        store = Store(self._endpoints, self._tls, self._timeout_s)
        base = self.prefix + "nodes/"
        need_list = True
        backoff_s = 0.1
        failures = 0            # in a row; the first one retries at once (another member may answer)
        while not self._stop.is_set():
            try:
                if self._relist_wanted:
                    self._relist_wanted = False
                    need_list = True
                if need_list:
                    rev, kvs = store.range_prefix(base)
                    table = {}
                    for kv in kvs:
                        p = self._parse(base, kv)
                        if p is not None:
                            table[p.name] = p
                    with self._lock:
                        self._table = table
                        self._last_revision = rev
                        self._cluster_id = store.cluster_id
                        self._relists += 1
                    self._publish()
                    need_list = False
                stream = store.watch(base, self._last_revision + 1)
                self._watch = stream
                if self._stop.is_set():
                    stream.close()
                    return
                for resp in stream:
                    if resp["created"]:
                        if resp["revision"] < self._last_revision or store.cluster_id != self._cluster_id:
                            log.warning("membership %s: etcd's revision went back (%d < %d) or its cluster "
                                        "changed; listing again", self.node_name, resp["revision"],
                                        self._last_revision)
                            need_list = True
                            stream.close()
                            break
                        self._set_health(watch_ok=True)
                        backoff_s, failures = 0.1, 0
                        continue
                    self._apply(base, resp)
                    if self._relist_wanted:
                        break
            except Compacted as exc:
                log.warning("membership %s: %s; listing again", self.node_name, exc)
                need_list = True
            except StoreError as exc:
                if self._stop.is_set():
                    return
                failures += 1
                if failures == 1:
                    continue
                self._set_health(watch_ok=False, error=str(exc))
                if self._sleep(backoff_s):
                    return
                backoff_s = min(self._retry_max_s, backoff_s * 2)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.exception("membership %s: watch thread error", self.node_name)
                self._set_health(watch_ok=False, error=f"{type(exc).__name__}: {exc}")
                need_list = True
                if self._sleep(self._retry_max_s):
                    return
            finally:
                self._watch = None

    def _parse(self, base: str, kv: dict) -> Peer | None:
        name = kv["key"][len(base):]
        try:
            return Peer.from_json(name, kv["value"], lease_id=kv["lease"], mod_revision=kv["mod_revision"])
        except ValueError as exc:
            tag = (kv["key"], kv["mod_revision"])
            with self._lock:
                new = tag not in self._ignored_seen
                if new:
                    self._ignored_seen.add(tag)
                    self._ignored_records += 1
            if new:
                log.warning("membership %s: ignoring record %s (revision %d): %s", self.node_name,
                            kv["key"], kv["mod_revision"], exc)
            return None

    def _apply(self, base: str, resp: dict) -> None:
        with self._lock:
            table = dict(self._table)
        last = self._last_revision
        for ev in resp["events"]:
            name = ev["key"][len(base):]
            if ev["type"] == "DELETE":
                table.pop(name, None)
                if name == self.node_name and not self._stop.is_set():
                    log.warning("membership %s: our record was deleted; writing it again", self.node_name)
                    self._rewrite_record = True
                    self._lease_wakeup.set()
            else:
                p = self._parse(base, ev)
                if p is None:
                    table.pop(name, None)
                else:
                    table[name] = p
            last = max(last, ev["mod_revision"])
        if not resp["events"]:                   # a progress notification: nothing is pending
            last = max(last, resp["revision"])
        with self._lock:
            self._table = table
            self._last_revision = last
        self._publish()

    def _publish(self) -> None:
        with self._lock:
            peers = tuple(sorted(p for n, p in self._table.items() if n != self.node_name))
            if peers == self._peers:
                return
            self._peers = peers
        self._call(self.on_peers, list(peers))

    def _call(self, fn, arg) -> None:
        if fn is None:
            return
        try:
            fn(arg)
        except Exception:
            log.exception("membership %s: callback %r failed", self.node_name, fn)
