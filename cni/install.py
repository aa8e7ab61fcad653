"""``vswitchctl install-cni`` / ``uninstall-cni``: put the plugin and a network list on a node.

Theory of operation: runtimes execute the plugin by its type, ``vswitch``, from their CNI
bin directory, and load the first network list of their conf directory by file name.
``install`` writes the plugin (two files, or one with ``--form python``), a network list
and a manifest:

- ``BIN/vswitch``: the C client (cni/client.c, built by setup.py beside these modules;
  ``--form client``, the default when it was built). A static binary that starts in about
  a millisecond: it hands the invocation to vswitchd, which runs the plugin's logic
  already imported, and executes the IPAM plugins the daemon asks for in the runtime's
  context. Whenever the daemon cannot take the invocation (not running, too old, busy)
  the client executes ``BIN/vswitch-py`` with the same argv, environment and stdin.
- ``BIN/vswitch-py``: the relocatable Python plugin (cni/build.py: a /bin/sh prelude and a
  zip of the stdlib-only plugin package), run by the host's ``python3`` >= 3.9 with
  nothing of ours installed. Before writing it, install looks for that interpreter the way
  the runtime will (``python3`` in the PATH dirs, under ``--host-root`` when the node's
  root is mounted elsewhere, as in a DaemonSet's init container) and fails with a clear
  message when it is missing or too old. ``--python PATH`` pins an interpreter instead
  (``#!PATH -IS``); ``--launcher`` writes the developer's launcher instead (a few lines
  running the plugin from this checkout with this interpreter, ``launcher_text``). It is
  written before ``BIN/vswitch``, so a client never runs without its fallback.
  ``--form python`` writes this Python plugin as ``BIN/vswitch`` and no ``vswitch-py``
  (what install did before the client; also the default, with a warning, when the client
  was not built: an editable install without ``setup.py build_ext --inplace``).
- ``CONF/05-vswitch.conflist`` (``--conflist-name``): vswitch with host-local IPAM on
  ``--subnet`` (twice, an IPv4 and an IPv6 one: dual stack, a range and a default route
  per family) or on ``usePodCidr`` (``--use-pod-cidr``), with the capabilities
  portMappings, bandwidth, mac, ips and the pod annotations. vswitchd brings ``lo`` up in
  every pod, so no loopback plugin is listed. ``05-`` sorts before the usual ``10-...``
  lists (containerd's ``10-containerd-net``, flannel's, calico's) and podman's
  ``87-podman-bridge``, and after a meta plugin's ``00-multus.conf``, which must stay first.
- ``CONF/.vswitch-cni-installed``: the manifest (JSON; a name no runtime loads: libcni reads
  only .conf, .conflist and .json), every path written with its sha256.

Every file is written atomically: a hidden temp file in the same directory, fsync, rename,
fsync of the directory; a runtime (or the kernel exec-ing the plugin) sees the old file or
the new one, never half of one. A file whose bytes are already right is not written again
(its mtime is kept; a wrong mode is fixed), so re-running install is idempotent; the plugin
build is reproducible for that. Files of the previous install that the new one does not
write (another conflist name) are removed if unchanged. ``uninstall`` removes the paths of
the manifest whose content still has the recorded hash, and only inside the two
directories; changed files are reported and kept unless ``force``; nothing else is touched.

``main(argv)`` / ``main_uninstall(argv)`` are the command lines; their options are defined
once, in cni/installopts.py, and vswitch/cli.py builds ``install-cni`` and ``uninstall-cni``
from the same definitions and runs them with ``run_install`` / ``run_uninstall``;
``python -m vswitch_cni.install`` runs install.
"""
import argparse
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import sys

from vswitch.cnitypes import DEFAULT_SOCKET

from .build import CLIENT_NAME, FALLBACK_NAME, _fsync_dir, build_bytes, client_path, write_atomic  # noqa: F401 (write_atomic: API)
# the command lines' options (vswitchctl builds its parser from them without importing this)
from .installopts import (CONFLIST_NAME, DEFAULT_NETWORK, DEFAULT_SUBNET, FORMS, HOST_PATH,  # noqa: F401
                          add_install_arguments, add_uninstall_arguments)

PLUGIN_NAME = "vswitch"
PYTHON_PLUGIN_NAME = FALLBACK_NAME      # the Python plugin beside the client
LEGACY_CONFLIST_NAMES = ("10-vswitch.conflist",)   # what install-cni wrote before the manifest
MANIFEST_NAME = ".vswitch-cni-installed"
MIN_PYTHON = (3, 9)


class InstallError(ValueError):
    """A refused install or uninstall: the message says what was wrong and what to do."""


def _package_dirs():
    """(the directory holding ``vswitch``, the ``vswitch_cni`` package's own folder) as
    this process imported them."""
    import vswitch
    vswitch_root = os.path.dirname(os.path.dirname(os.path.abspath(vswitch.__file__)))
    return vswitch_root, os.path.dirname(os.path.abspath(__file__))


def launcher_lines(vswitch_root=None, plugin_dir=None):
    """The developer launcher's Python lines that make ``vswitch_cni`` and ``vswitch``
    importable without ``site``: the directory holding ``vswitch`` on sys.path and, when
    ``vswitch_cni`` is not a sibling there (a checkout or an editable install, where it is
    the folder ``cni``), the package loaded from its folder under its one name first.
    Defaults: where this process found them."""
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
    """The developer launcher for ``python`` (default: this interpreter, resolved, with
    ``-IS``): it runs the plugin from this installation, so it breaks when copied to
    another host; the relocatable plugin is cni/build.py's."""
    python = os.path.realpath(python or sys.executable)
    return "\n".join([f"#!{python} -IS",
                      "# The vswitch CNI plugin's developer launcher, written by `vswitchctl install-cni --launcher`.",
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


def check_conflist_name(name):
    """``--conflist-name``: a plain file name ending in .conflist; InstallError otherwise."""
    if (not isinstance(name, str) or not name.endswith(".conflist") or "/" in name
            or name.startswith(".") or name == ".conflist" or "\0" in name):
        raise InstallError(f"--conflist-name {name!r}: accepted is a plain file name ending in "
                           f".conflist (runtimes load the first list by name), like {CONFLIST_NAME}")
    return name


# ---------------------------------------------------------------- files

def _sha256_of(path):
    """sha256 hex of a regular file's content; None when missing or not a regular file."""
    try:
        import stat
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def _put(path, data, mode):
    """Atomically make ``path`` hold ``data`` with ``mode``; returns "written",
    "unchanged" (same bytes: not rewritten, mtime kept) or "mode fixed"."""
    if _sha256_of(path) == hashlib.sha256(data).hexdigest():
        if os.stat(path).st_mode & 0o7777 != mode:
            os.chmod(path, mode)
            return "mode fixed"
        return "unchanged"
    write_atomic(path, data, mode)
    return "written"


def read_manifest(conf_dir):
    """The manifest install wrote in ``conf_dir`` ({"files": {path: sha256}, ...}), or None."""
    path = os.path.join(conf_dir, MANIFEST_NAME)
    try:
        with open(path) as f:
            man = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InstallError(f"{path}: not a manifest written by install-cni ({exc}); "
                           f"remove it by hand if you know what it was") from None
    if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
        raise InstallError(f"{path}: not a manifest written by install-cni (no \"files\" object)")
    return man


# ---------------------------------------------------------------- the host's python3

def _inside(root, path):
    return os.path.join(root, path.lstrip("/")) if root != "/" else path


def _resolve_in_root(root, path, depth=0):
    """``path`` (absolute, as the host sees it) with symlinks followed inside ``root``."""
    full = _inside(root, path)
    if depth < 40 and os.path.islink(full):
        target = os.readlink(full)
        if not target.startswith("/"):
            target = os.path.join(os.path.dirname(path), target)
        return _resolve_in_root(root, os.path.normpath(target), depth + 1)
    return path


def _version_of(root, host_path):
    """(major, minor) of the interpreter at ``host_path`` (as the host sees it), or None
    when it cannot be told. On this root it is asked; under another root its resolved
    name (python3.11) tells, else it is asked inside the root with chroot."""
    code = "import sys; print('%d.%d' % sys.version_info[:2])"
    if root == "/":
        cmd = [host_path, "-IS", "-c", code]
    else:
        m = re.fullmatch(r"python(\d+)\.(\d+)", os.path.basename(_resolve_in_root(root, host_path)))
        if m:
            return int(m.group(1)), int(m.group(2))
        cmd = ["chroot", root, host_path, "-IS", "-c", code]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                           env={"PATH": HOST_PATH})
        m = re.fullmatch(r"(\d+)\.(\d+)", p.stdout.strip())
        return (int(m.group(1)), int(m.group(2))) if p.returncode == 0 and m else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_host_python(python=None, host_root="/", path=None):
    """The interpreter the plugin will run with on the host, as (path, version or None);
    InstallError when there is none or it is older than 3.9. ``python`` None: ``python3``
    in ``path`` (default: this process's PATH when ``host_root`` is /, else HOST_PATH),
    the lookup /bin/sh does at run time; else that absolute path."""
    if not os.path.isdir(host_root):
        raise InstallError(f"--host-root {host_root!r} is not a directory (accepted: where the "
                           f"node's root filesystem is mounted, / when install-cni runs on it)")
    where = f" under --host-root {host_root}" if host_root != "/" else ""
    if python is not None:
        found = python if os.access(_inside(host_root, python), os.X_OK) else None
        if found is None:
            raise InstallError(f"--python {python}: no executable there{where}; the plugin "
                               f"would fail on every pod")
    else:
        path = path if path is not None else (os.environ.get("PATH", HOST_PATH)
                                              if host_root == "/" else HOST_PATH)
        dirs = [d for d in path.split(":") if d.startswith("/")]
        found = next((os.path.join(d, "python3") for d in dirs
                      if os.path.isfile(_inside(host_root, os.path.join(d, "python3")))
                      and os.access(_inside(host_root, os.path.join(d, "python3")), os.X_OK)), None)
        if found is None:
            raise InstallError(
                f"no python3 in {':'.join(dirs) or '(an empty PATH)'}{where}: the vswitch CNI "
                f"plugin runs with the host's python3 (3.9 or later), and a plugin without one "
                f"would fail on every pod. Install it on the host (Debian/Ubuntu: apt-get install "
                f"python3-minimal; RHEL/Fedora: dnf install python3-minimal), or pass --python PATH")
    version = _version_of(host_root, found)
    if version is not None and version < MIN_PYTHON:
        raise InstallError(f"{found}{where} is Python {version[0]}.{version[1]}; the vswitch CNI "
                           f"plugin needs 3.9 or later: install a newer python3 or pass --python PATH")
    return found, version


# ---------------------------------------------------------------- install, uninstall

def install_report(bin_dir, conf_dir, socket_path=DEFAULT_SOCKET, subnet=DEFAULT_SUBNET,
                   name=DEFAULT_NETWORK, python=None, pod_cidr_families=None, *,
                   conflist_name=CONFLIST_NAME, launcher=False, host_root="/", host_path=None,
                   check_python=True, form=None):
    """Install (see the module docstring); returns {"plugin", "python_plugin", "conflist",
    "manifest": path, "actions": [(path, what)], "python": (path, version) or None,
    "notes": [text]}. ``form``: "client", "python" or None (the client when it was built)."""
    if not socket_path.startswith("/"):
        raise InstallError(f"--socket {socket_path!r} must be an absolute path")
    check_conflist_name(conflist_name)
    try:
        conf = conflist(subnet, socket_path, name, pod_cidr_families=pod_cidr_families)
    except ValueError as exc:
        raise InstallError(str(exc)) from None
    notes = []
    client = client_path()
    if form not in (None, *FORMS):
        raise InstallError(f"--form {form!r}: accepted are {' and '.join(FORMS)}")
    if form == "client" and client is None:
        raise InstallError(f"--form client: the C client is not built (no {os.path.join(_package_dirs()[1], CLIENT_NAME)}); "
                           f"run `python setup.py build_ext --inplace` in the checkout, or pass "
                           f"--form python")
    if form is None:
        form = "client" if client is not None else "python"
        if client is None:
            notes.append(f"warning: the C client is not built (no {os.path.join(_package_dirs()[1], CLIENT_NAME)}): "
                         f"{PLUGIN_NAME} is the Python plugin, which starts python3 on every invocation (about 20 ms); "
                         f"run `python setup.py build_ext --inplace` in the checkout, or pass "
                         f"--form python to say this is meant")
    host_python = None
    if launcher:
        plugin_bytes = launcher_text(python).encode()
    else:
        if check_python:
            host_python = check_host_python(python, host_root, host_path)
        plugin_bytes = build_bytes(python)
    if form == "client":
        with open(client, "rb") as f:
            client_bytes = f.read()
    os.makedirs(bin_dir, exist_ok=True)
    os.makedirs(conf_dir, exist_ok=True)
    bin_dir, conf_dir = os.path.abspath(bin_dir), os.path.abspath(conf_dir)
    exe = os.path.join(bin_dir, PLUGIN_NAME)
    conf_path = os.path.join(conf_dir, conflist_name)
    old = read_manifest(conf_dir)
    if form == "client":       # the fallback first: a client never runs without it
        py_exe = os.path.join(bin_dir, PYTHON_PLUGIN_NAME)
        wanted = [(py_exe, plugin_bytes, 0o755), (exe, client_bytes, 0o755)]
    else:
        py_exe = exe
        wanted = [(exe, plugin_bytes, 0o755)]
    wanted.append((conf_path, (json.dumps(conf, indent=2) + "\n").encode(), 0o644))
    actions = [(path, _put(path, data, mode)) for path, data, mode in wanted]
    files = {path: hashlib.sha256(data).hexdigest() for path, data, _ in wanted}
    kept = {}
    for path, digest in sorted((old or {}).get("files", {}).items()):
        if path in files:
            continue
        if _sha256_of(path) == digest:                 # ours, unchanged, no longer wanted
            os.unlink(path)
            actions.append((path, "removed (installed before, not by this install)"))
        elif os.path.lexists(path):
            kept[path] = digest
            notes.append(f"{path} was installed before and changed since: kept (uninstall-cni "
                         f"--force removes it)")
    for legacy in LEGACY_CONFLIST_NAMES:
        lpath = os.path.join(conf_dir, legacy)
        if legacy != conflist_name and os.path.exists(lpath) and lpath not in (old or {}).get("files", {}):
            notes.append(f"{lpath} is left as found (no manifest says install-cni wrote it); "
                         f"remove it if it is an old vswitch list")
    first = sorted(f for f in os.listdir(conf_dir)
                   if f.endswith((".conf", ".conflist", ".json")) and not f.startswith("."))
    if first and first[0] != conflist_name:
        notes.append(f"{first[0]} sorts before {conflist_name}: a runtime that loads the first "
                     f"network list (containerd, CRI-O) uses it, not vswitch")
    manifest = {"installer": "vswitchctl install-cni", "bin_dir": bin_dir, "conf_dir": conf_dir,
                "files": dict(files, **kept)}
    man_path = os.path.join(conf_dir, MANIFEST_NAME)
    actions.append((man_path, _put(man_path, (json.dumps(manifest, indent=2, sort_keys=True)
                                              + "\n").encode(), 0o644)))
    return {"plugin": exe, "python_plugin": py_exe, "conflist": conf_path, "manifest": man_path,
            "actions": actions, "python": host_python, "notes": notes}


def install(bin_dir, conf_dir, socket_path=DEFAULT_SOCKET, subnet=DEFAULT_SUBNET,
            name=DEFAULT_NETWORK, python=None, pod_cidr_families=None, **options):
    """Write ``bin_dir/vswitch`` (and ``bin_dir/vswitch-py``), ``conf_dir/05-vswitch.conflist``
    and the manifest; returns (plugin path, conflist path). ``subnet``: one CIDR or a list (one IPv4 and one IPv6:
    dual stack); ``python`` and ``options``: :func:`install_report`'s."""
    rep = install_report(bin_dir, conf_dir, socket_path, subnet, name, python,
                         pod_cidr_families, **options)
    return rep["plugin"], rep["conflist"]


def uninstall(bin_dir, conf_dir, force=False):
    """Remove what install wrote into ``bin_dir`` and ``conf_dir`` (the manifest's paths whose
    content is unchanged; all of them with ``force``), and the manifest once nothing of it
    is left. Returns {"removed": [...], "gone": [...], "kept": [(path, why)], "manifest": path
    or None}; nothing outside the two directories is touched, even if a manifest names it."""
    bin_dir, conf_dir = os.path.abspath(bin_dir), os.path.abspath(conf_dir)
    man = read_manifest(conf_dir)
    out = {"removed": [], "gone": [], "kept": [], "manifest": None}
    if man is None:
        return out
    left = {}
    for path, digest in sorted(man["files"].items()):
        if not isinstance(path, str) or os.path.dirname(path) not in (bin_dir, conf_dir):
            out["kept"].append((path, f"not in {bin_dir} or {conf_dir}: never removed"))
            continue
        if not os.path.lexists(path):
            out["gone"].append(path)
            continue
        actual = _sha256_of(path)
        if actual != digest and not force:
            left[path] = digest
            out["kept"].append((path, "changed since install-cni wrote it (--force removes it)"
                                if actual else "no longer a regular file (--force removes it)"))
            continue
        os.unlink(path)
        out["removed"].append(path)
    man_path = os.path.join(conf_dir, MANIFEST_NAME)
    if left:
        write_atomic(man_path, json.dumps(dict(man, files=left), indent=2, sort_keys=True) + "\n", 0o644)
        out["manifest"] = man_path
    else:
        os.unlink(man_path)
    _fsync_dir(conf_dir)
    return out


# ---------------------------------------------------------------- command lines

def run_install(args, socket_path):
    """Install from the options of ``add_install_arguments`` with ``socket_path`` in the
    network list; prints what was done; 0, or 2 with the reason on stderr."""
    try:
        if args.use_pod_cidr is not None and args.subnet:
            raise InstallError("--use-pod-cidr and --subnet exclude each other")
        fams = _pod_cidr_families(args.use_pod_cidr or "4") if args.use_pod_cidr is not None else None
        rep = install_report(args.bin_dir, args.conf_dir, socket_path,
                             args.subnet or DEFAULT_SUBNET, args.name, args.python,
                             pod_cidr_families=fams, conflist_name=args.conflist_name,
                             launcher=args.launcher, host_root=args.host_root,
                             host_path=args.host_path, check_python=not args.no_python_check,
                             form=args.form)
    except (ValueError, OSError) as exc:
        print(f"install-cni: {exc}", file=sys.stderr)
        return 2
    for path, what in rep["actions"]:
        print(f"{what}: {path}")
    if rep["python"]:
        py, ver = rep["python"]
        print(f"the plugin runs with {py} ({'%d.%d' % ver if ver else 'version not known'})")
    for note in rep["notes"]:
        print(f"note: {note}", file=sys.stderr)
    return 0


def run_uninstall(args):
    """Uninstall from the options of ``add_uninstall_arguments``; prints what was done;
    0 when all is removed, 1 when changed files were kept, 2 on an error."""
    try:
        out = uninstall(args.bin_dir, args.conf_dir, args.force)
    except (ValueError, OSError) as exc:
        print(f"uninstall-cni: {exc}", file=sys.stderr)
        return 2
    if not (out["removed"] or out["gone"] or out["kept"]):
        print(f"nothing to remove: no {MANIFEST_NAME} in {args.conf_dir} (install-cni's manifest)")
    for path in out["removed"]:
        print(f"removed: {path}")
    for path in out["gone"]:
        print(f"already gone: {path}")
    for path, why in out["kept"]:
        print(f"kept: {path}: {why}", file=sys.stderr)
    return 1 if out["kept"] else 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="vswitchctl install-cni",
        description="Install the vswitch CNI plugin (the C client and, as its fallback, one "
                    "relocatable file run by the host's python3 >= 3.9) and a network list, "
                    "atomically and idempotently; uninstall-cni removes exactly that.")
    add_install_arguments(parser)
    args = parser.parse_args(argv)
    return run_install(args, args.socket)


def main_uninstall(argv=None):
    parser = argparse.ArgumentParser(
        prog="vswitchctl uninstall-cni",
        description="Remove what install-cni installed into these directories (its manifest's "
                    "files, unchanged ones only unless --force) and nothing else.")
    add_uninstall_arguments(parser)
    return run_uninstall(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
