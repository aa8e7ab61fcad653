"""Unit tests of cni/results.py: result shapes per version, errors, VERSION, import cost."""
import json
import subprocess
import sys

import pytest

from vswitch_cni.errors import CniError
from vswitch_cni.install import launcher_lines
from vswitch_cni.results import error_json, format_result, parse_result, version_info

RESULT = {
    "interfaces": [{"name": "vsw-ab12", "mac": "02:00:00:00:00:aa", "mtu": 1500},
                   {"name": "eth0", "mac": "02:00:00:00:00:01", "mtu": 1500,
                    "sandbox": "/var/run/netns/p1"}],
    "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
            {"address": "fd00::5/64", "gateway": "fd00::1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
    "dns": {"nameservers": ["10.1.0.10"]},
}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_before_1_0_ips_carry_version_and_no_mtu(version):
    out = format_result(RESULT, version)
    assert out["cniVersion"] == version
    assert [ip["version"] for ip in out["ips"]] == ["4", "6"]
    assert all("mtu" not in i for i in out["interfaces"])
    assert out["interfaces"][1]["sandbox"] == "/var/run/netns/p1"
    assert out["ips"][0]["interface"] == 1


def test_1_0_0_has_neither_version_nor_mtu():
    out = format_result(RESULT, "1.0.0")
    assert all("version" not in ip for ip in out["ips"])
    assert all("mtu" not in i for i in out["interfaces"])


def test_1_1_0_has_mtu_on_interfaces():
    out = format_result(RESULT, "1.1.0")
    assert [i["mtu"] for i in out["interfaces"]] == [1500, 1500]
    assert all("version" not in ip for ip in out["ips"])
    assert out["dns"] == {"nameservers": ["10.1.0.10"]}


def test_host_interface_has_no_sandbox_and_dns_always_printed():
    out = format_result(dict(RESULT, dns={}), "1.0.0")
    assert "sandbox" not in out["interfaces"][0]
    assert out["dns"] == {}


def test_parse_accepts_old_shape_and_round_trips():
    old = format_result(RESULT, "0.4.0")
    again = parse_result(old, "prevResult")
    assert format_result(again, "0.4.0") == old


@pytest.mark.parametrize("bad", [{"ips": [{"address": "10.1.0.5"}]},
                                 {"ips": [{"address": "10.1.0.5/24", "interface": -1}]},
                                 {"interfaces": [{"mac": "x"}]},
                                 {"routes": [{"gw": "10.0.0.1"}]}, []])
def test_parse_rejects_malformed(bad):
    with pytest.raises(CniError) as info:
        parse_result(bad, "prevResult")
    assert info.value.code == 7 and "prevResult" in info.value.msg


def test_error_json_uses_requested_version_or_current():
    err = CniError(7, "bad mtu", "details here")
    assert error_json("0.4.0", err) == {"cniVersion": "0.4.0", "code": 7, "msg": "bad mtu",
                                        "details": "details here"}
    assert error_json("9.9.9", CniError(1, "x"))["cniVersion"] == "1.1.0"
    assert "details" not in error_json("1.0.0", CniError(4, "x"))


def test_version_lists_exactly_the_accepted_versions():
    assert version_info() == {"cniVersion": "1.1.0",
                              "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0",
                                                    "1.1.0"]}


#: What the plugin must never load: full dotted names, each with its submodules.
HEAVY = ("numpy", "scapy", "pyroute2", "vswitch.datapath")


def heavy_modules_of_a_plugin_run(also_import=""):
    """The HEAVY modules (full dotted names) in ``sys.modules`` of a fresh interpreter
    after it imported the plugin and ran it as a runtime would (CNI_COMMAND=VERSION);
    ``also_import`` is extra code run first (to prove the check can fire)."""
    code = ("\n".join(launcher_lines()) + "\nimport json; %s\n"   # as the installed launcher
            "import vswitch_cni.plugin, vswitch_cni.install\n"
            "rc = vswitch_cni.plugin.main()\n"
            "heavy = %r\n"
            "print(json.dumps(sorted(m for m in sys.modules if m in heavy or "
            "m.startswith(tuple(h + '.' for h in heavy)))), file=sys.stderr)\n"
            "sys.exit(rc)" % (also_import, HEAVY))
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code],
                          input='{"cniVersion": "1.0.0"}', env={"CNI_COMMAND": "VERSION"},
                          capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout)["cniVersion"], proc.stdout      # the plugin really ran
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_plugin_imports_nothing_heavy():
    assert heavy_modules_of_a_plugin_run() == []


def test_the_import_guard_sees_a_dotted_module():
    # the guard compares full dotted names: a loaded vswitch.datapath (here a stand-in,
    # since -S has no numpy to import the real one) is seen, not just "vswitch"
    got = heavy_modules_of_a_plugin_run(
        "import types; sys.modules['vswitch.datapath'] = types.ModuleType('vswitch.datapath')")
    assert got == ["vswitch.datapath"]
