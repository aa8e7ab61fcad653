"""Unit tests of cni/conf.py: environment, version and configuration validation.

Pure and fast: no process, no kernel. The black-box suite (test_conformance.py) checks
the same rules through the executable; these pin the messages and edge cases.
"""
import json

import pytest

from vswitch_cni import conf as c
from vswitch_cni.errors import CniError

BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "ctr1", "CNI_NETNS": "/var/run/netns/x",
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin:/usr/lib/cni"}


def env_of(**kw):
    e = dict(BASE_ENV)
    for k, v in kw.items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return c.parse_env(e)


def code_of(fn, *args, **kw):
    with pytest.raises(CniError) as info:
        fn(*args, **kw)
    return info.value


def netconf(extra=None, command="ADD", **env_kw):
    obj = {"cniVersion": "1.0.0", "name": "net1", "type": "vswitch",
           "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"}}
    obj.update(extra or {})
    env = env_of(CNI_COMMAND=command, **env_kw)
    c.check_version(obj, command)
    return c.parse_netconf(obj, env)


# ---------------------------------------------------------------- environment

def test_every_missing_variable_is_named_in_one_message():
    err = code_of(c.parse_env, {"CNI_COMMAND": "ADD"})
    assert err.code == 4
    for name in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"):
        assert name in err.msg


def test_missing_command_is_4():
    err = code_of(c.parse_env, {})
    assert err.code == 4 and "CNI_COMMAND" in err.msg


def test_del_needs_no_netns_and_gc_status_need_only_path():
    assert env_of(CNI_COMMAND="DEL", CNI_NETNS=None).netns == ""
    for cmd in ("GC", "STATUS"):
        env = c.parse_env({"CNI_COMMAND": cmd, "CNI_PATH": "/x"})
        assert env.path == ["/x"]
        err = code_of(c.parse_env, {"CNI_COMMAND": cmd})
        assert err.code == 4 and "CNI_PATH" in err.msg


def test_unknown_command_is_4():
    err = code_of(c.parse_env, dict(BASE_ENV, CNI_COMMAND="GET"))
    assert err.code == 4 and "'GET'" in err.msg


@pytest.mark.parametrize("ifname", ["x" * 16, ".", "..", "a/b", "a:b", "a b", "eth\t0",
                                    "eth0\n", "äääääääää"])
def test_invalid_ifname_is_4(ifname):
    err = code_of(env_of, CNI_IFNAME=ifname)
    assert err.code == 4 and "CNI_IFNAME" in err.msg


@pytest.mark.parametrize("ifname", ["eth0", "x" * 15, "net-1.2", "a"])
def test_valid_ifname(ifname):
    assert env_of(CNI_IFNAME=ifname).ifname == ifname


@pytest.mark.parametrize("cid", ["-abc", ".abc", "a b", "abc/def", "a;b", "ä1"])
def test_invalid_container_id_is_4(cid):
    err = code_of(env_of, CNI_CONTAINERID=cid)
    assert err.code == 4 and "CNI_CONTAINERID" in err.msg and repr(cid) in err.msg


def test_valid_container_id():
    assert env_of(CNI_CONTAINERID="a.b-c_d9").container_id == "a.b-c_d9"


def test_cni_args_known_keys():
    env = env_of(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;"
                          "K8S_POD_INFRA_CONTAINER_ID=ctr1;K8S_POD_UID=u1;FOO=bar;")
    assert env.cni_args["K8S_POD_NAME"] == "p"
    assert "FOO" not in env.cni_args


def test_cni_args_unknown_key_without_ignore_unknown_is_4():
    err = code_of(env_of, CNI_ARGS="FOO=bar")
    assert err.code == 4 and "FOO='bar'" in err.msg


def test_cni_args_ignore_unknown_false_does_not_ignore():
    assert code_of(env_of, CNI_ARGS="IgnoreUnknown=0;FOO=bar").code == 4


def test_cni_args_bad_pair_is_4():
    err = code_of(env_of, CNI_ARGS="IgnoreUnknown=1;justakey")
    assert err.code == 4 and "'justakey'" in err.msg


# ---------------------------------------------------------------- stdin and version

def test_not_json_is_6():
    assert code_of(c.load_stdin, b"{not json").code == 6
    assert code_of(c.load_stdin, b"[1, 2]").code == 6


def test_missing_or_invalid_name_is_7():
    assert code_of(c.load_stdin, b'{"cniVersion": "1.0.0"}').code == 7
    err = code_of(c.load_stdin, b'{"name": "bad name"}')
    assert err.code == 7 and "'bad name'" in err.msg


def test_missing_version_means_0_1_0_and_is_unsupported():
    err = code_of(c.check_version, {"name": "n"}, "ADD")
    assert err.code == 1 and "0.1.0" in err.msg


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "2.0.0", "1.0", "latest"])
def test_unsupported_version_is_1(version):
    assert code_of(c.check_version, {"cniVersion": version}, "ADD").code == 1


def test_non_string_version_is_7():
    assert code_of(c.check_version, {"cniVersion": 1.0}, "ADD").code == 7


@pytest.mark.parametrize("command,version", [("CHECK", "0.3.1"), ("CHECK", "0.3.0"),
                                             ("GC", "1.0.0"), ("STATUS", "1.0.0"),
                                             ("GC", "0.4.0")])
def test_command_below_its_version_is_1(command, version):
    err = code_of(c.check_version, {"cniVersion": version}, command)
    assert err.code == 1 and command in err.msg


@pytest.mark.parametrize("version", c.SUPPORTED_VERSIONS)
def test_supported_versions_accepted_for_add(version):
    assert c.check_version({"cniVersion": version}, "ADD") == version


# ---------------------------------------------------------------- configuration

def test_defaults():
    conf = netconf()
    assert conf.mtu == 1500 and conf.socket_path == c.DEFAULT_SOCKET
    assert conf.ipam_type == "host-local" and conf.bandwidth is None
    assert conf.port_mappings == () and conf.mac is None


def test_unsupported_field_is_2_naming_key_and_value():
    err = code_of(netconf, {"hairpinMode": True})
    assert err.code == 2 and "hairpinMode=true" in err.msg


def test_del_is_permissive_about_fields_it_does_not_use():
    conf = netconf({"hairpinMode": True, "mtu": "big",
                    "runtimeConfig": {"portMappings": "junk"}}, command="DEL")
    assert conf.ipam_type == "host-local"


@pytest.mark.parametrize("mtu", [0, 67, 65536, "1500", 1500.5, True, -1])
def test_bad_mtu_is_7(mtu):
    err = code_of(netconf, {"mtu": mtu})
    assert err.code == 7 and "mtu" in err.msg


@pytest.mark.parametrize("ipam", [None, {}, {"type": ""}, "host-local", {"type": "../x"}])
def test_bad_ipam_is_7(ipam):
    obj = {} if ipam is None else {"ipam": ipam}
    base = {"cniVersion": "1.0.0", "name": "n", "type": "vswitch"}
    base.update(obj)
    err = code_of(c.parse_netconf, base, env_of())
    assert err.code == 7 and "ipam" in err.msg


def test_relative_socket_is_7():
    assert code_of(netconf, {"socket": "vswitchd.sock"}).code == 7


def test_port_mappings_camel_case_and_go_field_names():
    conf = netconf({"runtimeConfig": {"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"HostPort": 5353, "ContainerPort": 53, "Protocol": "UDP", "HostIP": "0:0::1"},
        {"hostPort": 9090, "containerPort": 90}]}})
    wire = [pm.to_cni() for pm in conf.port_mappings]     # what the daemon is sent
    assert wire == [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "::1"},
        {"hostPort": 9090, "containerPort": 90, "protocol": "tcp"}]
    assert conf.port_mappings[1].family() == 6 and conf.port_mappings[0].family() is None


def test_wildcard_host_ip_keeps_its_family():
    # "0.0.0.0" is every node address, but of IPv4 only (portmap skips it for a pod
    # without IPv4); "" names no family
    conf = netconf({"runtimeConfig": {"portMappings": [
        {"hostPort": 80, "containerPort": 80, "hostIP": "0.0.0.0"},
        {"hostPort": 81, "containerPort": 80, "hostIP": "::"},
        {"hostPort": 82, "containerPort": 80, "hostIP": ""}]}})
    assert [pm.host_ip for pm in conf.port_mappings] == [None, None, None]
    assert [pm.family() for pm in conf.port_mappings] == [4, 6, None]


def test_port_mapping_messages_name_the_runtime_key():
    err = code_of(netconf, {"runtimeConfig": {"portMappings": [
        {"hostPort": 80, "containerPort": 80}, {"HostPort": 0, "containerPort": 80}]}})
    assert err.msg == ("runtimeConfig.portMappings[1].hostPort: 0 is invalid; expected a "
                       "port 1..65535")
    err = code_of(netconf, {"runtimeConfig": {"portMappings": [{"hostPort": 80}]}})
    assert err.msg == ('runtimeConfig.portMappings[0].containerPort is missing in '
                       '{"hostPort":80}')
    err = code_of(netconf, {"runtimeConfig": {"portMappings": [
        {"hostPort": 80, "containerPort": 80, "protocol": "SCTP"}]}})
    assert (err.code, err.msg) == (2, 'unsupported field runtimeConfig.portMappings[0].'
                                      'protocol="SCTP": vswitch maps tcp and udp')


def test_unknown_keys_inside_entries_are_ignored_like_go():
    # runtimes marshal structs with fields we do not use; Go's encoding/json ignores them
    conf = netconf({"runtimeConfig": {
        "portMappings": [{"hostPort": 80, "containerPort": 80, "podName": "x"}],
        "bandwidth": {"ingressRate": 1000, "ingressBurst": 2000, "qdisc": "tbf"}}})
    assert conf.port_mappings[0].host_port == 80
    assert conf.bandwidth.ingress_rate_bps == 1000


def test_ip_masq_is_a_bool():
    assert netconf().ip_masq is False
    assert netconf({"ipMasq": True}).ip_masq is True
    err = code_of(netconf, {"ipMasq": "yes"})
    assert err.code == 7 and "ipMasq" in err.msg and "'yes'" in err.msg


def test_annotation_burst_stays_within_the_largest_burst():
    conf = netconf({"runtimeConfig": {c.POD_ANNOTATIONS_KEY: {c.INGRESS_ANNOTATION: "1P"}}})
    assert conf.bandwidth.ingress_rate_bps == 10 ** 15
    assert conf.bandwidth.ingress_burst_bits == 8 << 32      # 2^32 bytes, not 10^14 bits


@pytest.mark.parametrize("mapping,word", [
    ({"hostPort": 0, "containerPort": 80}, "hostPort"),
    ({"hostPort": 70000, "containerPort": 80}, "hostPort"),
    ({"hostPort": 80}, "containerPort"),
    ({"hostPort": "80", "containerPort": 80}, "hostPort"),
    ({"hostPort": 80, "containerPort": 80, "hostIP": "1.2.3"}, "hostIP"),
    ({"hostPort": 80, "containerPort": 80, "protocol": 6}, "protocol"),
])
def test_bad_port_mapping_is_7_naming_the_key(mapping, word):
    err = code_of(netconf, {"runtimeConfig": {"portMappings": [mapping]}})
    assert err.code == 7 and word in err.msg


def test_sctp_is_unsupported_2():
    err = code_of(netconf, {"runtimeConfig": {"portMappings": [
        {"hostPort": 80, "containerPort": 80, "protocol": "sctp"}]}})
    assert err.code == 2 and '"sctp"' in err.msg


def test_duplicate_host_port_is_7():
    m = {"hostPort": 80, "containerPort": 80}
    assert code_of(netconf, {"runtimeConfig": {"portMappings": [m, dict(m)]}}).code == 7


def test_bandwidth_runtime_config_camel_and_go_names():
    for bw in ({"ingressRate": 10**6, "ingressBurst": 2**20, "egressRate": 0,
                "egressBurst": 0},
               {"IngressRate": 10**6, "IngressBurst": 2**20}):
        conf = netconf({"runtimeConfig": {"bandwidth": bw}})
        assert conf.bandwidth.to_cni() == {"ingressRate": 10**6, "ingressBurst": 2**20}


def test_static_bandwidth_wins_over_runtime_config():
    conf = netconf({"egressRate": 5000, "egressBurst": 8000,
                    "runtimeConfig": {"bandwidth": {"ingressRate": 1, "ingressBurst": 1}}})
    assert conf.bandwidth.to_cni() == {"egressRate": 5000, "egressBurst": 8000}
    assert conf.bandwidth_source == "plugin configuration"


@pytest.mark.parametrize("bw,word", [
    ({"ingressRate": 1000}, "ingressBurst"),
    ({"egressBurst": 1000}, "egressRate"),
    ({"ingressRate": 1000, "ingressBurst": (8 << 32) + 1}, "ingressBurst"),
    ({"ingressRate": -1, "ingressBurst": 10}, "ingressRate"),
    ({"ingressRate": 1.5, "ingressBurst": 10}, "ingressRate"),
])
def test_bad_bandwidth_is_7(bw, word):
    err = code_of(netconf, {"runtimeConfig": {"bandwidth": bw}})
    assert err.code == 7 and word in err.msg


def test_largest_burst_and_containerd_max_uint32_accepted():
    conf = netconf({"runtimeConfig": {"bandwidth": {
        "IngressRate": 10**6, "IngressBurst": 8 << 32,
        "EgressRate": 10**6, "EgressBurst": 4294967295}}})
    assert conf.bandwidth.ingress_burst_bits == 8 << 32


@pytest.mark.parametrize("text,value", [("10M", 10**7), ("1k", 1000), ("1Gi", 1 << 30),
                                        ("1.5M", 1_500_000), ("2e6", 2 * 10**6),
                                        ("100", 100), ("1500m", 2), ("1P", 10**15)])
def test_parse_quantity(text, value):
    assert c.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "M", "10X", "10 M", "ten", "1..5k"])
def test_bad_quantity_is_7(text):
    assert code_of(c.parse_quantity, text).code == 7


def test_bandwidth_from_pod_annotations():
    conf = netconf({"runtimeConfig": {c.POD_ANNOTATIONS_KEY: {
        c.INGRESS_ANNOTATION: "10M", c.EGRESS_ANNOTATION: "1G", "other": "x"}}})
    bw = conf.bandwidth
    assert (bw.ingress_rate_bps, bw.egress_rate_bps) == (10**7, 10**9)
    assert bw.ingress_burst_bits == max(10**6, c.MIN_ANNOTATION_BURST_BITS)
    assert bw.egress_burst_bits == 10**8


def test_annotations_ignored_when_bandwidth_present():
    conf = netconf({"runtimeConfig": {
        "bandwidth": {"ingressRate": 2000, "ingressBurst": 3000},
        c.POD_ANNOTATIONS_KEY: {c.INGRESS_ANNOTATION: "10M"}}})
    assert conf.bandwidth.ingress_rate_bps == 2000


@pytest.mark.parametrize("text", ["999", "2P", "100m"])
def test_annotation_out_of_range_is_7(text):
    err = code_of(netconf, {"runtimeConfig": {c.POD_ANNOTATIONS_KEY: {
        c.EGRESS_ANNOTATION: text}}})
    assert err.code == 7 and c.EGRESS_ANNOTATION in err.msg


def test_mac_precedence_cni_args_then_args_then_runtime_config():
    assert netconf(CNI_ARGS="MAC=02:00:00:00:00:01").mac == "02:00:00:00:00:01"
    assert netconf({"args": {"cni": {"mac": "02-00-00-00-00-02"}}},
                   CNI_ARGS="MAC=02:00:00:00:00:01").mac == "02:00:00:00:00:02"
    assert netconf({"args": {"cni": {"mac": "02:00:00:00:00:02"}},
                    "runtimeConfig": {"mac": "02:AA:00:00:00:03"}},
                   CNI_ARGS="MAC=02:00:00:00:00:01").mac == "02:aa:00:00:00:03"


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "00:00:00:00:00:00", "02:00:00:00:00",
                                 "zz:00:00:00:00:01", 12])
def test_bad_mac_is_7(mac):
    err = code_of(netconf, {"runtimeConfig": {"mac": mac}})
    assert err.code == 7 and "runtimeConfig.mac" in err.msg


def test_requested_ips_from_all_sources():
    conf = netconf({"runtimeConfig": {"ips": ["10.1.0.7/24"]},
                    "args": {"cni": {"ips": ["10.1.0.8"]}}},
                   CNI_ARGS="IgnoreUnknown=1;IP=10.1.0.9")
    assert conf.requested_ips == ("10.1.0.9", "10.1.0.8", "10.1.0.7")
    assert code_of(netconf, {"runtimeConfig": {"ips": ["10.1.0.300"]}}).code == 7


def test_pod_identity_from_k8s_args():
    conf = netconf(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;"
                            "K8S_POD_UID=123")
    assert conf.pod == {"namespace": "default", "name": "web", "uid": "123"}


def test_dns_validation():
    conf = netconf({"dns": {"nameservers": ["10.0.0.10"], "search": ["svc"], "domain": "x"}})
    assert conf.dns == {"nameservers": ["10.0.0.10"], "search": ["svc"], "domain": "x"}
    assert code_of(netconf, {"dns": {"nameservers": ["nope"]}}).code == 7
    assert code_of(netconf, {"dns": {"search": "svc"}}).code == 7


def test_gc_valid_attachments_and_old_spelling():
    obj = {"cniVersion": "1.1.0", "name": "n", "type": "vswitch", "ipam": {"type": "h"},
           "cni.dev/attachments": [{"containerID": "a", "ifname": "eth0"}]}
    env = c.parse_env({"CNI_COMMAND": "GC", "CNI_PATH": "/x"})
    assert c.parse_netconf(obj, env).valid_attachments == [{"containerID": "a",
                                                            "ifname": "eth0"}]
    obj["cni.dev/valid-attachments"] = []
    assert c.parse_netconf(obj, env).valid_attachments == []
    obj["cni.dev/valid-attachments"] = [{"containerID": 1}]
    assert code_of(c.parse_netconf, obj, env).code == 7


def test_whole_example_round_trips_through_json():
    raw = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "vswitch",
                      "ipam": {"type": "host-local"}}).encode()
    obj = c.load_stdin(raw)
    assert c.check_version(obj, "GC") == "1.1.0"
