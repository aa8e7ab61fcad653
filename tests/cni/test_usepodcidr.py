"""``"subnet": "usePodCidr"``: the plugin's rewrite of the IPAM configuration, and the
network list ``install-cni`` writes for a daemon in cluster mode.

The expected configurations are written out literally from the rule in cni/ipam.py's
docstring (the Kubernetes network-plugin spelling; one range set per leased subnet, IPv4
first); the end-to-end behaviour with a real daemon, etcd and host-local is in
tests/integration/test_cluster_mode.py.
"""
import json
import subprocess
import sys

import pytest

from vswitch_cni.errors import CniError
from vswitch_cni.install import conflist, main as install_main
from vswitch_cni.ipam import PLACEHOLDER_SUBNETS, uses_pod_cidr, with_pod_cidrs

V4, V6 = "10.244.7.0/24", "fd00:10:244:7::/64"


def net(ipam):
    return {"cniVersion": "1.0.0", "name": "n", "type": "vswitch", "ipam": ipam}


def test_top_level_use_pod_cidr_becomes_one_range_set_per_leased_subnet():
    obj = net({"type": "host-local", "subnet": "usePodCidr", "routes": [{"dst": "0.0.0.0/0"}]})
    assert uses_pod_cidr(obj)
    out = with_pod_cidrs(obj, [V4, V6])
    assert out["ipam"] == {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}],
                           "ranges": [[{"subnet": V4}], [{"subnet": V6}]]}
    assert obj["ipam"]["subnet"] == "usePodCidr"          # the input is not changed


def test_top_level_range_fields_go_to_the_range_of_their_family():
    obj = net({"type": "host-local", "subnet": "usePodCidr", "rangeStart": "10.244.7.10",
               "gateway": "10.244.7.1"})
    out = with_pod_cidrs(obj, [V4, V6])
    assert out["ipam"]["ranges"] == [[{"subnet": V4, "rangeStart": "10.244.7.10", "gateway": "10.244.7.1"}],
                                     [{"subnet": V6}]]
    assert "rangeStart" not in out["ipam"] and "gateway" not in out["ipam"]


def test_ranges_entries_take_the_leased_subnets_in_order_others_untouched():
    obj = net({"type": "host-local", "ranges": [[{"subnet": "usePodCidr", "rangeStart": "10.244.7.5"}],
                                                [{"subnet": "usePodCidr"}],
                                                [{"subnet": "192.168.9.0/24"}]]})
    out = with_pod_cidrs(obj, [V4, V6])
    assert out["ipam"]["ranges"] == [[{"subnet": V4, "rangeStart": "10.244.7.5"}], [{"subnet": V6}],
                                     [{"subnet": "192.168.9.0/24"}]]


def test_more_use_pod_cidr_ranges_than_leased_subnets_is_invalid_config():
    obj = net({"type": "host-local", "ranges": [[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidr"}]]})
    with pytest.raises(CniError) as ei:
        with_pod_cidrs(obj, [V4])
    assert ei.value.code == 7 and "usePodCidr" in ei.value.msg


def test_plain_subnets_do_not_ask_the_daemon():
    assert not uses_pod_cidr(net({"type": "host-local", "subnet": "10.1.0.0/16"}))
    assert not uses_pod_cidr(net({"type": "host-local", "ranges": [[{"subnet": "10.1.0.0/16"}]]}))
    assert not uses_pod_cidr({"cniVersion": "1.0.0", "name": "n", "type": "vswitch"})


def test_placeholders_are_the_documentation_prefixes():
    assert PLACEHOLDER_SUBNETS == ("192.0.2.0/24", "2001:db8::/64")      # RFC 5737, RFC 3849


def test_install_conflist_with_pod_cidr_dual_stack():
    c = conflist(socket_path="/run/x.sock", pod_cidr_families=(4, 6))
    ipam = c["plugins"][0]["ipam"]
    assert ipam["ranges"] == [[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidr"}]]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]


def test_install_main_use_pod_cidr_flag(tmp_path):
    assert install_main(["--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c"),
                         "--socket", "/run/v.sock", "--use-pod-cidr", "4"]) == 0
    c = json.loads((tmp_path / "c" / "05-vswitch.conflist").read_text())
    assert c["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "usePodCidr"}]]
    assert install_main(["--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c"),
                         "--use-pod-cidr", "5"]) == 2
    assert install_main(["--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c"),
                         "--use-pod-cidr", "4", "--subnet", "10.0.0.0/16"]) == 2


def test_the_plugin_never_loads_the_etcd_client():
    code = ("import sys, vswitch_cni.plugin, vswitch_cni.ipam, vswitch_cni.install; "
            "print(sorted(m for m in sys.modules if m.startswith(('etcd3gw', 'vswitch.cluster', 'requests'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
