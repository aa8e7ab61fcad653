"""``vswitchctl install-cni``: write the plugin executable and a default network list.

Theory of operation: runtimes execute the plugin by its type, ``vswitch``, from their CNI
bin directory. The installed ``vswitch`` is a three-line Python launcher whose shebang is
the interpreter running this installer (resolved, so no pyenv shim or PATH lookup) with
``-I -S``: isolated from PYTHON* variables and the user site, and without ``site`` (whose
.pth processing costs tens of milliseconds per pod). The plugin is installed as the package
``vswitch_cni`` (the folder ``cni/`` of the checkout), so without ``site`` the launcher
finds it itself: it puts the directory holding the ``vswitch`` package on sys.path and,
when ``vswitch_cni`` is not a sibling there (a checkout or an editable install, where it
is the folder ``cni``), loads the package from its folder under its one name first. The network list, ``10-vswitch.conflist``,
runs vswitch with host-local IPAM on ``--subnet`` (given twice, one IPv4 and one IPv6
subnet: a dual-stack list, two ``ranges`` and a default route per family, as Kubernetes
configures host-local with ``--pod-network-cidr=A,B``) and declares the capabilities
portMappings, bandwidth, mac, ips and the pod annotations. vswitchd brings ``lo`` up in
every pod it attaches, so no loopback plugin is listed.

Both files are written atomically (temp file in the same directory, fsync, rename), so a
runtime reading the directory never sees half a file.

``main(argv)`` is the command line; vswitch/cli.py calls it for ``install-cni``, and
``python -m vswitch_cni.install`` runs it directly.
"""
import argparse
import ipaddress
import json
import os
import sys

from vswitch.cnitypes import DEFAULT_SOCKET

PLUGIN_NAME = "vswitch"
CONFLIST_NAME = "10-vswitch.conflist"
DEFAULT_SUBNET = "10.88.0.0/16"
DEFAULT_NETWORK = "vswitch"


def _package_dirs():
    """(the directory holding ``vswitch``, the ``vswitch_cni`` package's own folder) as
    this process imported them."""
    import vswitch
    vswitch_root = os.path.dirname(os.path.dirname(os.path.abspath(vswitch.__file__)))
    return vswitch_root, os.path.dirname(os.path.abspath(__file__))


def launcher_lines(vswitch_root=None, plugin_dir=None):
    """The launcher's Python lines that make ``vswitch_cni`` and ``vswitch`` importable
    without ``site`` (see the module docstring); defaults: where this process found them."""
    if vswitch_root is None or plugin_dir is None:
        found = _package_dirs()
        vswitch_root = vswitch_root or found[0]
        plugin_dir = plugin_dir or found[1]
    lines = [f"import sys; sys.path.insert(0, {vswitch_root!r})"]
    if os.path.normpath(plugin_dir) != os.path.join(os.path.normpath(vswitch_root), "vswitch_cni"):
        init = os.path.join(plugin_dir, "__init__.py")
        # importlib.util's spec_from_file_location and module_from_spec, taken from the
        # frozen modules every interpreter has loaded: importing importlib.util would cost
        # more than the rest of this launcher
        lines += ["from _frozen_importlib import module_from_spec",
                  "from _frozen_importlib_external import spec_from_file_location",
                  f"spec = spec_from_file_location('vswitch_cni', {init!r}, "
                  f"submodule_search_locations=[{plugin_dir!r}])",
                  "sys.modules['vswitch_cni'] = module_from_spec(spec)",
                  "spec.loader.exec_module(sys.modules['vswitch_cni'])"]
    return lines


def launcher_text(python=None, vswitch_root=None, plugin_dir=None):
    """The launcher script for ``python`` (see the module docstring)."""
    python = os.path.realpath(python or sys.executable)
    return "\n".join([f"#!{python} -IS",
                      "# The vswitch CNI plugin, written by `vswitchctl install-cni`.",
                      *launcher_lines(vswitch_root, plugin_dir),
                      "from vswitch_cni.plugin import main; sys.exit(main())", ""])


def _subnets(subnet):
    """``subnet``: one CIDR or a list of them (at most one per IP family) -> networks;
    raises ValueError naming the value and what is accepted."""
    texts = [subnet] if isinstance(subnet, str) else list(subnet)
    if not texts:
        raise ValueError("--subnet: give at least one pod subnet, like 10.88.0.0/16")
    nets = []
    for t in texts:
        try:
            nets.append(ipaddress.ip_network(t, strict=True))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--subnet {t!r} is not a network address with prefix "
                             f"(like 10.88.0.0/16 or fd00:10:88::/64): {exc}") from None
    if len(nets) > 2 or len({n.version for n in nets}) != len(nets):
        raise ValueError(f"--subnet {', '.join(texts)}: accepted are one subnet, or two of "
                         f"different families (one IPv4, one IPv6: dual stack)")
    return nets


def _pod_cidr_families(text):
    """``--use-pod-cidr`` "4", "6" or "4,6" -> (4,) ...; ValueError naming the value."""
    fams = tuple(sorted({int(f) for f in text.split(",") if f.strip() in ("4", "6")}))
    if not fams or len(fams) != len([f for f in text.split(",") if f.strip()]):
        raise ValueError(f"--use-pod-cidr {text!r}: accepted are 4, 6 or 4,6 (the families of the cluster CIDR)")
    return fams


def conflist(subnet=DEFAULT_SUBNET, socket_path=DEFAULT_SOCKET, name=DEFAULT_NETWORK,
             mtu=1500, pod_cidr_families=None):
    """The default network list as a dict; ``subnet`` is one CIDR or a list (dual stack:
    an IPv4 and an IPv6 one, a host-local range and a default route each).
    ``pod_cidr_families`` (e.g. (4, 6)) replaces the subnets by one ``usePodCidr`` range per
    family: the node's subnets leased by vswitchd in cluster mode (cni/ipam.py)."""
    if pod_cidr_families:
        # the list of one subnet per family (routes per family), then usePodCidr ranges
        conf = conflist([("10.0.0.0/8" if f == 4 else "fd00::/8") for f in pod_cidr_families],
                        socket_path, name, mtu)
        conf["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "usePodCidr"}] for _ in pod_cidr_families]
        return conf
    nets = _subnets(subnet)
    return {
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": name,
        "plugins": [{
            "type": PLUGIN_NAME,
            "socket": socket_path,
            "mtu": mtu,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": str(n)}] for n in nets],
                     "routes": [{"dst": "0.0.0.0/0" if n.version == 4 else "::/0"} for n in nets]},
            "capabilities": {"portMappings": True, "bandwidth": True, "mac": True,
                             "ips": True, "io.kubernetes.cri.pod-annotations": True},
        }],
    }


def _write_atomic(path, text, mode):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def install(bin_dir, conf_dir, socket_path=DEFAULT_SOCKET, subnet=DEFAULT_SUBNET,
            name=DEFAULT_NETWORK, python=None, pod_cidr_families=None):
    """Write ``bin_dir/vswitch`` and ``conf_dir/10-vswitch.conflist``; returns both paths.
    ``subnet``: one CIDR or a list (one IPv4 and one IPv6: dual stack)."""
    if not socket_path.startswith("/"):
        raise ValueError(f"--socket {socket_path!r} must be an absolute path")
    conf = conflist(subnet, socket_path, name, pod_cidr_families=pod_cidr_families)
    os.makedirs(bin_dir, exist_ok=True)
    os.makedirs(conf_dir, exist_ok=True)
    exe = os.path.join(bin_dir, PLUGIN_NAME)
    conf_path = os.path.join(conf_dir, CONFLIST_NAME)
    _write_atomic(exe, launcher_text(python), 0o755)
    _write_atomic(conf_path, json.dumps(conf, indent=2) + "\n", 0o644)
    return exe, conf_path


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="vswitchctl install-cni",
        description="Install the vswitch CNI plugin and a default network list.")
    parser.add_argument("--bin-dir", required=True, help="the runtime's CNI bin directory")
    parser.add_argument("--conf-dir", required=True, help="the runtime's CNI conf directory")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="vswitchd's control socket")
    parser.add_argument("--subnet", action="append",
                        help=f"pod subnet for host-local (default {DEFAULT_SUBNET}); twice, "
                             f"an IPv4 and an IPv6 one, for dual stack")
    parser.add_argument("--name", default=DEFAULT_NETWORK, help="network name")
    parser.add_argument("--use-pod-cidr", metavar="FAMILIES",
                        help="instead of --subnet: host-local on \"usePodCidr\" (the node's subnet leased "
                             "by vswitchd in cluster mode), one range per family: 4, 6 or 4,6")
    args = parser.parse_args(argv)
    try:
        if args.use_pod_cidr and args.subnet:
            raise ValueError("--use-pod-cidr and --subnet exclude each other")
        fams = _pod_cidr_families(args.use_pod_cidr) if args.use_pod_cidr else None
        exe, conf_path = install(args.bin_dir, args.conf_dir, args.socket,
                                 args.subnet or DEFAULT_SUBNET, args.name, pod_cidr_families=fams)
    except (ValueError, OSError) as exc:
        print(f"install-cni: {exc}", file=sys.stderr)
        return 2
    print(f"installed {exe}\nwrote {conf_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
