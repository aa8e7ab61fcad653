"""The daemon's log file (issue 11, finding 8): created 0600 (0640 and the group with
--log-group) because it names pods and addresses; reopened on SIGHUP so that a rotated
file is replaced by a new one with the same mode; --log-level drops the less severe
events."""
import grp
import json
import os
import signal
import stat
import time

from tests.integration.helpers import running_cluster


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _events(path) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["event"] for line in f if line.strip()]


def _wait_for(pred, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_log_file_is_0600_and_rotates_on_sighup(nss, tmp_path):
    old_umask = os.umask(0o022)         # what a service manager typically gives
    try:
        with running_cluster(nss, tmp_path) as c:
            d = c.daemon
            assert _mode(d.log_file) == 0o600
            assert "started" in _events(d.log_file)
            rotated = d.log_file + ".1"
            os.rename(d.log_file, rotated)
            d.proc.send_signal(signal.SIGHUP)
            _wait_for(lambda: os.path.exists(d.log_file))
            assert _mode(d.log_file) == 0o600
            assert d.request({"op": "counters", "port": "no-such-port"})["code"] == 4
            _wait_for(lambda: "request_failed" in _events(d.log_file))
            assert "log_reopened" in _events(d.log_file)
            assert "request_failed" not in _events(rotated)
            assert d.proc.poll() is None        # SIGHUP does not stop it
            assert d.call("status")["ok"]
    finally:
        os.umask(old_umask)


def test_log_group_makes_the_file_0640_of_that_group(nss, tmp_path):
    group = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    with running_cluster(nss, tmp_path, daemon_args=["--log-group", group.gr_name]) as c:
        st = os.stat(c.daemon.log_file)
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == group.gr_gid


def test_log_level_warning_drops_info_events(nss, tmp_path):
    with running_cluster(nss, tmp_path, daemon_args=["--log-level", "warning"]) as c:
        d = c.daemon
        assert d.request({"op": "counters", "port": "no-such-port"})["code"] == 4
        _wait_for(lambda: "request_failed" in _events(d.log_file))
        assert "started" not in _events(d.log_file)
