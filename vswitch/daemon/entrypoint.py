"""The container image's entry point: vswitchd under a supervisor that gives the NIC back.

Theory of operation
-------------------
With ``--uplink NIC`` the node's own addresses live on the switch's host port while
vswitchd runs. vswitchd gives them back itself on SIGTERM/SIGINT (``vswitch.daemon.uplink``),
but a daemon that dies (a crash, an OOM kill of the daemon, ``kill -9``) cannot, and a
daemon that cannot come back (a crash loop, a broken upgrade) would leave the node without
its addresses: the kubelet could no longer reach the API server to repair it. Calico/VPP
faces the same problem with its uplink.

So the image runs ``vswitch-entrypoint vswitchd ARGS...``: this module starts vswitchd as
its child (``python -m vswitch.daemon ARGS``), forwards SIGTERM, SIGINT and SIGHUP to it,
reaps every child (it is PID 1 in the container), and when vswitchd exits abnormally
(non-zero status or killed by a signal) it reads the daemon's state file
(``--state-dir``/state.json) and, if the file still records a moved uplink, puts the NIC's
addresses, gateway routes and sysctls back with the daemon's own ``uplink.restore`` and
marks the uplink restored in the file (``uplink: null``, attachments kept: the next
vswitchd re-adopts the pods and moves the addresses again). Then it exits with the
daemon's status (128+N for a signal), so the kubelet sees the failure and restarts the
container. The NIC is thus without its addresses only while a vswitchd runs.

Not covered: a SIGKILL of the whole container (the entry point included), e.g. when
``terminationGracePeriodSeconds`` runs out; the next vswitchd start then restores or
reuses the saved originals as usual. Any first argument other than ``vswitchd`` is
exec'ed as it is (``vswitch-entrypoint vswitchctl install-cni ...``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# vswitchd's defaults for the two options read here (vswitch/daemon/main.py; a test checks
# that they agree with vswitchd's own parser)
DEFAULT_STATE_DIR = "/var/lib/vswitch"
DEFAULT_SWITCH = "vsw0"


def log(event: str, level: str = "info", **fields):
    """One JSON line on stderr, like vswitchd's log (the container's log)."""
    rec = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "level": level, "event": event,
           "component": "entrypoint", **fields}
    print(json.dumps(rec, sort_keys=True, default=str), file=sys.stderr, flush=True)


def daemon_paths(args: list[str]) -> tuple[str, str]:
    """(state dir, host port name) of a vswitchd command line."""
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--state-dir", default=DEFAULT_STATE_DIR)
    ap.add_argument("--switch", default=DEFAULT_SWITCH)
    a, _ = ap.parse_known_args(args)
    return a.state_dir, a.switch


def restore_uplink(state_dir: str, switch: str) -> bool:
    """Give the uplink recorded in the state file its NIC back; True if one was restored."""
    path = os.path.join(state_dir, "state.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        log("state_unreadable", level="error", path=path, error=str(exc))
        return False
    saved = data.get("uplink") if isinstance(data, dict) else None
    if not saved:
        return False
    from vswitch.daemon.state import State        # here: a broken import must not stop the child
    from vswitch.daemon.uplink import restore
    host_name = (data.get("host") or {}).get("name") or switch
    restore(saved, host_name, log)
    st = State(state_dir)
    st.load()
    st.uplink = None                              # attachments stay: the next daemon re-adopts them
    st.save()
    return True


def supervise(args: list[str]) -> int:
    """Run vswitchd with ``args``; after an abnormal exit restore the uplink. Its exit status."""
    state_dir, switch = daemon_paths(args)
    child = subprocess.Popen([sys.executable, "-m", "vswitch.daemon", *args])

    def forward(signum, frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    while True:                      # PID 1 reaps every orphan; our child's status ends the loop
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if pid == child.pid:
            break
    child.returncode = os.waitstatus_to_exitcode(status)
    rc = child.returncode if child.returncode >= 0 else 128 - child.returncode
    if rc != 0:
        log("daemon_exited", level="error", status=rc)
        try:
            if restore_uplink(state_dir, switch):
                log("uplink_given_back", level="warning", state_dir=state_dir)
        except Exception as exc:           # the exit status still reaches the kubelet
            log("uplink_restore_failed", level="error", error=repr(exc))
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) or ["vswitchd"]
    if argv[0] != "vswitchd":
        os.execvp(argv[0], argv)
    return supervise(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
