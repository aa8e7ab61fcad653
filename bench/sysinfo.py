"""What machine a benchmark run happened on: CPU, kernel, load, package versions.

Theory of operation: everything here is read once at the start of a run (and the load
average again at its end) from /proc, /sys, dpkg-query, importlib.metadata and git; a
value that cannot be read is recorded as None rather than failing the run. The result is
a plain dict, written as ``sysinfo.json`` beside the benchmark JSON and summarised at the
top of the report, so a reader can judge how noisy the machine was.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
from pathlib import Path

DEBIAN_PACKAGES = ("iperf3", "containernetworking-plugins", "openvswitch-switch",
                   "iproute2", "iputils-ping")
PYTHON_PACKAGES = ("numpy", "cython", "pytest", "pytest-benchmark", "scapy", "pyroute2",
                   "matplotlib")
REPO = Path(__file__).resolve().parent.parent


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _run(cmd, timeout_s=5.0):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                             cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_info():
    model = None
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    gov = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    return {"model": model or platform.processor() or None, "count": os.cpu_count(),
            "usable": usable, "governor": gov.strip() if gov else None}


def debian_version(pkg):
    out = _run(["dpkg-query", "-W", "-f=${Status}\t${Version}", pkg])
    if not out or "\t" not in out:
        return None
    status, version = out.split("\t", 1)
    return version if status.endswith("installed") and not status.endswith("not-installed") \
        else None


def python_version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def mem_total_gib():
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


def busiest(n=4):
    """The n processes using most CPU right now (name and %), as one short string."""
    out = _run(["ps", "-eo", "pcpu=,comm=", "--sort=-pcpu"])
    if not out:
        return None
    items = []
    for line in out.splitlines()[:n]:
        parts = line.split(None, 1)
        if len(parts) == 2:
            items.append(f"{parts[1]} {parts[0]}%")
    return ", ".join(items)


def git_info():
    head = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if not head:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + (f" (+{len(dirty.splitlines())} modified files)" if dirty else "")


def collect():
    """The machine facts as a dict (JSON-serialisable)."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu": cpu_info(),
        "kernel": platform.release(),
        "mem_total_gib": mem_total_gib(),
        "loadavg_start": load,
        "busiest": busiest(),
        "python": platform.python_version(),
        "python_packages": {p: python_version(p) for p in PYTHON_PACKAGES},
        "debian_packages": {p: debian_version(p) for p in DEBIAN_PACKAGES},
        "git": git_info(),
        "cython_core_built": importlib.util.find_spec("vswitch.datapath._core") is not None
        if importlib.util.find_spec("vswitch") else False,
        "root": os.geteuid() == 0,
    }


def finish(info):
    """Record the load average at the end of a run into ``info``."""
    try:
        info["loadavg_end"] = list(os.getloadavg())
    except OSError:
        info["loadavg_end"] = None
    return info
