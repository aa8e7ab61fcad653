"""The README's first command: the demo runs its scenario and prints a true table."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vswitch import lab

REPO = Path(__file__).resolve().parents[2]


def _demo(*args, env=None):
    r = subprocess.run([sys.executable, "-m", "vswitch.lab.demo", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, **(env or {})))
    assert r.returncode == 0, r.stderr + r.stdout
    return r.stdout


def _row(out, check):
    line = next(line for line in out.splitlines() if line.startswith(check))
    return line[len(check):].split()


def test_simulated_demo_reaches_every_check():
    out = _demo("--sim", "--seconds", "1")
    assert "SIMULATION" in out
    assert _row(out, "ping peer -> web")[0] == "1/1"
    assert _row(out, "client -> 198.18.0.2:8080")[0] == "SYN-ACK"
    rate = float(_row(out, "shaped egress")[0])
    # 1 s at 20 Mbit/s plus the 1 Mbit burst, offered at 80 Mbit/s: 20..21 Mbit/s
    assert 19.5 <= rate <= 21.1


@pytest.mark.integration
@pytest.mark.skipif(lab.kernel_unavailable() is not None, reason=lab.kernel_unavailable() or "")
def test_real_demo_pods_ping_hostport_and_shaping():
    out = _demo("--seconds", "3")
    assert "real pods" in out
    assert _row(out, "ping peer -> web")[0] == "3/3"
    assert _row(out, "client -> 198.18.0.2:8080")[:2] == ["HTTP", "200"]
    assert out.split("node iptables/nft rules: ")[1].split()[0] == "0"
    for direction in ("shaped egress", "shaped ingress"):
        ratio = float(_row(out, direction)[-4])
        assert 0.9 <= ratio <= 1.05, out
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith("vsdemo")]
