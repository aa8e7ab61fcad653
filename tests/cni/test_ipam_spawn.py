"""The plugin runs its IPAM binary without subprocess (cni/ipam.py ``_run``: posix_spawn on
three pipes, polled): stdin delivered whole, stdout returned, stderr passed through, the
exit status as subprocess reports it, nothing of ours inherited, and a missing binary
reported as a CNI error."""
import os
import subprocess
import tempfile

import pytest

from vswitch_cni import ipam
from vswitch_cni.errors import CniError, IPAM_FAILED

ENV = {"PATH": "/usr/bin:/bin"}


def _run_sh(script, stdin=b""):
    # the plugin passes no arguments beyond argv[0]: a script file stands in
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write("#!/bin/sh\n" + script + "\n")
    os.chmod(f.name, 0o755)
    try:
        return ipam._spawn(f.name, dict(ENV), stdin)
    finally:
        os.unlink(f.name)


def test_stdin_larger_than_a_pipe_arrives_whole_while_output_flows_back():
    data = os.urandom(3 << 20)             # 3 MiB: many pipe buffers each way, both at once
    rc, out, err = _run_sh("cat; echo done >&2", data)
    assert rc == 0 and out == data and err == b"done\n"


def test_large_stderr_and_stdout_together_do_not_block():
    rc, out, err = _run_sh("head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2; exit 3")
    assert rc == 3 and out == bytes(1000000) and err == bytes(1000000)


def test_a_child_that_does_not_read_its_stdin_is_not_an_error():
    rc, out, err = _run_sh("echo '{\"ok\": 1}'", os.urandom(1 << 20))
    assert rc == 0 and out == b'{"ok": 1}\n'


def test_exit_by_signal_is_negative_like_subprocess():
    rc, _, _ = _run_sh("kill -TERM $$")
    assert rc == -15


def test_sigpipe_is_back_to_default_in_the_child():
    # Python ignores SIGPIPE; the child gets the default again (as with subprocess)
    rc, out, _ = _run_sh("grep SigIgn /proc/$$/status")
    ignored = int(out.split()[-1], 16)
    assert rc == 0 and not ignored & (1 << (13 - 1)), out


def test_no_descriptor_of_ours_is_inherited():
    r, w = os.pipe()
    high = os.dup2(r, 250, inheritable=True)    # even an inheritable one (subprocess: close_fds)
    try:
        rc, out, _ = _run_sh("for fd in 250 %d %d; do [ -e /proc/$$/fd/$fd ] && echo leaked $fd; done; echo checked" % (r, w))
    finally:
        for fd in (r, w, high):
            os.close(fd)
    assert rc == 0 and out == b"checked\n", out


def test_environment_is_exactly_the_given_one():
    rc, out, _ = ipam._spawn("/usr/bin/env", {"A": "1", "CNI_COMMAND": "ADD"}, b"")
    assert rc == 0 and sorted(out.decode().split()) == ["A=1", "CNI_COMMAND=ADD"]


def test_same_results_as_subprocess():
    script = "cat >/dev/null; printf 'out'; printf 'err' >&2; exit 7"
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write("#!/bin/sh\n" + script + "\n")
    os.chmod(f.name, 0o755)
    try:
        p = subprocess.run([f.name], input=b"in", env=ENV, capture_output=True)
        assert ipam._spawn(f.name, dict(ENV), b"in") == (p.returncode, p.stdout, p.stderr)
    finally:
        os.unlink(f.name)


def test_missing_or_unexecutable_binary_is_a_cni_error(tmp_path):
    with pytest.raises(CniError) as e:
        ipam._run(str(tmp_path / "no-such-ipam"), dict(ENV), b"{}")
    assert e.value.code == IPAM_FAILED and "no-such-ipam" in e.value.msg
    plain = tmp_path / "not-executable"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(CniError) as e:
        ipam._run(str(plain), dict(ENV), b"{}")
    assert e.value.code == IPAM_FAILED


def test_no_descriptor_leaks_in_the_plugin():
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        _run_sh("cat", b"x" * 100000)
        with pytest.raises(CniError):
            ipam._run("/nonexistent/ipam", dict(ENV), b"{}")
    after = set(os.listdir("/proc/self/fd"))
    assert len(after) <= len(before) + 1, (before, after)     # the listing's own fd at most
