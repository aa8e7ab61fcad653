"""deploy/: the manifests validate against Kubernetes' schemas, and agree with the image
and the daemon.

- every manifest validates strictly (unknown fields rejected) with kubernetes-validate's
  bundled, offline schemas, for the newest Kubernetes it ships and an older supported one;
  a broken DaemonSet is rejected (the validation can fail);
- vswitchd's args, expanded from the ConfigMap as the kubelet does, are accepted by
  vswitchd's own argument parser and reach the daemon as the mounts and probes expect
  (socket in the mounted socket dir, state dir mounted, metrics port = probe port =
  containerPort = scrape annotation);
- the init container's command runs the real ``vswitchctl install-cni`` (its host dirs
  replaced by temporary ones, as a mount would) and writes a network list whose socket is
  the one vswitchd listens on;
- the ConfigMap's keys are the ones the DaemonSet reads (mtu documented as
  informational), mounts are exactly the ones the DaemonSet's comment justifies;
- the entry point's defaults are vswitchd's.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is a test extra: pip install -e '.[test]'")

import k8s_manifests as km  # noqa: E402
from vswitch.daemon import entrypoint  # noqa: E402

OLDER_K8S = "1.30.0"
NODE = "node-a"
DAEMON_MOUNTS = {"/run/netns", "/run/vswitch", "/var/lib/vswitch"}
INFORMATIONAL_KEYS = {"mtu"}


@pytest.fixture(scope="module")
def docs():
    return km.load()


@pytest.fixture(scope="module")
def ds(docs):
    return docs["DaemonSet"]


@pytest.fixture(scope="module")
def cm(docs):
    return docs["ConfigMap"]


def test_the_manifest_set_is_complete(docs):
    assert set(docs) == {"Namespace", "ConfigMap", "DaemonSet"}
    ns = docs["Namespace"]["metadata"]["name"]
    assert docs["ConfigMap"]["metadata"]["namespace"] == ns
    assert docs["DaemonSet"]["metadata"]["namespace"] == ns
    # kubectl apply -f deploy/ applies files by name: the namespace must come first
    names = [os.path.basename(p) for p in km.manifest_paths()]
    assert names[0].startswith("00-") and "Namespace" in open(km.manifest_paths()[0]).read()


@pytest.mark.parametrize("version", ["latest", OLDER_K8S])
@pytest.mark.parametrize("path", km.manifest_paths(), ids=os.path.basename)
def test_manifest_validates_strictly(path, version):
    v = kubernetes_validate.latest_version() if version == "latest" else version
    with open(path) as f:
        for doc in yaml.safe_load_all(f):
            # raises ValidationError (with the field path) on any schema violation
            kubernetes_validate.validate(doc, v, strict=True)


@pytest.mark.parametrize("breakage", ["unknown field", "wrong type", "missing selector"])
def test_validation_rejects_a_broken_daemonset(ds, breakage):
    bad = copy.deepcopy(ds)
    if breakage == "unknown field":
        bad["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailble"] = 1
    elif breakage == "wrong type":
        bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "thirty"
    else:
        del bad["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_daemonset_policy(ds):
    spec = km.pod_spec(ds)
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert spec["hostNetwork"] is True
    assert {"operator": "Exists"} in spec["tolerations"]          # every node, any taint
    assert spec["terminationGracePeriodSeconds"] >= 10
    assert [c["name"] for c in spec["initContainers"]] == ["install-cni"]
    init = km.container(ds, "install-cni")
    assert init["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert init["securityContext"].get("privileged") is not True
    assert init["securityContext"]["readOnlyRootFilesystem"] is True


def _vswitchd_args(ds, cm):
    c = km.container(ds, "vswitchd")
    assert "command" not in c, "vswitchd must run under the image's entry point (args only)"
    args = km.expand(c["args"], km.env_of(c, cm, NODE))
    assert args[0] == "vswitchd", args
    return args


class _Parsed(Exception):
    pass


def _parse_with_vswitchd(monkeypatch, argv):
    """vswitchd's main() up to constructing the Daemon: its parser and checks, for real."""
    from vswitch.daemon import main as vmain
    seen = {}

    def record(*args, **kw):
        names = ["socket_path", "state_dir", "switch", "uplink", "log_file", "metrics_port", "test_faults",
                 "max_ports", "poll_us"]
        seen.update(dict(zip(names, args)), **kw)
        raise _Parsed()

    monkeypatch.setattr(vmain, "Daemon", record)
    monkeypatch.setattr(vmain.os, "geteuid", lambda: 0)      # the root check is not under test
    with pytest.raises(_Parsed):
        vmain.main(argv)
    return seen


def test_vswitchd_args_are_accepted_by_vswitchd(monkeypatch, ds, cm):
    args = _vswitchd_args(ds, cm)
    assert not [a for a in args if "$(" in a], f"unexpanded variables in {args}"
    seen = _parse_with_vswitchd(monkeypatch, args[1:])
    data = cm["data"]
    assert seen["uplink"] == data["uplink"]
    cluster = seen["cluster"]
    assert cluster is not None, "the DaemonSet runs vswitchd in cluster mode"
    assert seen["log_level"] == data["log-level"]
    assert seen["vtep"].vni == int(data["vni"])
    assert seen["metrics_address"] == "0.0.0.0"
    mounts = {m["mount_path"]: m for m in km.host_mounts(ds, km.container(ds, "vswitchd"))}
    assert os.path.dirname(seen["socket_path"]) in mounts
    assert seen["state_dir"] in mounts


def test_a_bad_option_is_refused_by_the_same_check(monkeypatch, ds, cm):
    """The check above can fail: vswitchd's parser exits on an option it does not know."""
    args = _vswitchd_args(ds, cm) + ["--no-such-option"]
    from vswitch.daemon import main as vmain
    monkeypatch.setattr(vmain.os, "geteuid", lambda: 0)
    with pytest.raises(SystemExit) as exc:
        vmain.main(args[1:])
    assert exc.value.code == 2


def test_metrics_port_agrees_with_probes_ports_and_annotations(ds, cm):
    args = _vswitchd_args(ds, cm)
    port = int(km.option(args, "--metrics-port"))
    c = km.container(ds, "vswitchd")
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert named["metrics"] == port
    for probe in ("readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert named.get(get["port"], get["port"]) == port, probe
        assert get["path"] == "/metrics"
        # vswitchd serves metrics on 127.0.0.1; the kubelet probes from the node's namespace
        assert get["host"] == "127.0.0.1"
    ann = ds["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/port"] == str(port) and ann["prometheus.io/path"] == "/metrics"


def test_configmap_keys_are_the_ones_read(ds, cm):
    read = {e["valueFrom"]["configMapKeyRef"]["key"]
            for c in km.pod_spec(ds)["initContainers"] + km.pod_spec(ds)["containers"]
            for e in c.get("env", []) if "configMapKeyRef" in e.get("valueFrom", {})}
    assert read <= set(cm["data"]), f"keys read but missing: {read - set(cm['data'])}"
    assert set(cm["data"]) - read == INFORMATIONAL_KEYS


def test_mounts_are_the_justified_ones(ds):
    daemon = km.host_mounts(ds, km.container(ds, "vswitchd"))
    assert {m["mount_path"] for m in daemon} == DAEMON_MOUNTS
    for m in daemon:
        # same path inside and out: the plugin on the node reads the socket path from the
        # network list, the runtime passes netns paths of the node
        assert m["host_path"] == m["mount_path"], m
    netns = next(m for m in daemon if m["mount_path"] == "/run/netns")
    assert netns["propagation"] == "HostToContainer"
    init = km.host_mounts(ds, km.container(ds, "install-cni"))
    assert {m["host_path"]: m["read_only"] for m in init} == {
        "/opt/cni/bin": False, "/etc/cni/net.d": False, "/usr": True}
    root = km.option(km.container(ds, "install-cni")["command"], "--host-root")
    for m in init:            # the node's root as install-cni sees it: --host-root
        assert m["mount_path"] == root + m["host_path"], m
    used = {m["name"] for m in daemon + init}
    assert used == {v["name"] for v in km.pod_spec(ds)["volumes"]}, "a volume nobody mounts"


def test_init_container_installs_a_network_list_for_this_daemon(ds, cm, tmp_path):
    """The init container's command, run for real with its mounts replaced by temp dirs."""
    init = km.container(ds, "install-cni")
    cmd = km.expand(init["command"] + init.get("args", []), km.env_of(init, cm, NODE))
    assert cmd[:2] == ["vswitchctl", "install-cni"]
    # the node's root is tmp_path (its /usr: the real one, for the python3 check)
    os.symlink("/usr", tmp_path / "usr")
    root = km.option(cmd, "--host-root")
    mounts = {m["mount_path"]: str(tmp_path / m["host_path"].strip("/")) for m in km.host_mounts(ds, init)}
    mounts[root] = str(tmp_path)
    cmd = [mounts.get(w, w) for w in cmd]
    # the daemon is not running yet when the init container runs: a socket nobody serves
    cmd = [sys.executable, "-m", "vswitch.cli", *cmd[1:]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    conf_dir = tmp_path / "etc/cni/net.d"
    lists = sorted(p for p in os.listdir(conf_dir) if p.endswith(".conflist"))
    assert len(lists) == 1, lists
    conf = json.loads((conf_dir / lists[0]).read_text())
    plugin = conf["plugins"][0]
    assert plugin["type"] == "vswitch"
    assert os.access(tmp_path / "opt/cni/bin/vswitch", os.X_OK)
    daemon_socket = km.option(_vswitchd_args(ds, cm), "--socket")
    assert plugin["socket"] == daemon_socket
    assert plugin["ipam"]["ranges"][0][0]["subnet"] == "usePodCidr"


def test_entrypoint_defaults_are_vswitchds(monkeypatch):
    seen = _parse_with_vswitchd(monkeypatch, [])
    assert seen["state_dir"] == entrypoint.DEFAULT_STATE_DIR
    assert seen["switch"] == entrypoint.DEFAULT_SWITCH
    assert entrypoint.daemon_paths(["--state-dir", "/x", "--switch", "sw1", "--uplink", "eth0"]) == ("/x", "sw1")


def test_containerfile_and_build_script_make_the_same_entry_points():
    """Containerfile (registry users) and scripts/build-image.sh (here) agree on what runs."""
    cf = open(os.path.join(km.REPO, "Containerfile")).read()
    script = open(os.path.join(km.REPO, "scripts/build-image.sh")).read()
    assert 'ENTRYPOINT ["/usr/local/bin/vswitch-entrypoint"]' in cf
    assert "--entrypoint '[\"/usr/local/bin/vswitch-entrypoint\"]' --cmd vswitchd" in script
    assert 'CMD ["vswitchd"]' in cf
    for text in (cf, script):
        assert "-m vswitch.daemon.entrypoint" in text
        assert "--system-site-packages /opt/vswitch" in text
