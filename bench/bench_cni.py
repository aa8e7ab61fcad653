"""CNI ADD and DEL latency: the vswitch plugin against the reference chain, same run.

Theory of operation
-------------------
Both subjects are network configuration lists executed the way libcni executes them
(``vswitch.lab.CniChain``: ADD through every plugin in order with ``prevResult`` and the
runtimeConfig of the capabilities each declares, DEL in reverse with the cached result),
with the same pod spec (``POD_SPEC``: one hostPort mapping and bandwidth in both
directions, through the ``portMappings`` and ``bandwidth`` capabilities both configs
declare) and the same IPAM (host-local):

- ``reference-cni``: bridge (isGateway, hairpin) + host-local + portmap + bandwidth from
  /usr/lib/cni: a veth, iptables DNAT chains, tc tbf and an ifb device per pod.
- ``vswitch``: the installed ``vswitch`` plugin, as install-cni writes it by default (the C
  client, cni/client.c: vswitchd runs the plugin's code, the client runs host-local from the
  reference dir, found through CNI_PATH) talking to a vswitchd that this benchmark started
  (``vswitch.lab.Daemon``).
- ``bridge``: the bare reference bridge plugin (isGateway, hairpin) + host-local, nothing
  else: a veth and addresses, no hostPort, no shaping (the floor a CNI ADD can reach here;
  issue 16 asks vswitch's ADD for at most twice it).

Every plugin runs with the PATH a runtime started by systemd has (``RUNTIME_PATH``), so
``python3`` is the host's (a developer's PATH may hold a pyenv shim that costs more than
the whole ADD).

Everything happens inside a node namespace created here (``vswitch.lab.Namespaces``):
vswitchd runs in it, and the benchmark thread enters it (setns) while it executes the
chains, so the reference plugins' bridge, iptables chains and ifb devices never touch the
machine's own namespace; the pool threads it starts inherit it. Pod namespaces are
created per round before the clock starts and removed afterwards. Before the first DEL of
each subject and pod count the benchmark checks that the pod spec took effect (vswitchd
lists the pods' port mappings and bandwidth; the reference chain left a DNAT rule per
hostPort and two tbf qdiscs per pod), so a figure never times a chain that skipped work.

Figures: ``cni-add`` and ``cni-del`` in ms per pod, ``parallel`` = 1 (pods one after
another), 20 and 50 (that many pods at once, 50 in the full run only; each pod's own
latency is a sample, the wall time of the whole batch is in ``info``). The subjects take
turns (``measure``): pod by pod at ``parallel`` 1, batch by batch above, so a change of the
machine's load in the middle of the run does not land on one subject only. ``cni-version``:
the plugin's start-up alone, ms per run of the installed ``vswitch`` (the C client) with
``CNI_COMMAND=VERSION`` (which it answers itself: one line of JSON) against the
reference ``bridge`` plugin's VERSION; no daemon and no namespace are involved. The reference
chain has no ipMasq here, since the vswitch plugin does not ask for it either.

The plugin's forms (issue 15), groups ``cni-plugin-start`` (VERSION, ms per run) and
``cni-plugin-add`` (ADD of one pod with a hostPort and bandwidth, host-local included, ms
per pod; DEL untimed), each run with the PATH a runtime started by systemd has
(``RUNTIME_PATH``): ``client`` (what install-cni writes: the C client, issue 16; the
plugin's code runs in vswitchd), ``launcher`` (the developer launcher, the installed form
before issue 15: this interpreter with -IS, the checkout's __pycache__), ``zipapp`` (the
Python plugin, what install-cni writes with ``--form python`` and the client falls back to:
the /bin/sh prelude, the host's python3 from PATH, -IS, the archive's bytecode tree),
``zipapp-pinned`` (the same archive with ``#!this-interpreter -IS``: the archive's
own cost against the launcher on one interpreter), ``zipapp-env`` (``#!/usr/bin/env
python3``: site runs, the .pth files of the host's dist-packages with it) and
``zipapp-no-bytecode`` (start only: the prelude without the bytecode tree, every run
compiles the sources).

    python -m bench --files bench_cni.py      # as root, containernetworking-plugins installed
    python -m bench.bench_cni                 # the same table without pytest
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import random
import shutil
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from . import nettools, podnet
from .report import quick_mode, record
from vswitch import lab

pytestmark = pytest.mark.integration

REF_CNI = podnet.REF_CNI
QUICK = quick_mode()
SERIAL_PODS = 5 if QUICK else 20
PARALLEL = (20,) if QUICK else (20, 50)
ROUNDS = 1 if QUICK else 3
SUBJECTS = ("vswitch", "reference-cni", "bridge")
RUNTIME_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"   # systemd's default
CAPABILITIES = {"portMappings": True, "bandwidth": True}


class Bed:
    """The node namespace, vswitchd in it, and both chains' configs."""

    def __init__(self, workdir):
        self.dir = Path(workdir)
        self.u = lab.uid()
        self.ns = lab.Namespaces(prefix="bcn")
        self.pods = []
        self.daemon = None
        self.verified = set()

    def start(self):
        self.node = self.ns.new("node")
        self.daemon = lab.Daemon(self.node, self.dir / "vswitchd").start(timeout_s=30)
        self.socket = self.daemon.socket
        from vswitch_cni.install import install
        self.vsw_bin = self.dir / "vsw-bin"
        install(str(self.vsw_bin), str(self.dir / "net.d"), socket_path=self.socket)
        octet = random.randrange(16, 248)
        self.chains = {
            "vswitch": lab.CniChain({
                "cniVersion": "1.0.0", "name": f"bvsw{self.u}",
                "plugins": [{"type": "vswitch", "socket": self.socket,
                             "capabilities": dict(CAPABILITIES),
                             "ipam": self._ipam(f"10.{octet}.0.0/16", "vsw")}]},
                cni_path=(self.vsw_bin, REF_CNI)),
            "reference-cni": lab.CniChain({
                "cniVersion": "1.0.0", "name": f"bref{self.u}",
                "plugins": [
                    {"type": "bridge", "bridge": f"bref{self.u}", "isGateway": True,
                     "ipMasq": False, "hairpinMode": True,
                     "ipam": self._ipam(f"10.{octet + 1}.0.0/16", "ref")},
                    {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
                    {"type": "bandwidth", "capabilities": {"bandwidth": True}}]},
                cni_path=(REF_CNI,)),
            "bridge": lab.CniChain({
                "cniVersion": "1.0.0", "name": f"bbr{self.u}",
                "plugins": [
                    {"type": "bridge", "bridge": f"bbr{self.u}", "isGateway": True,
                     "ipMasq": False, "hairpinMode": True,
                     "ipam": self._ipam(f"10.{octet + 2}.0.0/16", "bridge")}]},
                cni_path=(REF_CNI,)),
        }
        # the same pod spec reaches both full chains: every capability of the spec is
        # declared by a plugin (the bare bridge declares none: it is the floor)
        for subject, chain in self.chains.items():
            if subject == "bridge":
                continue
            declared = {k for p in chain.conflist["plugins"] for k, on in p.get("capabilities", {}).items() if on}
            assert declared >= set(_runtime_config(0)), (subject, declared)
        return self

    def _ipam(self, subnet, tag):
        return {"type": "host-local", "dataDir": str(self.dir / f"ipam-{tag}"),
                "ranges": [[{"subnet": subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}

    def new_pod(self, i):
        # a bare namespace (no "lo up": one subprocess less per pod, and CNI needs none)
        name = f"bcp{self.u}{i}x{random.randrange(1 << 20):05x}"
        lab.sh("ip", "netns", "add", name)
        self.pods.append(name)
        return name

    def drop_pods(self):
        for name in self.pods:
            lab.sh("ip", "netns", "del", name, check=False)
        self.pods.clear()

    def verify(self, subject, pods):
        """The pod spec took effect for every pod of ``pods`` [(i, ns)] (checked once per
        subject and pod count, between ADD and DEL, outside the per-pod timings)."""
        if subject == "vswitch":
            att = {a.get("container_id"): a for a in self.daemon.call("list")["attachments"]}
            for i, ns in pods:
                a = att.get(f"bench-{ns}")
                assert a is not None, f"vswitchd has no attachment for pod {ns}"
                assert [m.get("hostPort") for m in a.get("port_mappings") or []] == [20000 + i], a
                assert (a.get("bandwidth") or {}).get("ingressRate") == POD_SPEC["bandwidth"]["ingressRate"], a
        elif subject == "bridge":
            addrs = lab.sh("ip", "-o", "-4", "addr", "show", "dev", f"bbr{self.u}").stdout
            assert "inet 10." in addrs, f"the bridge plugin left no gateway on bbr{self.u}: {addrs!r}"
        else:
            nat = lab.sh("iptables", "-t", "nat", "-S").stdout
            for i, _ in pods:
                assert f"--dport {20000 + i} " in nat, f"portmap left no DNAT rule for hostPort {20000 + i}"
            tbf = lab.sh("tc", "qdisc", "show").stdout.count("qdisc tbf")
            assert tbf >= 2 * len(pods), f"bandwidth left {tbf} tbf qdiscs for {len(pods)} pods"

    def stop(self):
        try:
            self.drop_pods()
            if self.daemon is not None:
                self.daemon.stop()
        finally:
            self.ns.cleanup()


@contextlib.contextmanager
def bed_context():
    """A started :class:`Bed`, with this thread inside its node namespace until exit."""
    nettools.require("ip", "iptables", "tc")
    for plugin in ("bridge", "host-local", "portmap", "bandwidth"):
        if not (REF_CNI / plugin).exists():
            pytest.skip(f"reference CNI plugin {REF_CNI / plugin} not installed "
                        "(containernetworking-plugins)")
    workdir = tempfile.mkdtemp(prefix="bench-cni-")
    b = Bed(workdir)
    path = os.environ.get("PATH")
    os.environ["PATH"] = RUNTIME_PATH       # lab.CniChain passes the PATH on to the plugins
    try:
        b.start()
        with podnet.in_netns(b.node):    # this thread, and threads it starts, run there
            yield b
    finally:
        try:
            b.stop()
        finally:
            if path is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = path
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def bed():
    with bed_context() as b:
        yield b


POD_SPEC = {"portMappings": [{"hostPort": 20000, "containerPort": 80, "protocol": "tcp"}],
            "bandwidth": {"ingressRate": 100_000_000, "ingressBurst": 10_000_000,
                          "egressRate": 100_000_000, "egressBurst": 10_000_000}}


def _runtime_config(i):
    """Pod i's runtimeConfig: POD_SPEC with its own hostPort (20000 + i)."""
    return {"portMappings": [dict(POD_SPEC["portMappings"][0], hostPort=20000 + i)],
            "bandwidth": dict(POD_SPEC["bandwidth"])}


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - t0) * 1000.0, out


def _run_round(bed, subject, parallel, n_pods, base):
    """ADD then DEL of ``n_pods`` pods; returns (add_ms, del_ms, add_wall_ms, del_wall_ms)."""
    chain = bed.chains[subject]
    pods = [(base + i, bed.new_pod(base + i)) for i in range(n_pods)]

    def add(p):
        i, ns = p
        return _timed(chain.add, f"bench-{ns}", f"/run/netns/{ns}", "eth0",
                      _runtime_config(i))

    def delete(p_res):
        (i, ns), result = p_res
        return _timed(chain.delete, f"bench-{ns}", f"/run/netns/{ns}", "eth0",
                      _runtime_config(i), result)[0]

    workers = max(1, parallel)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            t0 = time.perf_counter()
            adds = list(pool.map(add, pods))
            add_wall = (time.perf_counter() - t0) * 1000.0
            if (subject, n_pods) not in bed.verified:
                bed.verify(subject, pods)
                bed.verified.add((subject, n_pods))
            t0 = time.perf_counter()
            dels = list(pool.map(delete, zip(pods, [r for _, r in adds])))
            del_wall = (time.perf_counter() - t0) * 1000.0
    finally:
        bed.drop_pods()
    return [ms for ms, _ in adds], dels, add_wall, del_wall


_MEASURED: dict = {}    # parallel -> {subject: {"add": [ms], "del": [ms], "walls": [...]}}


def _rotated(i):
    k = i % len(SUBJECTS)
    return SUBJECTS[k:] + SUBJECTS[:k]


def measure(bed, parallel):
    """ADD and DEL samples of every subject at ``parallel``, measured once per module and
    interleaved, so that the load of this shared machine (it moves by the minute) falls on
    all subjects alike: one pod at a time (``parallel`` 1), the subjects take turns pod by
    pod; ``parallel`` pods at once, they take turns batch by batch; the first subject of
    each turn rotates. Each pod is deleted before the next turn starts."""
    if parallel in _MEASURED:
        return _MEASURED[parallel]
    out = {subj: {"add": [], "del": [], "walls": []} for subj in SUBJECTS}
    if parallel == 1:
        turns = [(r * SERIAL_PODS + i, 1, 100 * (r * SERIAL_PODS + i))
                 for r in range(ROUNDS) for i in range(SERIAL_PODS)]
    else:
        turns = [(r, parallel, 1000 * r) for r in range(ROUNDS)]
    for turn, n_pods, base in turns:
        for subj in _rotated(turn):
            a, d, aw, dw = _run_round(bed, subj, n_pods, n_pods, base)
            out[subj]["add"] += a
            out[subj]["del"] += d
            if n_pods > 1:
                out[subj]["walls"].append({"add_wall_ms": round(aw, 1), "del_wall_ms": round(dw, 1)})
    _MEASURED[parallel] = out
    return out


def _measured(benchmark, bed, parallel):
    """``measure`` under pytest-benchmark (its timing is the whole interleaved measurement
    for the first test of ``parallel``, nothing for the others; the figures are the
    samples)."""
    got = {}
    benchmark.pedantic(lambda: got.update(measure(bed, parallel)), rounds=1, iterations=1,
                       warmup_rounds=0)
    return got


@pytest.mark.parametrize("parallel", (1,) + PARALLEL)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_cni_add(benchmark, bed, subject, parallel):
    m = _measured(benchmark, bed, parallel)[subject]
    n_pods = SERIAL_PODS if parallel == 1 else parallel
    info = {"pods_per_round": n_pods, "rounds": ROUNDS, "walls": m["walls"],
            "interleaved": "subjects take turns (bench_cni.measure)"}
    record(benchmark, group="cni-add", subject=subject, unit="ms", samples=m["add"],
           target="cni-add", info=info, parallel=parallel)


@pytest.mark.parametrize("parallel", (1,) + PARALLEL)
@pytest.mark.parametrize("subject", SUBJECTS)
def test_cni_del(benchmark, bed, subject, parallel):
    m = _measured(benchmark, bed, parallel)[subject]
    n_pods = SERIAL_PODS if parallel == 1 else parallel
    record(benchmark, group="cni-del", subject=subject, unit="ms", samples=m["del"],
           info={"pods_per_round": n_pods, "rounds": ROUNDS, "walls": m["walls"],
                 "interleaved": "subjects take turns (bench_cni.measure)"}, parallel=parallel)


VERSION_RUNS = 30 if QUICK else 200


@pytest.mark.parametrize("subject", ("vswitch", "reference-cni"))
def test_cni_version(benchmark, subject, tmp_path):
    """Start-up: one VERSION invocation, as a runtime execs the plugin (no stdin needed)."""
    if subject == "vswitch":
        from vswitch_cni.install import install
        exe, _ = install(str(tmp_path / "bin"), str(tmp_path / "net.d"))
    else:
        exe = str(REF_CNI / "bridge")
        if not (REF_CNI / "bridge").exists():
            pytest.skip(f"reference CNI plugin {exe} not installed (containernetworking-plugins)")
    env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}

    def once():
        return subprocess.run([exe], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, check=True).stdout
    assert json.loads(once())["supportedVersions"]      # warm: caches and bytecode written
    samples = []

    def one_round():
        for _ in range(VERSION_RUNS):
            samples.append(_timed(once)[0])

    benchmark.pedantic(one_round, rounds=1, iterations=1, warmup_rounds=0)
    record(benchmark, group="cni-version", subject=subject, unit="ms", samples=samples,
           info={"runs": VERSION_RUNS})


PLUGIN_FORMS = ("client", "launcher", "zipapp", "zipapp-pinned", "zipapp-env", "zipapp-no-bytecode")
FORM_ADD_PODS = 5 if QUICK else 20


def _install_form(form, base):
    """The ``vswitch`` plugin of ``form`` (module docstring) in ``base/FORM/bin``; its path."""
    from vswitch_cni.build import build_bytes
    from vswitch_cni.install import install, write_atomic
    bin_dir, conf_dir = Path(base) / form / "bin", Path(base) / form / "net.d"
    if form in ("client", "launcher", "zipapp", "zipapp-pinned"):
        options = {"client": {"form": "client", "host_path": RUNTIME_PATH},
                   "launcher": {"launcher": True, "form": "python"},
                   "zipapp": {"host_path": RUNTIME_PATH, "form": "python"},
                   "zipapp-pinned": {"python": os.path.realpath(sys.executable), "form": "python"}}[form]
        return install(str(bin_dir), str(conf_dir), **options)[0]
    bin_dir.mkdir(parents=True, exist_ok=True)
    data = (build_bytes(shebang="#!/usr/bin/env python3\n") if form == "zipapp-env"
            else build_bytes(compile_with=()))
    write_atomic(str(bin_dir / "vswitch"), data, 0o755)
    return str(bin_dir / "vswitch")


def _exec_plugin(exe, command, conf=None, **cni_env):
    """One run of ``exe`` as a runtime started by systemd runs it; returns the parsed stdout."""
    env = {"PATH": RUNTIME_PATH, "CNI_COMMAND": command, **cni_env}
    p = subprocess.run([exe], input=json.dumps(conf).encode() if conf else b"", env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"{exe} {command} failed ({p.returncode}): {p.stdout!r} {p.stderr[-800:]!r}")
    return json.loads(p.stdout) if p.stdout.strip() else None


@pytest.mark.parametrize("form", PLUGIN_FORMS)
def test_plugin_form_start(benchmark, form, tmp_path):
    """Start-up of each plugin form: VERSION, as a runtime execs it."""
    exe = _install_form(form, tmp_path)
    assert _exec_plugin(exe, "VERSION")["supportedVersions"]    # warm: caches, bytecode
    samples = []

    def one_round():
        for _ in range(VERSION_RUNS):
            samples.append(_timed(_exec_plugin, exe, "VERSION")[0])

    benchmark.pedantic(one_round, rounds=1, iterations=1, warmup_rounds=0)
    record(benchmark, group="cni-plugin-start", subject=form, unit="ms", samples=samples,
           info={"runs": VERSION_RUNS, "path": RUNTIME_PATH,
                 "first_line": Path(exe).read_bytes().split(b"\n", 1)[0].decode(errors="replace")})


@pytest.mark.parametrize("form", [f for f in PLUGIN_FORMS if f != "zipapp-no-bytecode"])
def test_plugin_form_add(benchmark, bed, form, tmp_path):
    """ADD of one pod (hostPort and bandwidth, host-local IPAM) by each plugin form against
    the same vswitchd; the DEL after each ADD is not timed."""
    exe = _install_form(form, tmp_path)
    conf = {"cniVersion": "1.0.0", "name": f"bform{bed.u}", "type": "vswitch",
            "socket": bed.socket, "ipam": bed._ipam("10.%d.0.0/16" % random.randrange(16, 250),
                                                      f"form-{form}")}
    samples = []
    counter = iter(range(30000, 1_000_000, 100))

    def one_round():
        for _ in range(FORM_ADD_PODS):
            i = next(counter)
            ns = bed.new_pod(i)
            env = {"CNI_CONTAINERID": f"bench-{ns}", "CNI_NETNS": f"/run/netns/{ns}",
                   "CNI_IFNAME": "eth0", "CNI_PATH": f"{os.path.dirname(exe)}:{REF_CNI}"}
            add_conf = dict(conf, runtimeConfig=_runtime_config(i))
            try:
                ms, result = _timed(lambda: _exec_plugin(exe, "ADD", add_conf, **env))
                assert result["ips"], result
                samples.append(ms)
                _exec_plugin(exe, "DEL", dict(add_conf, prevResult=result), **env)
            finally:
                bed.drop_pods()

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    record(benchmark, group="cni-plugin-add", subject=form, unit="ms", samples=samples,
           info={"pods_per_round": FORM_ADD_PODS, "rounds": ROUNDS, "path": RUNTIME_PATH})


def summary(results, peer="reference-cni"):
    """Median ratios vswitch ÷ ``peer`` from {(group, parallel, subject): samples}."""
    out = {}
    for (group, parallel, subject), samples in results.items():
        if subject != "vswitch":
            continue
        ref = results.get((group, parallel, peer))
        if ref:
            med = lambda s: sorted(s)[len(s) // 2]   # noqa: E731
            out[(group, parallel)] = (med(samples), med(ref), med(samples) / med(ref))
    return out


if __name__ == "__main__":
    # python -m bench.bench_cni: the same measurement without pytest, printing the table
    results = {}
    with bed_context() as b:
        for parallel in (1,) + PARALLEL:
            for subject, m in measure(b, parallel).items():
                results[("add", parallel, subject)] = m["add"]
                results[("del", parallel, subject)] = m["del"]
    print(json.dumps({f"{g} parallel={p} vs {peer}": {"vswitch_ms": round(v, 1),
                                                       "peer_ms": round(r, 1),
                                                       "ratio": round(v / r, 3)}
                      for peer in ("reference-cni", "bridge")
                      for (g, p), (v, r, _) in summary(results, peer).items()}, indent=2))
