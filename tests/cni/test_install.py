"""install-cni and uninstall-cni on real files (cni/install.py, vswitchctl).

The network list sorts first among the lists other runtimes and plugins install; files are
replaced atomically (a reader polling the directory while install-cni rewrites it sees only
whole files, each one of the versions written); re-running changes nothing (same inode, same
mtime); the plugin is the C client with the Python plugin beside it as its fallback (or, with
--form python, the Python plugin alone, and switching forms leaves no file of the other);
uninstall removes the manifest's files and nothing else, keeps changed ones unless
--force, and never removes a path outside the two directories whatever the manifest says;
a host without python3 gets a clear refusal and no plugin.
"""
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vswitch_cni import install as inst

REPO = Path(__file__).resolve().parents[2]
USUAL = ["10-containerd-net.conflist", "87-podman-bridge.conflist", "10-flannel.conflist",
         "10-calico.conflist", "99-loopback.conf", "10-kindnet.conflist", "11-crio-ipv4-bridge.conflist"]


def ctl(*args):
    return subprocess.run([sys.executable, "-m", "vswitch.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=str(REPO),
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def dirs(tmp_path):
    return tmp_path / "opt-cni-bin", tmp_path / "etc-cni-net.d"


def test_the_default_conflist_name_sorts_first_among_the_usual_ones(tmp_path):
    b, c = dirs(tmp_path)
    c.mkdir(parents=True)
    for name in USUAL:
        (c / name).write_text('{"cniVersion": "1.0.0", "name": "other", "plugins": []}\n')
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c)
    assert r.returncode == 0, r.stderr
    lists = sorted(n for n in os.listdir(c) if n.endswith((".conf", ".conflist", ".json")))
    assert lists[0] == "05-vswitch.conflist" == inst.CONFLIST_NAME
    assert "sorts before" not in r.stderr
    # a meta plugin's 00-... still wins, and install-cni says so
    (c / "00-multus.conf").write_text("{}\n")
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c)
    assert r.returncode == 0 and "00-multus.conf sorts before 05-vswitch.conflist" in r.stderr


def test_conflist_name_is_configurable_and_checked(tmp_path):
    b, c = dirs(tmp_path)
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--conflist-name", "01-vsw.conflist")
    assert r.returncode == 0, r.stderr
    assert json.loads((c / "01-vsw.conflist").read_text())["plugins"][0]["type"] == "vswitch"
    for bad in ("vsw.json", "../x.conflist", ".hidden.conflist", "a/b.conflist"):
        r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--conflist-name", bad)
        assert r.returncode == 2 and "ending in .conflist" in r.stderr and repr(bad) in r.stderr


def test_reinstall_is_idempotent_same_inode_same_mtime(tmp_path):
    b, c = dirs(tmp_path)
    assert ctl("install-cni", "--bin-dir", b, "--conf-dir", c).returncode == 0
    paths = [b / "vswitch", b / "vswitch-py", c / "05-vswitch.conflist", c / inst.MANIFEST_NAME]
    past = 1_000_000_000
    for p in paths:
        os.utime(p, (past, past))
    before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns, p.read_bytes()) for p in paths}
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("unchanged: ") == 4 and "written" not in r.stdout
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns, p.read_bytes()) for p in paths} == before
    # a changed setting rewrites the list (new inode: replaced by rename), not the plugin
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--subnet", "10.99.0.0/16")
    assert f"written: {c / '05-vswitch.conflist'}" in r.stdout
    assert f"unchanged: {b / 'vswitch'}" in r.stdout and f"unchanged: {b / 'vswitch-py'}" in r.stdout
    assert os.stat(c / "05-vswitch.conflist").st_ino != before[paths[1]][0]
    # a wrong mode is fixed without a rewrite
    os.chmod(b / "vswitch", 0o600)
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--subnet", "10.99.0.0/16")
    assert f"mode fixed: {b / 'vswitch'}" in r.stdout and os.stat(b / "vswitch").st_mode & 0o777 == 0o755
    assert not [n for d in (b, c) for n in os.listdir(d) if ".tmp" in n]     # no temp left


def test_a_reader_polling_the_directory_never_sees_a_partial_file(tmp_path):
    """Two installs alternate (different subnet, different plugin interpreter) while a
    reader lists and reads the directories as fast as it can: every read is whole and
    equal to one of the two versions; no temp file ever has a name a runtime loads."""
    b, c = dirs(tmp_path)
    versions = [dict(subnet=f"10.{i}.0.0/16", python=p)
                for i, p in ((71, None), (72, os.path.realpath(sys.executable)))]
    expected_conf, expected_bin, expected_py = set(), set(), set()
    for v in versions:
        exe, conf = inst.install(str(b), str(c), **v)
        expected_conf.add(Path(conf).read_bytes())
        expected_bin.add(Path(exe).read_bytes())
        expected_py.add((b / "vswitch-py").read_bytes())
    assert len(expected_conf) == 2 and len(expected_bin) == 1 and len(expected_py) == 2
    stop = threading.Event()
    seen = {"reads": 0, "bad": [], "names": set()}

    def reader():
        while not stop.is_set():
            for d in (b, c):
                for name in os.listdir(d):
                    seen["names"].add(name)
            for path, allowed in ((c / "05-vswitch.conflist", expected_conf), (b / "vswitch", expected_bin),
                                  (b / "vswitch-py", expected_py)):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    seen["bad"].append(f"{path} missing")
                    continue
                seen["reads"] += 1
                if data not in allowed:
                    seen["bad"].append(f"{path}: {len(data)} bytes, not a version written")
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(40):
            inst.install(str(b), str(c), **versions[i % 2])
    finally:
        stop.set()
        t.join()
    assert seen["bad"] == [] and seen["reads"] > 40
    loadable = [n for n in seen["names"] if n.endswith((".conf", ".conflist", ".json"))]
    assert loadable == ["05-vswitch.conflist"]


def test_uninstall_removes_exactly_what_install_installed(tmp_path):
    b, c = dirs(tmp_path)
    b.mkdir(parents=True)
    c.mkdir(parents=True)
    (b / "bridge").write_bytes(b"\x7fELF other plugin")
    (c / "10-containerd-net.conflist").write_text("{}\n")
    assert ctl("install-cni", "--bin-dir", b, "--conf-dir", c).returncode == 0
    assert sorted(os.listdir(b)) == ["bridge", "vswitch", "vswitch-py"]
    r = ctl("uninstall-cni", "--bin-dir", b, "--conf-dir", c)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(b)) == ["bridge"] and sorted(os.listdir(c)) == ["10-containerd-net.conflist"]
    assert (b / "bridge").read_bytes() == b"\x7fELF other plugin"
    r = ctl("uninstall-cni", "--bin-dir", b, "--conf-dir", c)       # again: nothing, and says so
    assert r.returncode == 0 and "nothing to remove" in r.stdout


def test_uninstall_keeps_a_changed_file_unless_forced(tmp_path):
    b, c = dirs(tmp_path)
    assert ctl("install-cni", "--bin-dir", b, "--conf-dir", c).returncode == 0
    edited = c / "05-vswitch.conflist"
    edited.write_text(edited.read_text().replace("10.88.0.0/16", "10.55.0.0/16"))
    r = ctl("uninstall-cni", "--bin-dir", b, "--conf-dir", c)
    assert r.returncode == 1
    assert f"kept: {edited}: changed since install-cni wrote it" in r.stderr
    assert f"removed: {b / 'vswitch'}" in r.stdout
    assert edited.exists() and not (b / "vswitch").exists()
    man = json.loads((c / inst.MANIFEST_NAME).read_text())
    assert list(man["files"]) == [str(edited)]               # what is left to remove
    r = ctl("uninstall-cni", "--bin-dir", b, "--conf-dir", c, "--force")
    assert r.returncode == 0 and f"removed: {edited}" in r.stdout
    assert os.listdir(c) == [] and os.listdir(b) == []


def test_uninstall_never_removes_outside_the_two_directories(tmp_path):
    """A manifest naming another file (tampered, or hand-edited) removes nothing there."""
    b, c = dirs(tmp_path)
    inst.install(str(b), str(c))
    victim = tmp_path / "precious"
    victim.write_text("keep me\n")
    man_path = c / inst.MANIFEST_NAME
    man = json.loads(man_path.read_text())
    man["files"][str(victim)] = hashlib.sha256(victim.read_bytes()).hexdigest()
    man["files"][str(b / ".." / "precious")] = man["files"][str(victim)]
    man_path.write_text(json.dumps(man))
    out = inst.uninstall(str(b), str(c), force=True)
    assert victim.read_text() == "keep me\n"
    assert sorted(p for p, _ in out["kept"]) == sorted([str(victim), str(b / ".." / "precious")])
    assert sorted(out["removed"]) == sorted([str(b / "vswitch"), str(b / "vswitch-py"),
                                             str(c / "05-vswitch.conflist")])


def test_a_new_conflist_name_replaces_the_old_one_installed_before(tmp_path):
    b, c = dirs(tmp_path)
    inst.install(str(b), str(c), conflist_name="07-a.conflist")
    rep = inst.install_report(str(b), str(c), conflist_name="08-b.conflist")
    assert (str(c / "07-a.conflist"), "removed (installed before, not by this install)") in rep["actions"]
    assert sorted(os.listdir(c)) == [inst.MANIFEST_NAME, "08-b.conflist"]
    # an old 10-vswitch.conflist of an earlier install-cni (no manifest) is left, with a note
    (c / "10-vswitch.conflist").write_text("{}\n")
    rep = inst.install_report(str(b), str(c))
    assert (c / "10-vswitch.conflist").exists() and any("10-vswitch.conflist" in n for n in rep["notes"])


def test_no_python3_on_the_host_refuses_and_writes_nothing(tmp_path):
    b, c = dirs(tmp_path)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--host-path", empty)
    assert r.returncode == 2
    assert f"no python3 in {empty}" in r.stderr and "3.9 or later" in r.stderr
    assert not (b / "vswitch").exists() and not (c / "05-vswitch.conflist").exists()
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--python", "/nonexistent/python3")
    assert r.returncode == 2 and "--python /nonexistent/python3: no executable there" in r.stderr
    # --no-python-check writes it anyway (for another host)
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--host-path", empty, "--no-python-check")
    assert r.returncode == 0 and (b / "vswitch").exists()


def _fake_root(tmp_path, target):
    """A node root (as an init container mounts it) whose /usr/bin/python3 -> ``target``."""
    root = tmp_path / f"host-{target}"
    (root / "usr" / "bin").mkdir(parents=True)
    real = root / "usr" / "bin" / target
    real.write_bytes(b"\x7fELF")           # never run: the resolved name tells the version
    real.chmod(0o755)
    os.symlink(target, root / "usr" / "bin" / "python3")
    return root


def test_host_root_python_is_found_and_its_version_checked(tmp_path):
    root = _fake_root(tmp_path, "python3.11")
    b, c = dirs(tmp_path)
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--host-root", root)
    assert r.returncode == 0, r.stderr
    assert "the plugin runs with /usr/bin/python3 (3.11)" in r.stdout
    old = _fake_root(tmp_path, "python3.6")
    r = ctl("install-cni", "--bin-dir", tmp_path / "b2", "--conf-dir", tmp_path / "c2", "--host-root", old)
    assert r.returncode == 2
    assert f"/usr/bin/python3 under --host-root {old} is Python 3.6" in r.stderr
    empty_root = tmp_path / "bare-root"
    empty_root.mkdir()
    r = ctl("install-cni", "--bin-dir", tmp_path / "b3", "--conf-dir", tmp_path / "c3", "--host-root", empty_root)
    assert r.returncode == 2 and f"under --host-root {empty_root}" in r.stderr
    assert inst.HOST_PATH.replace(":", "") in r.stderr.replace(":", "")


def test_build_cni_writes_the_plugin_alone(tmp_path):
    out = tmp_path / "vswitch"
    r = ctl("build-cni", out)
    assert r.returncode == 0, r.stderr
    assert os.access(out, os.X_OK) and out.read_bytes().startswith(b"#!/bin/sh\n")
    p = subprocess.run([str(out)], env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                       capture_output=True, timeout=60)
    assert p.returncode == 0 and json.loads(p.stdout)["cniVersion"] == "1.1.0"
    r = ctl("build-cni", tmp_path / "p2", "--python", "python3")
    assert r.returncode == 2 and "absolute path" in r.stderr


def test_the_client_and_its_fallback_or_the_python_plugin_alone(tmp_path):
    """Default: BIN/vswitch is the built C client, BIN/vswitch-py the Python plugin (with
    --python pinned there); --form python: the Python plugin alone as BIN/vswitch, and the
    client's files go; back to the client: vswitch-py comes back."""
    from vswitch_cni import build
    b, c = dirs(tmp_path)
    client = build.client_path()
    assert client, "the C client is not built: python setup.py build_ext --inplace"
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--python", "/usr/bin/python3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.index(f"written: {b / 'vswitch-py'}") < r.stdout.index(f"written: {b / 'vswitch'}\n")
    assert (b / "vswitch").read_bytes() == Path(client).read_bytes()
    assert (b / "vswitch-py").read_bytes().startswith(b"#!/usr/bin/python3 -IS\n")
    assert set(json.loads((c / inst.MANIFEST_NAME).read_text())["files"]) == \
        {str(b / "vswitch"), str(b / "vswitch-py"), str(c / "05-vswitch.conflist")}
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--form", "python")
    assert r.returncode == 0, r.stderr
    assert f"removed (installed before, not by this install): {b / 'vswitch-py'}" in r.stdout
    assert sorted(os.listdir(b)) == ["vswitch"] and (b / "vswitch").read_bytes().startswith(b"#!/bin/sh\n")
    assert set(json.loads((c / inst.MANIFEST_NAME).read_text())["files"]) == \
        {str(b / "vswitch"), str(c / "05-vswitch.conflist")}
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--form", "client", "--launcher")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(b)) == ["vswitch", "vswitch-py"]
    assert "developer launcher" in (b / "vswitch-py").read_text()
    v = subprocess.run([str(b / "vswitch")], env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=60)
    assert v.returncode == 0 and json.loads(v.stdout)["cniVersion"] == "1.1.0"
    r = ctl("install-cni", "--bin-dir", b, "--conf-dir", c, "--form", "other")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_without_a_built_client_the_python_plugin_is_installed_with_a_warning(tmp_path, monkeypatch):
    b, c = dirs(tmp_path)
    monkeypatch.setattr(inst, "client_path", lambda: None)
    rep = inst.install_report(str(b), str(c))
    assert sorted(os.listdir(b)) == ["vswitch"] and (b / "vswitch").read_bytes().startswith(b"#!/bin/sh\n")
    assert rep["python_plugin"] == rep["plugin"] == str(b / "vswitch")
    assert any(n.startswith("warning: the C client is not built") for n in rep["notes"])
    with pytest.raises(inst.InstallError, match="--form client: the C client is not built"):
        inst.install_report(str(b), str(c), form="client")


@pytest.mark.parametrize("argv", [["--bin-dir", "b"], ["--conf-dir", "c"]])
def test_uninstall_needs_both_directories(argv, tmp_path):
    r = ctl("uninstall-cni", *argv)
    assert r.returncode == 2 and "required" in r.stderr
