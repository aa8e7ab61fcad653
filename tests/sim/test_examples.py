"""examples/ run and say what they should, with both datapaths."""
import pathlib
import subprocess
import sys

from scapy.utils import rdpcap

ROOT = pathlib.Path(__file__).resolve().parents[2]
EX = ROOT / "examples"


def impl_flag(dp_impl):
    return "py" if dp_impl.__name__.endswith(".pure") else "c"


def run(args, **kw):
    out = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, **kw)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_hostport_dnat_example(dp_impl, tmp_path):
    out = run([EX / "hostport_dnat.py", "--impl", impl_flag(dp_impl), "--pcap-dir", tmp_path])
    assert "web saw (DNAT)         Ether / IP / TCP 192.0.2.10:50000 > 10.0.0.2:http S" in out
    assert "client got (reply)     Ether / IP / TCP 192.0.2.1:http_alt > 192.0.2.10:50000 SA" in out
    assert "SYN_RECV hairpin" in out and "ct_created=3" in out      # SYN, SYN-ACK: no final ACK sent
    assert len(rdpcap(str(tmp_path / "web.pcap"))) == 8      # 3 SYNs in, 3 SYN-ACKs out, hairpin SYN out and SYN-ACK in


def test_shaping_curve_example_with_and_without_matplotlib(dp_impl, tmp_path):
    png = tmp_path / "curve.png"
    out = run([EX / "shaping_curve.py", "--impl", impl_flag(dp_impl), "--out", png])
    assert "(≤ 0)" in out
    try:
        import matplotlib  # noqa: F401
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "plot skipped" in out
    hide = ("import sys, runpy; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['shaping_curve.py', '--impl', '{impl_flag(dp_impl)}', '--out', '{tmp_path / 'no.png'}']; "
            f"runpy.run_path('{EX / 'shaping_curve.py'}', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "plot skipped" in out.stdout and not (tmp_path / "no.png").exists()


def test_pcap_replay_example(dp_impl):
    out = run([EX / "pcap_replay.py", "--impl", impl_flag(dp_impl)])
    assert "as captured: 10 frames sent; b received 10 at [0.0, 2.0, 4.0" in out
    assert "retimed, bulk: 1000 frames over 999.0 ms" in out and "spoofed 0" in out
