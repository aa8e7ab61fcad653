"""Delegation to the IPAM plugin named in ``ipam.type``, found in CNI_PATH.

Theory of operation: as libcni's ``invoke`` does, the IPAM binary runs with the same
environment (CNI_COMMAND set to the delegated command) and the same stdin the plugin
received; its stdout is the result or an error object, its stderr is passed through to
ours. An IPAM error is relayed with its own code, the message prefixed with the plugin's
name.

Version negotiation: Debian 12's host-local speaks at most 1.0.0, while our configs may
say 1.1.0. When the IPAM plugin answers code 1 (incompatible version) to ADD, CHECK or
DEL, the plugin asks it for VERSION, rewrites ``cniVersion`` in the stdin to the highest
version both support that is not newer than the requested one, and runs it again. GC and
STATUS exist only from 1.1.0; older plugins answer them with unrelated errors, so the
plugin asks VERSION first, and an IPAM plugin without 1.1.0 raises :class:`Unsupported`
and the caller decides (plugin.py: GC falls back to IPAM DEL per removed attachment,
STATUS treats it as ready).

``usePodCidr``: in cluster mode the node's pod subnet is leased from etcd by vswitchd, so
a configuration may say ``"subnet": "usePodCidr"`` (the spelling of Kubernetes'
network-plugin page) at the top of ``ipam`` or in ``ranges`` entries; host-local knows no
such value. The plugin asks the daemon (``pod_cidr`` op) and ``with_pod_cidrs`` rewrites a
copy of the configuration with the leased subnet(s) before host-local sees it. With no
lease (yet), ADD and CHECK fail with code 11 (try again later); DEL and GC still release
(host-local frees by container ID whatever the ranges): they use documentation prefixes
as placeholders when the daemon cannot say (``PLACEHOLDER_SUBNETS``).

Running the IPAM plugin (``_run``) costs no import of ``subprocess`` (3-4 ms of every
pod's start, through ``threading``, ``signal``'s enums, ``selectors``, ``contextlib``): the
binary is started with ``os.posix_spawn`` on three pipes, as ``subprocess.run`` would start
it (stdin, stdout and stderr are pipes, every other descriptor of ours is closed at exec,
SIGPIPE and SIGXFSZ back to their defaults), and ``select.poll`` feeds its stdin and
drains its stdout and stderr together, so neither side blocks on a full pipe.
"""
import os
import sys

from vswitch import fastjson

from .conf import SUPPORTED_VERSIONS, version_tuple
from .errors import CniError, INCOMPATIBLE_VERSION, INVALID_CONFIG, IPAM_FAILED, IPAM_NOT_FOUND


USE_POD_CIDR = "usePodCidr"
# DEL and GC without a lease to resolve: host-local releases by container ID and ifname,
# whatever the ranges say, but parses them first, so any valid subnet of the family will
# do: the documentation prefixes (RFC 5737, RFC 3849).
PLACEHOLDER_SUBNETS = ("192.0.2.0/24", "2001:db8::/64")


def uses_pod_cidr(stdin_obj):
    """Whether ``ipam`` asks for the node's leased subnet(s): ``"subnet": "usePodCidr"``
    at its top or in any ``ranges`` entry."""
    ipam = stdin_obj.get("ipam")
    if not isinstance(ipam, dict):
        return False
    if ipam.get("subnet") == USE_POD_CIDR:
        return True
    for rs in ipam.get("ranges") or ():
        if isinstance(rs, list) and any(isinstance(r, dict) and r.get("subnet") == USE_POD_CIDR for r in rs):
            return True
    return False


def with_pod_cidrs(stdin_obj, pod_cidrs):
    """A copy of ``stdin_obj`` whose ``usePodCidr`` subnets are the node's leased subnets
    ``pod_cidrs`` (IPv4 first, as the daemon's ``pod_cidr`` op gives them).

    - top-level ``"subnet": "usePodCidr"`` (the Kubernetes spelling): one range set per
      leased subnet (dual stack: both families), put before any ``ranges``; a top-level
      ``rangeStart``/``rangeEnd``/``gateway`` goes into the range of its family;
    - each ``ranges`` entry with ``"subnet": "usePodCidr"``: the first such range set takes
      the first leased subnet, the next the next one (``ranges: [[usePodCidr], [usePodCidr]]``
      is dual stack); more of them than leased subnets is an invalid configuration.
    """
    ipam = dict(stdin_obj["ipam"])
    leased = list(pod_cidrs)
    ranges = [list(rs) if isinstance(rs, list) else rs for rs in ipam.get("ranges") or []]
    top = []
    if ipam.get("subnet") == USE_POD_CIDR:
        extra = {k: ipam.pop(k) for k in ("rangeStart", "rangeEnd", "gateway") if k in ipam}
        ipam.pop("subnet")
        for cidr in leased:
            rng = {"subnet": cidr}
            for k, v in extra.items():
                if isinstance(v, str) and (":" in v) == (":" in cidr):
                    rng[k] = v
            top.append([rng])
        leased_iter = iter(())
    else:
        leased_iter = iter(leased)
    used = 0
    for i, rs in enumerate(ranges):
        if not isinstance(rs, list):
            continue
        for j, r in enumerate(rs):
            if isinstance(r, dict) and r.get("subnet") == USE_POD_CIDR:
                cidr = next(leased_iter, None)
                used += 1
                if cidr is None:
                    raise CniError(INVALID_CONFIG,
                                   f"ipam.ranges has {used} or more \"subnet\": \"{USE_POD_CIDR}\" "
                                   f"entries but the node leases {len(leased)} subnet(s) ({', '.join(leased)})",
                                   "give one usePodCidr range set per family of the cluster CIDR")
                rs[j] = dict(r, subnet=cidr)
    if top or ranges:
        ipam["ranges"] = top + ranges
    return dict(stdin_obj, ipam=ipam)


class Unsupported(Exception):
    """The IPAM plugin does not implement this command at any version we can use."""


def find_plugin(plugin_type, path_dirs):
    """The executable ``plugin_type`` in the first CNI_PATH directory holding it."""
    for d in path_dirs:
        candidate = os.path.join(d, plugin_type)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise not_found(plugin_type, path_dirs)


def not_found(plugin_type, path_dirs):
    """The error of an IPAM plugin that no CNI_PATH directory holds (code 20)."""
    return CniError(IPAM_NOT_FOUND, f"IPAM plugin {plugin_type!r} not found in CNI_PATH "
                    f"{os.pathsep.join(path_dirs)!r}",
                    "install it (Debian: containernetworking-plugins, in /usr/lib/cni) or "
                    "fix ipam.type")


_SIGNALS_TO_DEFAULT = (13, 25)     # SIGPIPE, SIGXFSZ (Python ignores them; subprocess restores them)


def _close_others_at_exec():
    """Mark every descriptor above 2 close-on-exec (subprocess's close_fds): the IPAM
    plugin gets its three pipes and nothing the runtime or we held."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in fds:
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass                    # the listing's own descriptor, closed meanwhile


def _spawn(exe, env, stdin):
    """Run ``exe`` with ``stdin`` (bytes) on its stdin; returns (exit code, stdout, stderr).
    The exit code is negative (-signal) when a signal ended it, as subprocess reports it."""
    import select
    pipes = []
    try:
        in_r, in_w = os.pipe()
        pipes += [in_r, in_w]
        out_r, out_w = os.pipe()
        pipes += [out_r, out_w]
        err_r, err_w = os.pipe()
        pipes += [err_r, err_w]
        _close_others_at_exec()
        pid = os.posix_spawn(exe, [exe], env, file_actions=[
            (os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
            (os.POSIX_SPAWN_DUP2, err_w, 2)], setsigdef=_SIGNALS_TO_DEFAULT)
    except BaseException:
        for fd in pipes:
            os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    out, err = bytearray(), bytearray()
    todo = {out_r: out, err_r: err}
    data = memoryview(stdin)
    poll = select.poll()
    for fd in todo:
        poll.register(fd, select.POLLIN)
    if data:
        os.set_blocking(in_w, False)
        poll.register(in_w, select.POLLOUT)
    else:
        os.close(in_w)
        in_w = -1
    try:
        while todo or in_w >= 0:
            for fd, ev in poll.poll():
                if fd == in_w:
                    try:
                        data = data[os.write(in_w, data[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:     # it stopped reading: what it printed counts
                        data = data[:0]
                    if not data:
                        poll.unregister(in_w)
                        os.close(in_w)
                        in_w = -1
                    continue
                chunk = os.read(fd, 65536)
                if chunk:
                    todo[fd] += chunk
                else:
                    poll.unregister(fd)
                    os.close(fd)
                    del todo[fd]
    finally:
        for fd in [in_w, *todo]:
            if fd >= 0:
                os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), bytes(out), bytes(err)


def _run(exe, env, stdin):
    """Run ``exe``: (exit code, stdout, stderr); CniError 999 when it cannot start."""
    try:
        if hasattr(os, "posix_spawn"):
            return _spawn(exe, env, stdin)
        import subprocess               # pragma: no cover - Linux has posix_spawn
        proc = subprocess.run([exe], input=stdin, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, check=False)
        return proc.returncode, proc.stdout, proc.stderr
    except OSError as exc:
        raise CniError(IPAM_FAILED, f"cannot run IPAM plugin {exe}: {exc.strerror or exc}")


class LocalIo:
    """The invocation's outside world when the plugin runs as its own process: stdout,
    stderr, IPAM plugins executed here. ``vswitch.daemon.cniexec`` has the other one,
    where the thin client (cni/client.c) does these for the plugin run by vswitchd."""
    own_netns = "/proc/self/ns/net"     # the runtime's namespace (a pod must not use it)

    def out(self, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def err(self, text):
        sys.stderr.write(text)
        sys.stderr.flush()

    def run_plugin(self, plugin_type, path_dirs, env, stdin):
        """Run the plugin ``plugin_type`` found in ``path_dirs``: (exit code, stdout); its
        stderr is passed through to ours. CniError 20 when no directory holds it."""
        rc, out, err = _run(find_plugin(plugin_type, path_dirs), env, stdin)
        if err:
            sys.stderr.buffer.write(err)
            sys.stderr.flush()
        return rc, out


LOCAL_IO = LocalIo()


def _parse_output(name, command, rc, out):
    text = out.strip()
    obj = None
    if text:
        try:
            obj = fastjson.loads(text)
        except ValueError:
            err = CniError(IPAM_FAILED, f"IPAM plugin {name} {command} printed no JSON "
                           f"(exit {rc}): {text[:200]!r}")
            err.exit_ok = rc == 0   # it may have allocated: the caller releases
            raise err from None
    if rc != 0:
        if isinstance(obj, dict) and "code" in obj:
            return CniError(int(obj.get("code") or IPAM_FAILED),
                            f"IPAM plugin {name} {command}: {obj.get('msg', '')}",
                            str(obj.get("details") or ""))
        raise CniError(IPAM_FAILED, f"IPAM plugin {name} {command} failed with exit {rc}"
                       + (f": {text[:200]!r}" if text else " and no error JSON"))
    return obj


class Ipam:
    """One IPAM plugin for one invocation: ``ipam.type``, CNI_PATH, environment, stdin."""

    def __init__(self, plugin_type, path_dirs, environ, stdin_obj, stdin_raw=None, io=LOCAL_IO):
        self.type = plugin_type
        self.path_dirs = path_dirs
        self.environ = environ
        self.stdin_obj = stdin_obj
        self.io = io
        self._version = stdin_obj.get("cniVersion")
        self._stdin = stdin_raw  # passed through unchanged until a version rewrite

    def _stdin_bytes(self):
        if self._stdin is None:
            obj = self.stdin_obj
            if obj.get("cniVersion") != self._version:
                obj = dict(obj, cniVersion=self._version)
            self._stdin = fastjson.dumps(obj).encode()
        return self._stdin

    def _env(self, command, overrides):
        env = dict(self.environ)
        env["CNI_COMMAND"] = command
        for k, v in (overrides or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def supported_versions(self):
        """The IPAM plugin's VERSION answer (an empty list when it gives none)."""
        rc, out = self.io.run_plugin(self.type, self.path_dirs, self._env("VERSION", None), b"")
        try:
            versions = fastjson.loads(out).get("supportedVersions") or []
        except (ValueError, AttributeError):
            return []
        return [v for v in versions if isinstance(v, str)]

    def _negotiate(self):
        """Pick the highest version both speak, not above the requested one; False if none."""
        theirs = self.supported_versions()
        want = version_tuple(self.stdin_obj.get("cniVersion"))
        common = [v for v in SUPPORTED_VERSIONS if v in theirs and version_tuple(v) <= want]
        if not common or common[-1] == self._version:
            return False
        self._version = common[-1]
        self._stdin = None
        return True

    def call(self, command, env_overrides=None):
        """Run ``command``; the parsed stdout (None when empty) or :class:`CniError`."""
        if command in ("GC", "STATUS") and self._version not in self.supported_versions():
            # plugins older than 1.1.0 do not know these commands and answer them with
            # unrelated errors ("missing containerID"): ask first
            raise Unsupported(f"IPAM plugin {self.type} does not support {command} "
                              f"(cniVersion {self._version} is not in its VERSION list)")
        for attempt in range(2):
            rc, out = self.io.run_plugin(self.type, self.path_dirs, self._env(command, env_overrides),
                                         self._stdin_bytes())
            result = _parse_output(self.type, command, rc, out)
            if not isinstance(result, CniError):
                return result
            if result.code != INCOMPATIBLE_VERSION or attempt:
                raise result
            if command in ("GC", "STATUS"):
                raise Unsupported(f"IPAM plugin {self.type} does not support {command} "
                                  f"at cniVersion {self._version}: {result.msg}")
            if not self._negotiate():
                raise result
        raise AssertionError("unreachable")
