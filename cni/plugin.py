"""The vswitch CNI plugin: ADD, DEL, CHECK, VERSION, GC and STATUS.

Theory of operation: the plugin is stateless. ``main`` validates the environment and the
configuration (conf.py), then runs one handler from a table, as the reference bridge
plugin does. Each handler delegates addresses to the IPAM plugin (ipam.py) and sends one
request to vswitchd (vswitch/rpc.py, docs/control.md), which owns the TAP devices, the
switch ports, the hostPort rules and the shapers. The result or the error goes to stdout
as JSON in the requested version (results.py); logs go to stderr and to ``logFile``.

ADD:   IPAM ADD -> attach. Any failure after IPAM ADD undoes what was done: detach when
       the attach may have happened (it succeeded, or its outcome is unknown), then IPAM
       DEL. The daemon undoes its own partial work when it answers an attach error.
DEL:   detach (daemon down: logged, not an error) -> IPAM DEL, always. Idempotent; works
       without CNI_NETNS, without prevResult, and after the namespace is gone.
CHECK: needs prevResult; IPAM CHECK -> the daemon compares interface, MAC, addresses,
       routes, attachment, shaper and hostPort rules with what prevResult and the
       configuration say.
GC:    the daemon removes every attachment of this network not in
       cni.dev/valid-attachments (gc with ``network``: other networks' are kept); then IPAM GC,
       or, when the IPAM plugin has no GC (host-local before 1.1.0), IPAM DEL for each
       removed attachment. Errors are collected and reported after everything was tried.
STATUS: the daemon answers (else 50), and the IPAM plugin's STATUS when it has one.
usePodCidr: an ``ipam`` subnet ``"usePodCidr"`` is the node's leased subnet, asked from the
       daemon (``pod_cidr``) before IPAM runs (cni/ipam.py); no lease yet: ADD fails, code 11.

Test hook: ``VSWITCH_CNI_TEST_FAULT=STEP`` makes ADD fail at STEP: ``after_ipam`` and
``after_attach`` in the plugin, or any of the daemon's attach steps (sent as ``fault``;
the daemon honours it only with --test-faults). Runtimes never set it.
"""
import os
import sys
import time

from vswitch import rpc
from vswitch.cnitypes import ATTACH_STEPS as DAEMON_FAULT_STEPS

from . import conf as cconf
from .errors import (CniError, DAEMON_PROTOCOL, GC_INCOMPLETE, INJECTED_FAULT, INTERNAL,
                     INVALID_CONFIG, IPAM_BAD_RESULT, PLUGIN_NOT_AVAILABLE,
                     TRY_AGAIN_LATER)
from .ipam import LOCAL_IO, PLACEHOLDER_SUBNETS, Ipam, Unsupported, uses_pod_cidr, with_pod_cidrs
from .results import dumps, error_json, format_result, parse_result, version_info

ABOUT = "CNI plugin vswitch: attaches pods to vswitchd"
DAEMON_TIMEOUT_S = 60.0


# ---------------------------------------------------------------- logging

class Log:
    """Lines to stderr (warnings and errors only) and to the optional log file (all).
    ``io`` is the invocation's outside world (ipam.LocalIo, or vswitchd's session for the
    thin client), ``pid`` the process the runtime started (the client's, under vswitchd)."""

    def __init__(self, io=LOCAL_IO, pid=None):
        self.io = io
        self.pid = os.getpid() if pid is None else pid
        self.path = None
        self.prefix = f"vswitch-cni[{self.pid}]"

    def configure(self, path, env):
        self.path = path
        what = env.command
        if env.container_id:
            what += f" {env.container_id[:12]}/{env.ifname}"
        self.prefix = f"vswitch-cni[{self.pid}] {what}"

    def _write(self, level, msg, to_stderr):
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {level} {self.prefix}: {msg}\n"
        if to_stderr:
            self.io.err(line)
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(line)
            except OSError as exc:
                self.io.err(f"{self.prefix}: cannot write log file {self.path}: {exc}\n")
                self.path = None

    def info(self, msg):
        self._write("info", msg, False)

    def warn(self, msg):
        self._write("warn", msg, True)

    def error(self, msg):
        self._write("error", msg, True)


# ---------------------------------------------------------------- daemon

def daemon_call(conf, op, **args):
    """One request to vswitchd; :class:`CniError` with the daemon's (or transport's) code."""
    try:
        with rpc.Client(conf.socket_path, DAEMON_TIMEOUT_S) as client:
            reply = client.request({"op": op, **args})
    except rpc.RpcError as exc:
        if exc.code == rpc.E_TRY_AGAIN:
            raise CniError(TRY_AGAIN_LATER, exc.msg,
                           "is vswitchd running? the plugin config's 'socket' is "
                           f"{conf.socket_path}") from None
        raise CniError(DAEMON_PROTOCOL, f"vswitchd sent an unreadable reply to {op}: {exc.msg}")
    if not isinstance(reply, dict) or "ok" not in reply:
        raise CniError(DAEMON_PROTOCOL, f"vswitchd sent a reply to {op} without 'ok': "
                       f"{str(reply)[:200]}")
    if not reply["ok"]:
        code = reply.get("code")
        if isinstance(code, bool) or not isinstance(code, int):
            code = DAEMON_PROTOCOL
        raise CniError(code, f"vswitchd {op}: {reply.get('msg', 'failed without a message')}",
                       str(reply.get("details") or ""))
    return reply


def _fault(env, step):
    if env.environ.get("VSWITCH_CNI_TEST_FAULT") == step:
        raise CniError(INJECTED_FAULT, f"injected fault at plugin step {step} "
                       "(VSWITCH_CNI_TEST_FAULT)")


# ---------------------------------------------------------------- helpers

def _ipam(env, conf, obj, raw, log):
    if uses_pod_cidr(obj):
        obj, raw = with_pod_cidrs(obj, _pod_cidrs(env, conf, log)), None
    return Ipam(conf.ipam_type, env.path, env.environ, obj, raw, log.io)


def _pod_cidrs(env, conf, log):
    """The node's leased subnets for ``usePodCidr`` (cni/ipam.py), asked from vswitchd.
    No lease yet or no daemon: ADD and CHECK fail (code 11, or the daemon's code); DEL and
    GC release with placeholder subnets (host-local frees by container ID)."""
    try:
        reply = daemon_call(conf, "pod_cidr")
        cidrs = reply.get("pod_cidrs")
        if not isinstance(cidrs, list) or not cidrs or not all(isinstance(c, str) for c in cidrs):
            raise CniError(DAEMON_PROTOCOL, f"vswitchd pod_cidr reply has no pod_cidrs list: {str(reply)[:200]}")
        return cidrs
    except CniError as err:
        if env.command not in ("DEL", "GC"):
            raise
        log.warn(f"usePodCidr: no leased subnet ({err.msg}); releasing by container ID with "
                 f"placeholder ranges")
        return list(PLACEHOLDER_SUBNETS)


def _families(ips):
    return {6 if ":" in ip["address"] else 4 for ip in ips}


def _mappings_for(conf, families, log):
    """portMappings whose hostIP family the pod has (portmap skips the others)."""
    out = []
    for pm in conf.port_mappings:
        fam = pm.family()
        if fam is not None and fam not in families:
            log.info(f"skipping hostPort {pm.host_port}/{pm.protocol} on {pm.host_ip}: the pod "
                     f"has no IPv{fam} address")
            continue
        out.append(pm.to_cni())
    return out


def _routes_for(ipam_result, ips):
    """IPAM's routes with the family's gateway filled in, or a default route per family."""
    gateways = {}
    for ip in ips:
        if ip.get("gateway"):
            gateways.setdefault(6 if ":" in ip["address"] else 4, ip["gateway"])
    routes = []
    for r in ipam_result["routes"]:
        entry = dict(r)
        if not entry.get("gw"):
            gw = gateways.get(6 if ":" in entry["dst"] else 4)
            if gw:
                entry["gw"] = gw
        routes.append(entry)
    if not routes:
        for fam, gw in sorted(gateways.items()):
            routes.append({"dst": "0.0.0.0/0" if fam == 4 else "::/0", "gw": gw})
    return routes


def _bandwidth_wire(conf):
    bw = conf.bandwidth
    return None if bw is None or bw.is_empty else bw.to_cni()


def _empty_result():
    return {"interfaces": [], "ips": [], "routes": [], "dns": {}}


def _itf(d, sandbox=None):
    entry = {"name": d.get("name", "")}
    if d.get("mac"):
        entry["mac"] = d["mac"]
    if d.get("mtu"):
        entry["mtu"] = d["mtu"]
    if sandbox:
        entry["sandbox"] = sandbox
    return entry


# ---------------------------------------------------------------- commands

def cmd_add(env, conf, obj, raw, log):
    cconf.check_netns(env, log.io.own_netns)
    prev = parse_result(conf.prev_result, "prevResult") if conf.prev_result else _empty_result()
    ipam = _ipam(env, conf, obj, raw, log)
    try:
        ipam_out = ipam.call("ADD")
    except CniError as exc:
        if getattr(exc, "exit_ok", False):
            _rollback_add(env, conf, ipam, False, exc, log)
        raise
    attach_maybe_done = False
    try:
        _fault(env, "after_ipam")
        ipam_result = parse_result(ipam_out, f"IPAM plugin {conf.ipam_type} result")
        ips = [{k: ip[k] for k in ("address", "gateway") if ip.get(k)}
               for ip in ipam_result["ips"]]
        if not ips:
            raise CniError(IPAM_BAD_RESULT, f"IPAM plugin {conf.ipam_type} returned no "
                           "address", f"its result: {ipam_out}")
        got = {cconf.split_cidr(ip["address"])[0] for ip in ips}
        missing = [a for a in conf.requested_ips if a not in got]
        if missing:
            raise CniError(IPAM_BAD_RESULT, f"IPAM plugin {conf.ipam_type} did not allocate the "
                           f"requested address(es) {', '.join(missing)}; it gave "
                           f"{', '.join(sorted(got))}")
        routes = _routes_for(ipam_result, ips)
        request = {"container_id": env.container_id, "ifname": env.ifname,
                   "netns": env.netns, "ips": ips, "routes": routes,
                   "port_mappings": _mappings_for(conf, _families(ips), log),
                   "network": conf.name}
        if conf.mtu_given:         # else the daemon's default (uplink MTU - 50 with VXLAN)
            request["mtu"] = conf.mtu
        if conf.mac:
            request["mac"] = conf.mac
        bw = _bandwidth_wire(conf)
        if bw:
            request["bandwidth"] = bw
        if conf.pod:
            request["pod"] = conf.pod
        if conf.ip_masq:
            request["ip_masq"] = True
        fault = env.environ.get("VSWITCH_CNI_TEST_FAULT")
        if fault in DAEMON_FAULT_STEPS:
            request["fault"] = fault
        try:
            reply = daemon_call(conf, "attach", **request)
        except CniError as exc:
            # an error reply means the daemon undid its part; a transport failure leaves
            # the outcome unknown
            attach_maybe_done = exc.code in (TRY_AGAIN_LATER, DAEMON_PROTOCOL)
            raise
        attach_maybe_done = True
        _fault(env, "after_attach")
        interfaces = reply.get("interfaces")
        if not isinstance(interfaces, list) or len(interfaces) != 2 \
                or not all(isinstance(i, dict) for i in interfaces):
            raise CniError(DAEMON_PROTOCOL, "vswitchd attach reply has no [host, pod] "
                           f"interfaces: {str(reply)[:300]}")
        attachment = reply.get("attachment") or {}
        base = len(prev["interfaces"])
        result = {
            "interfaces": prev["interfaces"] + [_itf(interfaces[0]),
                                                _itf(interfaces[1], sandbox=env.netns)],
            "ips": prev["ips"] + [dict(ip, interface=base + 1) for ip in ips],
            "routes": prev["routes"] + (attachment.get("routes") or routes),
            "dns": conf.dns or ipam_result["dns"] or prev["dns"],
        }
        out = format_result(result, conf.version)
    except BaseException as exc:
        _rollback_add(env, conf, ipam, attach_maybe_done, exc, log)
        raise
    log.info(f"added {', '.join(ip['address'] for ip in ips)} port "
             f"{reply.get('port', '?')}")
    return out


def _rollback_add(env, conf, ipam, detach, exc, log):
    log.warn(f"ADD failed ({getattr(exc, 'msg', exc)}); undoing it")
    if detach:
        try:
            daemon_call(conf, "detach", container_id=env.container_id, ifname=env.ifname,
                        netns=env.netns)
        except CniError as err:
            log.error(f"rollback: detach failed: {err.msg}")
    try:
        ipam.call("DEL")
    except (CniError, Unsupported) as err:
        log.error(f"rollback: IPAM DEL failed, the address may stay allocated: "
                  f"{getattr(err, 'msg', err)}")


def cmd_del(env, conf, obj, raw, log):
    errors = []
    try:
        reply = daemon_call(conf, "detach", container_id=env.container_id,
                            ifname=env.ifname, netns=env.netns)
        log.info(f"detached (existed: {reply.get('existed')})")
    except CniError as err:
        if err.code == TRY_AGAIN_LATER:
            log.warn(f"vswitchd is down, releasing the address only: {err.msg}")
        else:
            errors.append(err)
            log.error(f"detach failed: {err.msg}")
    if conf.ipam_type:
        try:
            _ipam(env, conf, obj, raw, log).call("DEL")
        except CniError as err:
            errors.append(err)
            log.error(err.msg)
    if errors:
        raise errors[0]
    return None


def _pod_interface(prev, env):
    for idx, itf in enumerate(prev["interfaces"]):
        if itf["name"] == env.ifname and itf.get("sandbox"):
            return idx, itf
    raise CniError(INVALID_CONFIG, f"prevResult has no interface {env.ifname!r} with a sandbox; "
                   f"its interfaces: {[i['name'] for i in prev['interfaces']]}")


def cmd_check(env, conf, obj, raw, log):
    cconf.check_netns(env, log.io.own_netns)
    if conf.prev_result is None:
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult (the result of the ADD)")
    prev = parse_result(conf.prev_result, "prevResult")
    idx, itf = _pod_interface(prev, env)
    ips = [{k: ip[k] for k in ("address", "gateway") if ip.get(k)}
           for ip in prev["ips"] if ip.get("interface") == idx]
    if conf.ipam_type:
        _ipam(env, conf, obj, raw, log).call("CHECK")
    request = {"container_id": env.container_id, "ifname": env.ifname, "netns": env.netns,
               "mac": itf.get("mac"), "ips": ips, "routes": prev["routes"],
               "port_mappings": _mappings_for(conf, _families(ips), log),
               "bandwidth": _bandwidth_wire(conf)}
    daemon_call(conf, "check", **request)
    return None


def cmd_gc(env, conf, obj, raw, log):
    errors = []
    removed = []
    try:
        # cni.dev/valid-attachments lists only this network's: the daemon considers only
        # this network's attachments
        reply = daemon_call(conf, "gc", valid=list(conf.valid_attachments), network=conf.name)
        removed = [r for r in reply.get("removed") or [] if isinstance(r, dict)]
        errors += [f"vswitchd: {e}" for e in reply.get("errors") or []]
    except CniError as err:
        errors.append(err.msg)
    log.info(f"gc: vswitchd removed {len(removed)} attachment(s)")
    if conf.ipam_type:
        ipam = _ipam(env, conf, obj, raw, log)
        try:
            ipam.call("GC")
        except Unsupported as exc:
            log.info(f"{exc}; releasing the addresses of removed attachments with DEL")
            for r in removed:
                try:
                    ipam.call("DEL", {"CNI_CONTAINERID": str(r.get("container_id", "")),
                                      "CNI_IFNAME": str(r.get("ifname", "")),
                                      "CNI_NETNS": None, "CNI_ARGS": None})
                except CniError as err:
                    errors.append(f"{err.msg} (container {r.get('container_id')})")
        except CniError as err:
            errors.append(err.msg)
    if errors:
        raise CniError(GC_INCOMPLETE, f"GC finished with {len(errors)} error(s): "
                       + "; ".join(errors))
    return None


def cmd_status(env, conf, obj, raw, log):
    try:
        daemon_call(conf, "status")
    except CniError as err:
        raise CniError(PLUGIN_NOT_AVAILABLE, err.msg, err.details) from None
    if conf.ipam_type:
        try:
            _ipam(env, conf, obj, raw, log).call("STATUS")
        except Unsupported:
            pass
        except CniError as err:
            raise CniError(PLUGIN_NOT_AVAILABLE, err.msg, err.details) from None
    return None


HANDLERS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc,
            "STATUS": cmd_status}


# ---------------------------------------------------------------- entry point

def _print(log, obj):
    log.io.out(dumps(obj) + "\n")


def run(environ, stdin, log):
    """One invocation; returns the exit status and prints the output (to ``log.io``)."""
    version = cconf.CURRENT_VERSION
    try:
        if not environ.get("CNI_COMMAND"):
            log.io.err(ABOUT + "\nCNI protocol versions supported: "
                       + ", ".join(cconf.SUPPORTED_VERSIONS) + "\n")
        env = cconf.parse_env(environ)
        if env.command == "VERSION":
            _print(log, version_info())
            return 0
        raw = stdin.read()
        obj = cconf.load_stdin(raw)
        version = cconf.requested_version(obj)
        cconf.check_version(obj, env.command)
        conf = cconf.parse_netconf(obj, env)
        log.configure(conf.log_file, env)
        out = HANDLERS[env.command](env, conf, obj, raw, log)
        if out is not None:
            _print(log, out)
        return 0
    except CniError as err:
        log.error(f"code {err.code}: {err.msg}" + (f" ({err.details})" if err.details else ""))
        _print(log, error_json(version, err))
        return 1
    except Exception as exc:  # a bug: still answer in CNI form, with the exception
        import traceback
        details = traceback.format_exc()
        err = CniError(INTERNAL, f"internal error in the vswitch plugin: "
                       f"{type(exc).__name__}: {exc}", details)
        log.error(details)
        _print(log, error_json(version, err))
        return 1


def main():
    """Console script ``vswitch-cni`` and the installed ``vswitch`` launcher (``--version``
    prints the project's version; runtimes pass no arguments)."""
    if sys.argv[1:] == ["--version"]:
        from vswitch import __version__
        sys.stdout.write(f"vswitch-cni {__version__}\n")
        return 0
    return run(os.environ, sys.stdin.buffer, Log())


if __name__ == "__main__":
    sys.exit(main())
