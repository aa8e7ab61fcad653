"""etcd v3 access for the membership: endpoints, failover, the few calls it needs, a watch.

Theory of operation: the client is **etcd3gw** (OpenStack's client of etcd's v3 JSON
gateway, which every etcd ≥ 3.4 serves on its client port). It was chosen over the others
on PyPI because it is maintained (2.7.0, 2026), speaks TLS with a CA and a client
certificate, and has leases (grant, keep-alive, revoke), transactions (its ``create`` is
the compare-``create_revision == 0`` transaction) and watches from a start revision; it is
plain HTTP/JSON over ``requests``, so it depends on no generated protobuf code and cannot
break with the protobuf/grpcio versions installed for other extras. The others: ``etcd3``
(python-etcd3) had its last release in 2020 and its generated code does not load with
protobuf ≥ 4; ``aetcd`` (asyncio, gRPC) opens only insecure channels (no TLS).

One ``Store`` serves one thread (``requests`` sessions are not shared between threads). It
holds one ``etcd3gw.Etcd3Client`` per endpoint URL and uses the current one until a call
fails with a connection error, a timeout or a 5xx; then it moves to the next endpoint and
retries, so one dead member of a three-member cluster costs one failed attempt, not an
outage. A new endpoint is checked before use: its ``/version`` must name an etcd server
(a plain TCP listener or another HTTP service on the port gives a clear ``StoreError``
saying so). When every endpoint failed, ``StoreUnavailable`` carries each one's error.

The watch stream is read here rather than through etcd3gw's ``Watcher``: that one skips
the responses that say a watch was cancelled because its start revision was compacted,
and the membership must see them to re-list. ``WatchStream`` posts the same create
request on the client's own session (TLS, API path) and yields every response; a
cancelled watch raises ``Compacted`` (with etcd's compact revision) or ``StoreError``.
``close`` from another thread shuts the socket down so a blocked read returns at once.
Keys and values travel base64-encoded in the gateway's JSON, as the gateway requires, and
lease ids (int64) as decimal strings: the gateway reads a JSON number through a float, and a
lease id above 2**53 then names another lease ("requested lease not found").
"""
from __future__ import annotations

import base64
import json
import os
import socket
import urllib.parse

import requests

import etcd3gw
from etcd3gw import exceptions as gw_exc


class StoreError(Exception):
    """etcd answered, but not as a working etcd v3 would (or the endpoint is not etcd)."""


class StoreUnavailable(StoreError):
    """No endpoint could be reached (or none had a quorum)."""


class Compacted(StoreError):
    """A watch's start revision was compacted away; re-list from scratch."""

    def __init__(self, compact_revision: int):
        super().__init__(f"watch start revision compacted (etcd's compact revision is {compact_revision})")
        self.compact_revision = compact_revision


def b64(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode("ascii")


def unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


def prefix_range_end(prefix: str) -> str:
    """The exclusive end key of all keys starting with ``prefix`` (base64), as etcdctl does."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return b64(bytes(raw))


def parse_endpoints(endpoints) -> list[tuple[str, str, int]]:
    """``"http://10.0.0.1:2379,https://[fd00::1]:2379"`` (or a list) → [(scheme, host, port)]."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = []
    for raw in (str(i).strip() for i in items):
        if not raw:
            continue
        u = urllib.parse.urlsplit(raw)
        try:
            port = u.port
        except ValueError:
            port = None
        if u.scheme not in ("http", "https") or not u.hostname or port is None or u.path not in ("", "/"):
            raise ValueError(f"etcd endpoint {raw!r} is not accepted: give a URL like "
                             f"http://127.0.0.1:2379 or https://etcd-0.example:2379 (scheme, host, port)")
        out.append((u.scheme, u.hostname, port))
    if not out:
        raise ValueError(f"no etcd endpoint given ({endpoints!r}); accepted is a comma-separated list of URLs")
    return out


class Tls:
    """CA bundle, client certificate and key files for https endpoints (each optional)."""

    def __init__(self, ca: str | None = None, cert: str | None = None, key: str | None = None):
        for what, path in (("CA", ca), ("client certificate", cert), ("client key", key)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"etcd TLS {what} file {path!r} does not exist or is not a file")
        if (cert is None) != (key is None):
            raise ValueError("etcd TLS needs both a client certificate and its key, or neither "
                             f"(got cert={cert!r}, key={key!r})")
        self.ca, self.cert, self.key = ca, cert, key


_DOWN = (gw_exc.ConnectionFailedError, gw_exc.ConnectionTimeoutError, gw_exc.InternalServerError,
         requests.exceptions.RequestException)


class Store:
    def __init__(self, endpoints, tls: Tls | None = None, timeout_s: float = 2.0):
        self.endpoints = parse_endpoints(endpoints)
        self.tls = tls or Tls()
        self.timeout_s = float(timeout_s)
        self._clients: dict[int, etcd3gw.Etcd3Client] = {}
        self.index = 0
        self.cluster_id: str | None = None

    def url(self, i: int | None = None) -> str:
        scheme, host, port = self.endpoints[self.index if i is None else i]
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}"

    def _client(self, i: int) -> etcd3gw.Etcd3Client:
        c = self._clients.get(i)
        if c is None:
            scheme, host, port = self.endpoints[i]
            # Our own session: the environment must not override the configured CA (requests
            # lets REQUESTS_CA_BUNDLE win over session.verify) nor send etcd through a proxy.
            session = requests.Session()
            session.trust_env = False
            if self.tls.ca:
                session.verify = self.tls.ca
            if self.tls.cert:
                session.cert = (self.tls.cert, self.tls.key)
            c = etcd3gw.Etcd3Client(host=host, port=port, protocol=scheme, session=session,
                                    timeout=self.timeout_s, api_path=None)
            try:
                c.api_path          # GET /version: is this etcd, and which gateway path
            except gw_exc.ApiVersionDiscoveryFailedError as exc:
                raise StoreError(f"endpoint {self.url(i)} is not an etcd v3 server: "
                                 f"GET /version answered {exc.detail_text!r}") from None
            except gw_exc.Etcd3Exception as exc:
                if isinstance(exc, _DOWN):
                    raise
                raise StoreError(f"endpoint {self.url(i)} is not an etcd v3 server: GET /version "
                                 f"answered {(exc.detail_text or '')[:200]!r}") from None
            except (ValueError, requests.exceptions.RequestException) as exc:
                raise StoreError(f"endpoint {self.url(i)} is not an etcd v3 server: GET /version "
                                 f"failed: {type(exc).__name__}: {str(exc)[:200]}") from None
            self._clients[i] = c
        return c

    def call(self, fn):
        """``fn(client)`` on the current endpoint, moving on through the others on failure."""
        errors = []
        n = len(self.endpoints)
        for attempt in range(n):
            i = (self.index + attempt) % n
            try:
                result = fn(self._client(i))
            except (StoreError, *_DOWN) as exc:
                self._clients.pop(i, None)
                errors.append(f"{self.url(i)}: {_describe(exc)}")
                continue
            self.index = i
            return result
        self.index = (self.index + 1) % n
        raise StoreUnavailable("no etcd endpoint answered: " + "; ".join(errors))

    # -- the calls the membership uses -------------------------------------------------

    def _post(self, c: etcd3gw.Etcd3Client, path: str, body: dict) -> dict:
        try:
            result = c.post(c.get_url(path), json=body)
        except gw_exc.Etcd3Exception as exc:
            if isinstance(exc, _DOWN):
                raise
            raise StoreError(f"etcd refused {path}: {(exc.detail_text or str(exc))[:300]}") from None
        except ValueError as exc:          # a body that is not JSON
            raise StoreError(f"etcd answered {path} with something that is not JSON: {exc}") from None
        if not isinstance(result, dict):
            raise StoreError(f"etcd answered {path} with {type(result).__name__}, not a JSON object")
        cid = result.get("header", {}).get("cluster_id")
        if cid is not None:
            self.cluster_id = str(cid)
        return result

    def grant(self, ttl_s: int) -> tuple[int, int]:
        r = self.call(lambda c: self._post(c, "/lease/grant", {"TTL": int(ttl_s), "ID": 0}))
        if r.get("error"):
            raise StoreError(f"etcd refused a lease of {ttl_s} s: {r['error']}")
        return int(r["ID"]), int(r.get("TTL", ttl_s))

    def keepalive(self, lease_id: int) -> int:
        """The lease's new TTL in seconds, or -1 if the lease no longer exists."""
        r = self.call(lambda c: self._post(c, "/lease/keepalive", {"ID": str(lease_id)}))
        return int(r.get("result", {}).get("TTL", -1))

    def revoke(self, lease_id: int) -> None:
        try:
            self.call(lambda c: self._post(c, "/lease/revoke", {"ID": str(lease_id)}))
        except StoreError as exc:
            if "not found" not in str(exc):
                raise

    def range_prefix(self, prefix: str) -> tuple[int, list[dict]]:
        """(header revision, [{key, value, lease, mod_revision, create_revision}]) under prefix."""
        r = self.call(lambda c: self._post(c, "/kv/range", {"key": b64(prefix),
                                                             "range_end": prefix_range_end(prefix)}))
        rev = int(r.get("header", {}).get("revision", 0))
        return rev, [_kv(kv) for kv in r.get("kvs", [])]

    def get(self, key: str) -> dict | None:
        r = self.call(lambda c: self._post(c, "/kv/range", {"key": b64(key)}))
        kvs = r.get("kvs", [])
        return _kv(kvs[0]) if kvs else None

    def txn(self, compare: list, success: list, failure: list | None = None) -> bool:
        body = {"compare": compare, "success": success, "failure": failure or []}
        r = self.call(lambda c: self._post(c, "/kv/txn", body))
        return bool(r.get("succeeded", False))

    def create(self, key: str, value: bytes | str, lease_id: int) -> bool:
        """Put ``key`` only if it does not exist (create_revision == 0): True if created."""
        return self.txn([{"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}],
                        [{"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease_id)}}])

    def replace(self, key: str, value: bytes | str, lease_id: int, mod_revision: int) -> bool:
        """Put ``key`` only if it was last modified at ``mod_revision``: True if replaced."""
        return self.txn([{"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(mod_revision)}],
                        [{"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease_id)}}])

    def put(self, key: str, value: bytes | str, lease_id: int = 0) -> None:
        body = {"key": b64(key), "value": b64(value)}
        if lease_id:
            body["lease"] = str(lease_id)  # int64 as a string: JSON numbers lose precision in the gateway
        self.call(lambda c: self._post(c, "/kv/put", body))

    def delete(self, key: str) -> None:
        self.call(lambda c: self._post(c, "/kv/deleterange", {"key": b64(key)}))

    def compact(self, revision: int) -> None:
        self.call(lambda c: self._post(c, "/kv/compaction", {"revision": revision, "physical": True}))

    def watch(self, prefix: str, start_revision: int) -> "WatchStream":
        return self.call(lambda c: WatchStream(self, c, prefix, start_revision))


def _kv(kv: dict) -> dict:
    return {"key": unb64(kv.get("key")).decode("utf-8", "replace"), "value": unb64(kv.get("value")),
            "lease": int(kv.get("lease", 0)), "mod_revision": int(kv.get("mod_revision", 0)),
            "create_revision": int(kv.get("create_revision", 0))}


def _describe(exc: Exception) -> str:
    if isinstance(exc, gw_exc.Etcd3Exception):
        text = exc.detail_text or str(exc) or type(exc).__name__
        return f"{type(exc).__name__}: {text[:200]}"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


class WatchStream:
    """One watch on a prefix from ``start_revision``; iterate for responses (dicts with
    ``revision`` and ``events``: [{type: PUT|DELETE, key, value, lease, mod_revision}])."""

    def __init__(self, store: Store, client: etcd3gw.Etcd3Client, prefix: str, start_revision: int):
        self.url = client.base_url
        body = {"create_request": {"key": b64(prefix), "range_end": prefix_range_end(prefix),
                                   "start_revision": int(start_revision), "progress_notify": True}}
        try:
            # connect timeout as for every call; reads may wait long (an idle prefix), and
            # ``close`` or the caller's health checks end a stuck read.
            self._resp = client.session.post(client.get_url("/watch"), json=body, stream=True,
                                             timeout=(store.timeout_s, 300))
        except requests.exceptions.Timeout as exc:
            raise gw_exc.ConnectionTimeoutError(str(exc)) from None
        except requests.exceptions.ConnectionError as exc:
            raise gw_exc.ConnectionFailedError(str(exc)) from None
        if self._resp.status_code != 200:
            text = self._resp.text[:300]
            self._resp.close()
            if self._resp.status_code >= 500 or self._resp.status_code == 408:
                raise gw_exc.ConnectionFailedError(text)     # etcd shutting down or without quorum
            raise StoreError(f"etcd refused a watch: HTTP {self._resp.status_code} {text!r}")
        self._lines = self._resp.iter_lines(chunk_size=None)
        self.closed = False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            try:
                line = next(self._lines)
            except StopIteration:
                raise StoreUnavailable(f"watch stream from {self.url} ended") from None
            except (requests.exceptions.RequestException, OSError, ValueError) as exc:
                raise StoreUnavailable(f"watch stream from {self.url} failed: {_describe(exc)}") from None
            except AttributeError:
                if not self.closed:         # http.client after close() from another thread
                    raise
                raise StoreUnavailable(f"watch stream from {self.url} closed") from None
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise StoreError(f"watch stream from {self.url} sent something that is not JSON: "
                                 f"{line[:200]!r}") from None
            if "error" in msg:
                err = msg["error"]
                raise StoreUnavailable(f"watch stream from {self.url} failed: "
                                       f"{err.get('message', err) if isinstance(err, dict) else err}")
            res = msg.get("result", {})
            if res.get("canceled"):
                cr = int(res.get("compact_revision", 0) or 0)
                if cr:
                    raise Compacted(cr)
                raise StoreError(f"etcd cancelled the watch: {res.get('cancel_reason', 'no reason given')}")
            if res.get("compact_revision"):
                raise Compacted(int(res["compact_revision"]))
            events = [{"type": ev.get("type", "PUT"), **_kv(ev.get("kv", {}))} for ev in res.get("events", [])]
            return {"revision": int(res.get("header", {}).get("revision", 0)), "events": events,
                    "created": bool(res.get("created"))}

    def close(self) -> None:
        """End the stream (from any thread): a read blocked in ``__next__`` returns at once."""
        if self.closed:
            return
        self.closed = True
        try:
            fd = self._resp.raw._fp.fileno()
            s = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.shutdown(socket.SHUT_RDWR)
            finally:
                s.close()
        except Exception:   # already closed or never connected: nothing to end
            pass
        try:
            self._resp.close()
        except Exception:
            pass
