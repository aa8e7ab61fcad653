"""Conformance against a real vswitchd: result shapes, ADD/DEL rules, rollback, CHECK, GC.

Every test runs the installed plugin executable with env vars and stdin like a runtime,
against vswitchd (started with --test-faults) in a node namespace the fixture created,
with pod namespaces created per test and host-local (Debian) as IPAM. After each pod is
removed, ``assert_gone`` checks that nothing of it is left: no attachment in the daemon,
no hostPort rule, no address reserved in host-local, no interface in the pod namespace,
nothing but ``lo`` and the host port in the node namespace.
"""
import concurrent.futures
import json
import os

import pytest

from cnitest import Netns, links_in, netconf, nsexec, reservations

pytestmark = pytest.mark.integration

DAEMON_STEPS = ("tap_create", "netns_move", "link_config", "addresses", "routes",
                "switch_port", "hostports", "shaper", "state_save")
VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")


@pytest.fixture
def net(node, net_name, hl_dir):
    """A network of this test on the shared node: ``conf(**extra)`` builds its config.

    All tests of the shared node use the node's one subnet: the daemon keeps a gateway
    address on its host port per subnet (at most 8).
    """
    subnet = node.subnet
    class Net:
        name = net_name
        data_dir = hl_dir

        @staticmethod
        def conf(version="1.0.0", **extra):
            return netconf(net_name, subnet, hl_dir, version=version, socket=node.socket,
                           **extra)
    return Net


def assert_gone(node, net, cid, pod_ns=None, ip=None):
    atts = [a for a in node.attachments() if a["container_id"] == cid]
    assert atts == [], atts
    if ip:
        assert all(r["pod_ip"] != ip for r in node.hostports())
    assert reservations(net.data_dir, net.name) == []
    if pod_ns and os.path.exists(Netns.path(pod_ns)):
        assert set(links_in(pod_ns)) == {"lo"}, links_in(pod_ns)
    node_links = set(links_in(node.ns))
    assert node_links <= {"lo", "vsw0"}, node_links


def add_ok(runner, conf, cid, pod_ns, **kw):
    o = runner.run("ADD", conf, cid=cid, netns=Netns.path(pod_ns), **kw)
    assert o.rc == 0, o
    return o.out


# ---------------------------------------------------------------- ADD / DEL and shapes

@pytest.mark.parametrize("version", VERSIONS)
def test_add_result_shape_per_version_then_del(runner, node, net, pods, version):
    pod = pods.new()
    conf = net.conf(version)
    out = add_ok(runner, conf, "shape1", pod)
    assert out["cniVersion"] == version
    host, itf = out["interfaces"]
    assert "sandbox" not in host and host["name"] and host["mac"]
    assert itf["name"] == "eth0" and itf["sandbox"] == Netns.path(pod)
    assert ("mtu" in itf) == (version == "1.1.0")
    assert len(out["ips"]) == 1
    ip = out["ips"][0]
    assert ip["interface"] == 1 and ip["gateway"]
    assert ("version" in ip) == (version < "1.0.0")
    if "version" in ip:
        assert ip["version"] == "4"
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": ip["gateway"]}]
    assert "dns" in out
    # what the result says is what the pod has
    link = links_in(pod)["eth0"]
    assert link["address"] == itf["mac"] and "UP" in link["flags"]
    addrs = nsexec(pod, "ip", "-j", "addr", "show", "eth0").stdout
    assert ip["address"].split("/")[0] in addrs
    assert f"default via {ip['gateway']}" in nsexec(pod, "ip", "route").stdout
    assert "UP" in links_in(pod)["lo"]["flags"]
    o = runner.run("DEL", dict(conf, prevResult=out), cid="shape1", netns=Netns.path(pod))
    assert o.rc == 0 and o.stdout == "", o
    assert_gone(node, net, "shape1", pod)


def test_two_pods_reach_each_other(runner, node, net, pods):
    a, b = pods.new("a"), pods.new("b")
    ra = add_ok(runner, net.conf(), "pinga", a)
    rb = add_ok(runner, net.conf(), "pingb", b)
    ip_b = rb["ips"][0]["address"].split("/")[0]
    r = nsexec(a, "ping", "-c", "2", "-i", "0.2", "-W", "2", ip_b, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    for cid, ns, res in (("pinga", a, ra), ("pingb", b, rb)):
        assert runner.run("DEL", net.conf(), cid=cid, netns=Netns.path(ns)).rc == 0
    assert_gone(node, net, "pinga", a)


def test_ip_masq_sets_up_masquerade_and_del_removes_it(runner, node, net, pods):
    """ipMasq=true reaches the daemon: its nftables table masquerades the pod's subnet
    while the pod exists; a pod without ipMasq creates nothing; DEL removes the table."""
    def masq_table():
        return nsexec(node.ns, "nft", "list", "table", "ip", "vswitch_masq", check=False)
    plain, masq = pods.new("p"), pods.new("m")
    add_ok(runner, net.conf(), "nomasq1", plain)
    assert masq_table().returncode != 0, masq_table().stdout
    add_ok(runner, net.conf(ipMasq=True), "masq1", masq)
    att, = [a for a in node.attachments() if a["container_id"] == "masq1"]
    assert att["ip_masq"] is True
    t = masq_table()
    assert t.returncode == 0, t.stderr
    assert f"ip saddr {node.subnet} ip daddr != {node.subnet} masquerade" in t.stdout, t.stdout
    o = runner.run("DEL", net.conf(ipMasq=True), cid="masq1", netns=Netns.path(masq))
    assert o.rc == 0, o
    assert masq_table().returncode != 0, masq_table().stdout
    assert "vswitch_masq" not in nsexec(node.ns, "nft", "list", "tables").stdout
    assert runner.run("DEL", net.conf(), cid="nomasq1", netns=Netns.path(plain)).rc == 0
    assert_gone(node, net, "masq1", masq)
    assert_gone(node, net, "nomasq1", plain)


def test_ip_masq_not_a_bool_is_7(runner, node, net, pods):
    pod = pods.new()
    o = runner.run("ADD", net.conf(ipMasq="true"), cid="badmasq1", netns=Netns.path(pod))
    assert o.rc != 0 and o.code == 7 and "ipMasq" in o.out["msg"], o
    assert_gone(node, net, "badmasq1", pod)


def test_add_fails_when_ifname_exists_and_releases(runner, node, net, pods):
    pod = pods.new()
    nsexec(pod, "ip", "tuntap", "add", "dev", "eth0", "mode", "tap")
    o = runner.run("ADD", net.conf(), cid="exists1", netns=Netns.path(pod))
    assert o.rc != 0 and o.code == 102, o
    assert "eth0" in o.out["msg"]
    assert reservations(net.data_dir, net.name) == []
    assert [a for a in node.attachments() if a["container_id"] == "exists1"] == []
    assert "eth0" in links_in(pod)          # not ours: left alone


def test_del_is_idempotent_in_every_form(runner, node, net, pods):
    pod = pods.new()
    conf = net.conf()
    out = add_ok(runner, conf, "del1", pod)
    path = Netns.path(pod)
    assert runner.run("DEL", dict(conf, prevResult=out), cid="del1", netns=path).rc == 0
    assert runner.run("DEL", conf, cid="del1", netns=path).rc == 0            # twice
    assert runner.run("DEL", conf, cid="del1", netns="").rc == 0              # no netns
    assert runner.run("DEL", conf, cid="del1", netns=None).rc == 0            # unset
    assert_gone(node, net, "del1", pod)


def test_del_after_the_namespace_was_deleted(runner, fresh_node, pods, tmp_path, net_name,
                                            subnet):
    node = fresh_node          # its own daemon: a failure here must not leak into others
    conf = netconf(net_name, subnet, tmp_path / "hl", socket=node.socket)
    pod = pods.new()
    add_ok(runner, conf, "del2", pod)
    pods.delete(pod)
    o = runner.run("DEL", conf, cid="del2", netns=Netns.path(pod))
    assert o.rc == 0, o
    assert runner.run("DEL", conf, cid="del2", netns=Netns.path(pod)).rc == 0
    assert node.attachments() == []
    assert reservations(tmp_path / "hl", net_name) == []


# ---------------------------------------------------------------- rollback

@pytest.mark.parametrize("step", DAEMON_STEPS)
def test_rollback_at_every_daemon_step(runner, node, net, pods, step):
    pod = pods.new()
    conf = net.conf(runtimeConfig={
        "portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 10**7, "ingressBurst": 10**6}})
    o = runner.run("ADD", conf, cid=f"rb-{step}", netns=Netns.path(pod),
                   VSWITCH_CNI_TEST_FAULT=step)
    assert o.rc != 0 and o.code == 107, o
    assert step in o.out["msg"]
    assert_gone(node, net, f"rb-{step}", pod)
    # and the same pod can be added afterwards
    add_ok(runner, conf, f"rb-{step}", pod)
    assert runner.run("DEL", conf, cid=f"rb-{step}", netns=Netns.path(pod)).rc == 0
    assert_gone(node, net, f"rb-{step}", pod)


@pytest.mark.parametrize("step", ["after_ipam", "after_attach"])
def test_rollback_at_plugin_steps(runner, node, net, pods, step):
    pod = pods.new()
    conf = net.conf(runtimeConfig={
        "portMappings": [{"hostPort": 18081, "containerPort": 80}]})
    o = runner.run("ADD", conf, cid=f"rp-{step}", netns=Netns.path(pod),
                   VSWITCH_CNI_TEST_FAULT=step)
    assert o.rc != 0 and o.code == 116, o
    assert_gone(node, net, f"rp-{step}", pod, ip=None)


def test_daemon_error_reply_rolls_back_ipam(runner, node, net, pods):
    # an MTU the plugin passes on (68..65535) but the daemon refuses (above 65521)
    pod = pods.new()
    o = runner.run("ADD", net.conf(mtu=65530), cid="derr1", netns=Netns.path(pod))
    assert o.rc != 0 and o.code == 4 and "vswitchd attach" in o.out["msg"], o
    assert_gone(node, net, "derr1", pod)


# ---------------------------------------------------------------- runtimeConfig, CNI_ARGS

def test_runtime_config_as_containerd_sends_it(runner, node, net, pods):
    pod = pods.new()
    conf = net.conf(runtimeConfig={
        "portMappings": [
            {"HostPort": 18090, "ContainerPort": 80, "Protocol": "tcp", "HostIP": ""},
            {"HostPort": 18091, "ContainerPort": 53, "Protocol": "udp", "HostIP": ""},
            {"HostPort": 18092, "ContainerPort": 80, "Protocol": "tcp", "HostIP": "fd00::1"}],
        "bandwidth": {"IngressRate": 20_000_000, "IngressBurst": 4294967295,
                      "EgressRate": 10_000_000, "EgressBurst": 4294967295},
        "mac": "02:42:ac:11:00:09"})
    out = add_ok(runner, conf, "rc1", pod,
                 args="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;"
                      "K8S_POD_INFRA_CONTAINER_ID=rc1;K8S_POD_UID=u-1")
    ip = out["ips"][0]["address"].split("/")[0]
    assert out["interfaces"][1]["mac"] == "02:42:ac:11:00:09"
    assert links_in(pod)["eth0"]["address"] == "02:42:ac:11:00:09"
    rules = sorted((r["protocol"], r["host_port"], r["container_port"])
                   for r in node.hostports() if r["pod_ip"] == ip)
    assert rules == [("tcp", 18090, 80), ("udp", 18091, 53)]   # the IPv6 one skipped
    att = [a for a in node.attachments() if a["container_id"] == "rc1"][0]
    assert att["bandwidth"]["ingressRate"] == 20_000_000
    assert att["bandwidth"]["egressRate"] == 10_000_000
    assert att["pod"] == {"namespace": "default", "name": "web", "uid": "u-1"}
    o = runner.run("CHECK", dict(conf, prevResult=out), cid="rc1", netns=Netns.path(pod))
    assert o.rc == 0, o
    assert runner.run("DEL", conf, cid="rc1", netns=Netns.path(pod)).rc == 0
    assert_gone(node, net, "rc1", pod, ip)


def test_bandwidth_from_pod_annotations(runner, node, net, pods):
    pod = pods.new()
    conf = net.conf(runtimeConfig={"io.kubernetes.cri.pod-annotations": {
        "kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "1Mi"}})
    add_ok(runner, conf, "ann1", pod)
    att = [a for a in node.attachments() if a["container_id"] == "ann1"][0]
    assert att["bandwidth"]["ingressRate"] == 10_000_000
    assert att["bandwidth"]["egressRate"] == 1 << 20
    assert runner.run("DEL", conf, cid="ann1", netns=Netns.path(pod)).rc == 0
    assert_gone(node, net, "ann1", pod)


def test_cni_args_mac_and_ip(runner, node, net, pods):
    pod = pods.new()
    want_ip = node.subnet.replace(".0/24", ".77")
    out = add_ok(runner, net.conf(), "args1", pod,
                 args=f"IgnoreUnknown=1;MAC=02:00:00:aa:bb:cc;IP={want_ip}")
    assert out["ips"][0]["address"] == f"{want_ip}/24"
    assert out["interfaces"][1]["mac"] == "02:00:00:aa:bb:cc"
    assert runner.run("DEL", net.conf(), cid="args1", netns=Netns.path(pod)).rc == 0
    assert_gone(node, net, "args1", pod)


def test_runtime_config_ips(runner, node, net, pods):
    pod = pods.new()
    want_ip = node.subnet.replace(".0/24", ".99")
    conf = net.conf(runtimeConfig={"ips": [f"{want_ip}/24"]})
    out = add_ok(runner, conf, "ips1", pod)
    assert out["ips"][0]["address"] == f"{want_ip}/24"
    assert runner.run("DEL", conf, cid="ips1", netns=Netns.path(pod)).rc == 0
    assert_gone(node, net, "ips1", pod)


def test_chained_after_another_plugin(runner, node, net, pods):
    pod = pods.new()
    prev = {"cniVersion": "1.0.0",
            "interfaces": [{"name": "other0", "mac": "02:00:00:00:00:10"},
                           {"name": "net9", "sandbox": Netns.path(pod)}],
            "ips": [{"address": "192.168.7.2/24", "interface": 1}],
            "routes": [{"dst": "192.168.0.0/16"}], "dns": {"nameservers": ["192.168.7.1"]}}
    conf = net.conf(prevResult=prev)
    out = add_ok(runner, conf, "chain1", pod)
    assert [i["name"] for i in out["interfaces"]][:2] == ["other0", "net9"]
    assert out["interfaces"][3]["name"] == "eth0"
    assert out["ips"][0] == {"address": "192.168.7.2/24", "interface": 1}
    assert out["ips"][1]["interface"] == 3
    assert out["routes"][0] == {"dst": "192.168.0.0/16"}
    assert out["dns"] == {"nameservers": ["192.168.7.1"]}
    o = runner.run("CHECK", dict(net.conf(), prevResult=out), cid="chain1",
                   netns=Netns.path(pod))
    assert o.rc == 0, o
    assert runner.run("DEL", dict(net.conf(), prevResult=out), cid="chain1",
                      netns=Netns.path(pod)).rc == 0
    assert_gone(node, net, "chain1", pod)


# ---------------------------------------------------------------- CHECK

def _tamper_mac(pod, out):
    nsexec(pod, "ip", "link", "set", "eth0", "address", "02:00:00:00:de:ad")


def _tamper_addr(pod, out):
    nsexec(pod, "ip", "addr", "del", out["ips"][0]["address"], "dev", "eth0")


def _tamper_route(pod, out):
    nsexec(pod, "ip", "route", "del", "default")


def _tamper_down(pod, out):
    nsexec(pod, "ip", "link", "set", "eth0", "down")


def _tamper_gone(pod, out):
    nsexec(pod, "ip", "link", "del", "eth0")


@pytest.mark.parametrize("tamper,words", [
    (_tamper_mac, "mac"), (_tamper_addr, "address"), (_tamper_route, "route"),
    (_tamper_down, "down"), (_tamper_gone, "missing")])
def test_check_catches_tampering(runner, fresh_node, pods, tmp_path, net_name, subnet,
                                 tamper, words):
    node = fresh_node          # its own daemon: a DEL failing after tampering stays here
    conf = netconf(net_name, subnet, tmp_path / "hl", version="1.1.0", socket=node.socket)
    pod = pods.new()
    out = add_ok(runner, conf, "chk1", pod)
    checked = dict(conf, prevResult=out)
    o = runner.run("CHECK", checked, cid="chk1", netns=Netns.path(pod))
    assert o.rc == 0 and o.stdout == "", o
    tamper(pod, out)
    o = runner.run("CHECK", checked, cid="chk1", netns=Netns.path(pod))
    assert o.rc != 0 and o.code == 104, o
    assert words in o.out["msg"]
    o = runner.run("DEL", conf, cid="chk1", netns=Netns.path(pod))
    assert o.rc == 0, o
    assert node.attachments() == []
    assert reservations(tmp_path / "hl", net_name) == []
    assert set(links_in(pod)) == {"lo"}


def test_check_catches_shaper_and_hostport_changes(runner, node, net, pods):
    pod = pods.new()
    rc = {"portMappings": [{"hostPort": 18100, "containerPort": 80}],
          "bandwidth": {"ingressRate": 10**7, "ingressBurst": 10**6}}
    conf = net.conf(runtimeConfig=rc)
    out = add_ok(runner, conf, "chk2", pod)
    assert runner.run("CHECK", dict(conf, prevResult=out), cid="chk2",
                      netns=Netns.path(pod)).rc == 0
    other_bw = net.conf(runtimeConfig=dict(rc, bandwidth={"ingressRate": 2 * 10**7,
                                                          "ingressBurst": 10**6}))
    o = runner.run("CHECK", dict(other_bw, prevResult=out), cid="chk2", netns=Netns.path(pod))
    assert o.code == 104 and "bandwidth" in o.out["msg"], o
    other_pm = net.conf(runtimeConfig=dict(rc, portMappings=[{"hostPort": 18101,
                                                              "containerPort": 80}]))
    o = runner.run("CHECK", dict(other_pm, prevResult=out), cid="chk2", netns=Netns.path(pod))
    assert o.code == 104 and "port_mappings" in o.out["msg"], o
    assert runner.run("DEL", conf, cid="chk2", netns=Netns.path(pod)).rc == 0
    assert_gone(node, net, "chk2", pod)


def test_check_catches_a_lost_ip_reservation(runner, node, net, pods):
    pod = pods.new()
    conf = net.conf()
    out = add_ok(runner, conf, "chk3", pod)
    ip = out["ips"][0]["address"].split("/")[0]
    os.unlink(net.data_dir / net.name / ip)
    o = runner.run("CHECK", dict(conf, prevResult=out), cid="chk3", netns=Netns.path(pod))
    assert o.rc != 0 and "host-local" in o.out["msg"], o
    assert runner.run("DEL", conf, cid="chk3", netns=Netns.path(pod)).rc == 0
    assert_gone(node, net, "chk3", pod)


# ---------------------------------------------------------------- GC and STATUS

@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_removes_everything_not_valid(runner, node, net, pods, key):
    nss = {cid: pods.new() for cid in ("gc-keep", "gc-a", "gc-b")}
    ips = {cid: add_ok(runner, net.conf(), cid, ns, )["ips"][0]["address"].split("/")[0]
           for cid, ns in nss.items()}
    conf = net.conf("1.1.0")
    conf[key] = [{"containerID": "gc-keep", "ifname": "eth0"}]
    o = runner.run("GC", conf)
    assert o.rc == 0 and o.stdout == "", o
    assert [a["container_id"] for a in node.attachments()] == ["gc-keep"]
    assert reservations(net.data_dir, net.name) == [ips["gc-keep"]]
    for cid in ("gc-a", "gc-b"):
        assert set(links_in(nss[cid])) == {"lo"}
    assert "eth0" in links_in(nss["gc-keep"])
    assert runner.run("DEL", net.conf(), cid="gc-keep", netns=Netns.path(nss["gc-keep"])).rc == 0
    assert_gone(node, net, "gc-keep", nss["gc-keep"])


def test_gc_keeps_other_networks(runner, node, net, pods, tmp_path):
    other = netconf("othernet", "10.251.3.0/24", tmp_path / "hl2", socket=node.socket)
    pod_other, pod_mine = pods.new(), pods.new()
    add_ok(runner, other, "gc-other", pod_other)
    add_ok(runner, net.conf(), "gc-mine", pod_mine)
    conf = dict(net.conf("1.1.0"), **{"cni.dev/valid-attachments": []})
    assert runner.run("GC", conf).rc == 0
    assert [a["container_id"] for a in node.attachments()] == ["gc-other"]
    assert runner.run("DEL", other, cid="gc-other", netns=Netns.path(pod_other)).rc == 0
    assert_gone(node, net, "gc-mine", pod_mine)


def test_status_ok_when_daemon_up(runner, node, net):
    o = runner.run("STATUS", net.conf("1.1.0"))
    assert o.rc == 0 and o.stdout == "", o


def test_del_while_daemon_down_releases_then_gc_cleans(runner, fresh_node, pods, tmp_path,
                                                       net_name, subnet):
    node = fresh_node
    conf = netconf(net_name, subnet, tmp_path / "hl", socket=node.socket)
    pod = pods.new()
    add_ok(runner, conf, "down1", pod)
    node.stop()
    o = runner.run("DEL", conf, cid="down1", netns=Netns.path(pod))
    assert o.rc == 0, o
    assert reservations(tmp_path / "hl", net_name) == []
    o = runner.run("ADD", conf, cid="down2", netns=Netns.path(pods.new()))
    assert o.code == 11, o
    assert reservations(tmp_path / "hl", net_name) == []
    node.start()                       # re-adopts down1, which the runtime deleted
    assert [a["container_id"] for a in node.attachments()] == ["down1"]
    gc = dict(conf, cniVersion="1.1.0", **{"cni.dev/valid-attachments": []})
    assert runner.run("GC", gc).rc == 0
    assert node.attachments() == []
    assert set(links_in(pod)) == {"lo"}


# ---------------------------------------------------------------- concurrency

@pytest.mark.slow
def test_50_parallel_adds_then_50_parallel_dels(runner, node, net, pods):
    n = 50
    nss = [pods.new("c") for _ in range(n)]
    conf = net.conf()

    def add(i):
        return runner.run("ADD", conf, cid=f"par{i}", netns=Netns.path(nss[i]),
                          args=f"IgnoreUnknown=1;K8S_POD_NAME=p{i}")

    def delete(i):
        return runner.run("DEL", conf, cid=f"par{i}", netns=Netns.path(nss[i]))

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        adds = list(pool.map(add, range(n)))
    failed = [o for o in adds if o.rc != 0]
    assert failed == [], failed[:3]
    ips = [o.out["ips"][0]["address"] for o in adds]
    assert len(set(ips)) == n
    assert len(node.attachments()) >= n
    assert len(reservations(net.data_dir, net.name)) == n
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        dels = list(pool.map(delete, range(n)))
    assert [o for o in dels if o.rc != 0] == []
    assert [a for a in node.attachments() if a["container_id"].startswith("par")] == []
    assert reservations(net.data_dir, net.name) == []
    for ns in nss:
        assert set(links_in(ns)) == {"lo"}
    assert set(links_in(node.ns)) <= {"lo", "vsw0"}


def test_installed_conflist_is_usable(runner, node, tmp_path, pods):
    from vswitch_cni.install import install
    _, conf_path = install(str(tmp_path / "bin"), str(tmp_path / "net.d"),
                           socket_path=node.socket, subnet="10.252.9.0/24", name="inst")
    conflist = json.loads(open(conf_path).read())
    plugin = dict(conflist["plugins"][0], cniVersion=conflist["cniVersion"],
                  name=conflist["name"])
    plugin["ipam"]["dataDir"] = str(tmp_path / "hl")
    pod = pods.new()
    out = add_ok(runner, plugin, "inst1", pod)
    assert out["ips"][0]["address"].startswith("10.252.9.")
    assert runner.run("DEL", plugin, cid="inst1", netns=Netns.path(pod)).rc == 0
    assert reservations(tmp_path / "hl", "inst") == []
