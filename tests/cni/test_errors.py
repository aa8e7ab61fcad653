"""Conformance without a kernel: the error-code matrix, VERSION, IPAM failures, daemon down.

Every test runs the installed plugin executable with env vars and stdin, like a runtime,
with Debian's host-local as IPAM (it needs no root: its data dir is the test's tmp dir).
vswitchd is absent here on purpose (a socket path nobody listens on): ADD must answer 11
and release the address, STATUS 50, DEL must still release the address through IPAM.
"""
import json
import os
import subprocess
import sys

import pytest

from cnitest import SYSTEM_CNI, netconf, reservations
from vswitch_cni.results import version_info

FAKE_IPAM = r'''#!{python} -IS
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
with open(conf["ipam"]["record"], "a") as f:
    f.write(cmd + " " + os.environ.get("CNI_CONTAINERID", "") + "\n")
mode = conf["ipam"]["mode"]
if cmd == "VERSION":
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}}))
elif cmd == "ADD" and mode == "noaddr":
    print(json.dumps({{"cniVersion": conf["cniVersion"], "ips": []}}))
elif cmd == "ADD" and mode == "other-ip":
    print(json.dumps({{"cniVersion": conf["cniVersion"],
                      "ips": [{{"address": "10.99.0.50/24", "gateway": "10.99.0.1"}}]}}))
elif cmd == "ADD" and mode == "garbage":
    print("this is not json")
elif cmd == "ADD" and mode == "fail":
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 123,
                      "msg": "pool exhausted", "details": "try later"}}))
    sys.exit(1)
'''


@pytest.fixture
def down_sock(tmp_path):
    return str(tmp_path / "nobody-listens.sock")


@pytest.fixture
def fake_netns(tmp_path):
    """A path that exists and is not our namespace: enough for the plugin's own checks."""
    p = tmp_path / "netns-file"
    p.write_text("")
    return str(p)


@pytest.fixture
def fake_ipam(tmp_path):
    bin_dir = tmp_path / "ipam-bin"
    bin_dir.mkdir()
    exe = bin_dir / "fake-ipam"
    exe.write_text(FAKE_IPAM.format(python=os.path.realpath(sys.executable)))
    exe.chmod(0o755)
    return bin_dir


def base(net_name, subnet, hl_dir, sock, **kw):
    return netconf(net_name, subnet, hl_dir, socket=sock, **kw)


def host_local(command, conf, cid, ifname="eth0"):
    """Run host-local directly (as another plugin of a chain would)."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_IFNAME": ifname,
           "CNI_NETNS": "/dev/null", "CNI_PATH": SYSTEM_CNI}
    p = subprocess.run([os.path.join(SYSTEM_CNI, "host-local")], input=json.dumps(conf).encode(),
                       env=env, capture_output=True)
    assert p.returncode == 0, p.stdout
    return json.loads(p.stdout) if p.stdout.strip() else None


def assert_error(outcome, code, *words):
    assert outcome.rc != 0, outcome
    assert isinstance(outcome.out, dict), outcome
    assert outcome.out["code"] == code, outcome
    assert set(outcome.out) <= {"cniVersion", "code", "msg", "details"}, outcome
    assert "cniVersion" in outcome.out and outcome.out["msg"]
    for w in words:
        assert w in outcome.out["msg"], (w, outcome)


# ---------------------------------------------------------------- VERSION

def test_version_ignores_stdin_and_lists_exactly_the_accepted_versions(runner):
    o = runner.run("VERSION", b"\x00 this is not json {", ifname=None)
    assert o.rc == 0 and o.out == version_info()
    assert o.out["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]


# ---------------------------------------------------------------- the error matrix

def test_every_missing_env_var_named_in_one_message(runner, net_name, subnet, hl_dir):
    env = {"CNI_COMMAND": "ADD", "PATH": os.environ["PATH"]}
    o = runner.run_env(env, netconf(net_name, subnet, hl_dir))
    assert_error(o, 4, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")


def test_missing_command_is_4(runner):
    o = runner.run_env({"PATH": os.environ["PATH"]}, b"{}")
    assert_error(o, 4, "CNI_COMMAND")


def test_unknown_command_is_4(runner, net_name, subnet, hl_dir, fake_netns):
    o = runner.run("FROB", netconf(net_name, subnet, hl_dir), cid="c1", netns=fake_netns)
    assert_error(o, 4, "FROB")


@pytest.mark.parametrize("ifname", ["x" * 16, ".", "..", "a/b", "a:b", "a b"])
def test_invalid_ifname_is_4(runner, net_name, subnet, hl_dir, fake_netns, ifname):
    o = runner.run("ADD", netconf(net_name, subnet, hl_dir), cid="c1", ifname=ifname,
                   netns=fake_netns)
    assert_error(o, 4, "CNI_IFNAME")


@pytest.mark.parametrize("cid", ["-x", "a b", "a/b"])
def test_invalid_container_id_is_4(runner, net_name, subnet, hl_dir, fake_netns, cid):
    o = runner.run("DEL", netconf(net_name, subnet, hl_dir), cid=cid, netns=fake_netns)
    assert_error(o, 4, "CNI_CONTAINERID")


def test_missing_netns_path_is_4(runner, net_name, subnet, hl_dir, tmp_path):
    o = runner.run("ADD", netconf(net_name, subnet, hl_dir), cid="c1",
                   netns=str(tmp_path / "gone"))
    assert_error(o, 4, "CNI_NETNS")


def test_own_netns_is_8(runner, net_name, subnet, hl_dir):
    o = runner.run("ADD", netconf(net_name, subnet, hl_dir), cid="c1",
                   netns="/proc/self/ns/net")
    # /proc/self of the plugin process is the plugin's own namespace
    assert_error(o, 8, "own network namespace")


def test_bad_json_is_6(runner, fake_netns):
    o = runner.run("ADD", b'{"cniVersion": "1.0.0", "name": ', cid="c1", netns=fake_netns)
    assert_error(o, 6, "not JSON")


def test_missing_name_is_7(runner, fake_netns):
    o = runner.run("ADD", {"cniVersion": "1.0.0", "type": "vswitch"}, cid="c1",
                   netns=fake_netns)
    assert_error(o, 7, "name")


def test_missing_version_means_0_1_0_which_is_1(runner, net_name, subnet, hl_dir, fake_netns):
    conf = netconf(net_name, subnet, hl_dir)
    del conf["cniVersion"]
    o = runner.run("ADD", conf, cid="c1", netns=fake_netns)
    assert_error(o, 1, "0.1.0")


@pytest.mark.parametrize("command,version", [("ADD", "0.2.0"), ("ADD", "1.2.0"),
                                             ("CHECK", "0.3.1"), ("GC", "1.0.0"),
                                             ("STATUS", "1.0.0")])
def test_version_not_allowed_is_1(runner, net_name, subnet, hl_dir, fake_netns, command,
                                  version):
    o = runner.run(command, netconf(net_name, subnet, hl_dir, version=version), cid="c1",
                   netns=fake_netns)
    assert_error(o, 1, version)
    assert o.out["cniVersion"] in version_info()["supportedVersions"]


def test_invalid_config_is_7_naming_the_key(runner, net_name, subnet, hl_dir, fake_netns):
    o = runner.run("ADD", netconf(net_name, subnet, hl_dir, mtu=10), cid="c1",
                   netns=fake_netns)
    assert_error(o, 7, "mtu", "10")
    assert o.out["cniVersion"] == "1.0.0"


def test_unsupported_field_is_2_naming_key_and_value(runner, net_name, subnet, hl_dir,
                                                      fake_netns):
    o = runner.run("ADD", netconf(net_name, subnet, hl_dir, vlan=100), cid="c1",
                   netns=fake_netns)
    assert_error(o, 2, "vlan", "100")


def test_error_is_printed_in_the_requested_version(runner, net_name, subnet, hl_dir,
                                                   fake_netns):
    o = runner.run("ADD", netconf(net_name, subnet, hl_dir, version="0.3.1", mtu=10),
                   cid="c1", netns=fake_netns)
    assert_error(o, 7)
    assert o.out["cniVersion"] == "0.3.1"


# ---------------------------------------------------------------- daemon down

def test_add_with_daemon_down_is_11_and_releases_the_address(runner, net_name, subnet,
                                                            hl_dir, down_sock, fake_netns):
    o = runner.run("ADD", base(net_name, subnet, hl_dir, down_sock), cid="c1",
                   netns=fake_netns)
    assert_error(o, 11, "not reachable")
    assert reservations(hl_dir, net_name) == []


@pytest.mark.parametrize("version", ["1.0.0", "1.1.0", "0.3.0"])
def test_del_with_daemon_down_releases_the_address(runner, net_name, subnet, hl_dir,
                                                   down_sock, version):
    conf = base(net_name, subnet, hl_dir, down_sock, version=version)
    host_local("ADD", dict(conf, cniVersion="1.0.0"), "c1")
    assert len(reservations(hl_dir, net_name)) == 1
    for netns in ("/run/netns/long-gone", None):   # twice; second without CNI_NETNS
        o = runner.run("DEL", conf, cid="c1", netns=netns)
        assert o.rc == 0 and o.stdout == "", o
        assert reservations(hl_dir, net_name) == []
    assert "vswitchd is down" in o.stderr


def test_del_with_empty_netns_and_no_prev_result(runner, net_name, subnet, hl_dir,
                                                 down_sock):
    conf = base(net_name, subnet, hl_dir, down_sock)
    host_local("ADD", conf, "c2")
    o = runner.run("DEL", conf, cid="c2", netns="")
    assert o.rc == 0, o
    assert reservations(hl_dir, net_name) == []


def test_del_with_a_config_add_would_reject_still_succeeds(runner, net_name, subnet, hl_dir,
                                                           down_sock):
    conf = base(net_name, subnet, hl_dir, down_sock, hairpinMode=True,
                runtimeConfig={"portMappings": [{"hostPort": 0}]})
    host_local("ADD", netconf(net_name, subnet, hl_dir), "c3")
    o = runner.run("DEL", conf, cid="c3")
    assert o.rc == 0, o
    assert reservations(hl_dir, net_name) == []


def test_status_with_daemon_down_is_50(runner, net_name, subnet, hl_dir, down_sock):
    o = runner.run("STATUS", base(net_name, subnet, hl_dir, down_sock, version="1.1.0"))
    assert_error(o, 50, down_sock)


def test_check_with_daemon_down_fails(runner, net_name, subnet, hl_dir, down_sock,
                                      fake_netns):
    conf = base(net_name, subnet, hl_dir, down_sock)
    res = host_local("ADD", conf, "c4")
    prev = {"cniVersion": "1.0.0",
            "interfaces": [{"name": "vsw0"}, {"name": "eth0", "sandbox": fake_netns}],
            "ips": [dict(res["ips"][0], interface=1)]}
    o = runner.run("CHECK", dict(conf, prevResult=prev), cid="c4", netns=fake_netns)
    assert_error(o, 11, "not reachable")


def test_check_without_prev_result_is_7(runner, net_name, subnet, hl_dir, down_sock,
                                        fake_netns):
    o = runner.run("CHECK", base(net_name, subnet, hl_dir, down_sock), cid="c5",
                   netns=fake_netns)
    assert_error(o, 7, "prevResult")


def test_gc_with_daemon_down_reports_it_after_trying_everything(runner, net_name, subnet,
                                                                hl_dir, down_sock):
    conf = base(net_name, subnet, hl_dir, down_sock, version="1.1.0")
    conf["cni.dev/valid-attachments"] = []
    o = runner.run("GC", conf)
    assert_error(o, 114, "not reachable")


# ---------------------------------------------------------------- IPAM

def test_ipam_not_in_cni_path_is_110(runner, net_name, subnet, hl_dir, down_sock,
                                     fake_netns):
    conf = base(net_name, subnet, hl_dir, down_sock)
    conf["ipam"]["type"] = "no-such-ipam"
    o = runner.run("ADD", conf, cid="c1", netns=fake_netns)
    assert_error(o, 110, "no-such-ipam", "CNI_PATH")


def test_ipam_error_is_relayed_with_its_code(runner, net_name, hl_dir, down_sock, fake_netns):
    conf = base(net_name, "10.77.0.0/30", hl_dir, down_sock)
    host_local("ADD", conf, "first")      # /30 with gateway .1: the only address .2
    o = runner.run("ADD", conf, cid="second", netns=fake_netns)
    assert o.rc != 0 and o.code not in (None, 0, 11), o
    assert "IPAM plugin host-local ADD" in o.out["msg"]
    assert reservations(hl_dir, net_name) == ["10.77.0.2"]


@pytest.mark.parametrize("mode,code,words", [
    ("noaddr", 112, ("no address",)),
    ("garbage", 111, ("no JSON",)),
    ("fail", 123, ("pool exhausted",)),
])
def test_unusable_ipam_result_fails_and_releases(plugin_bin, fake_ipam, tmp_path, net_name,
                                                 down_sock, fake_netns, mode, code, words):
    from cnitest import Runner
    r = Runner(plugin_bin, extra_path=(str(fake_ipam),))
    record = tmp_path / "ipam-calls"
    conf = {"cniVersion": "1.0.0", "name": net_name, "type": "vswitch", "socket": down_sock,
            "ipam": {"type": "fake-ipam", "mode": mode, "record": str(record)}}
    o = r.run("ADD", conf, cid="c9", netns=fake_netns)
    assert_error(o, code, *words)
    calls = record.read_text().split("\n")
    assert calls[0] == "ADD c9"
    if mode != "fail":     # it allocated something: the plugin must give it back
        assert "DEL c9" in calls, calls


def test_requested_ip_not_allocated_is_112_and_released(plugin_bin, fake_ipam, tmp_path,
                                                        net_name, down_sock, fake_netns):
    from cnitest import Runner
    r = Runner(plugin_bin, extra_path=(str(fake_ipam),))
    record = tmp_path / "ipam-calls"
    conf = {"cniVersion": "1.0.0", "name": net_name, "type": "vswitch", "socket": down_sock,
            "ipam": {"type": "fake-ipam", "mode": "other-ip", "record": str(record)},
            "runtimeConfig": {"ips": ["10.99.0.7/24"]}}
    o = r.run("ADD", conf, cid="c8", netns=fake_netns)
    assert_error(o, 112, "10.99.0.7")
    assert "DEL c8" in record.read_text()


def test_1_1_0_config_negotiates_down_with_a_1_0_0_ipam(runner, net_name, subnet, hl_dir,
                                                         down_sock, fake_netns):
    # host-local from Debian 12 speaks at most 1.0.0
    conf = base(net_name, subnet, hl_dir, down_sock, version="1.1.0")
    o = runner.run("ADD", conf, cid="c7", netns=fake_netns)
    assert_error(o, 11)                   # IPAM ADD worked, the daemon is down, rolled back
    assert o.out["cniVersion"] == "1.1.0"
    assert reservations(hl_dir, net_name) == []


# ---------------------------------------------------------------- logs

def test_logs_go_to_stderr_and_log_file_never_stdout(runner, net_name, subnet, hl_dir,
                                                     down_sock, fake_netns, tmp_path):
    log = tmp_path / "plugin.log"
    conf = base(net_name, subnet, hl_dir, down_sock, logFile=str(log))
    o = runner.run("ADD", conf, cid="c6", netns=fake_netns)
    assert_error(o, 11)
    assert json.loads(o.stdout) == o.out         # stdout is exactly one JSON document
    assert "c6/eth0" in log.read_text() and "code 11" in log.read_text()
    assert "code 11" in o.stderr
