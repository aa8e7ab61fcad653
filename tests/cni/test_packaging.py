"""Packaging: the plugin's install name, its launcher in both layouts, --version, LICENSE,
the C client in the wheel (vswitch_cni/vswitch-client, executable).

The plugin's folder is ``cni/``; it is installed as ``vswitch_cni`` (pyproject
``package-dir``), so it cannot collide with another project's top-level ``cni``. The
developer launcher that ``vswitchctl install-cni --launcher`` writes runs with ``python -IS`` (no site, so no
editable-install finder): it must find the package both in the checkout (editable install:
the folder is ``cni``) and in a regular install (``site-packages/vswitch_cni`` beside
``site-packages/vswitch``). The regular layout is built here by copying the two packages
the way a wheel lays them out, and, in the slow test, by building the real wheel and
installing it into a throwaway venv.
"""
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import vswitch
import vswitch_cni
from vswitch_cni import install

REPO = Path(__file__).resolve().parents[2]
VERSION_ENV = {"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}


def run_version(exe):
    p = subprocess.run([str(exe)], env=VERSION_ENV, input=b"", capture_output=True, timeout=60)
    assert p.returncode == 0, p
    return json.loads(p.stdout)


def test_plugin_package_is_vswitch_cni_from_the_cni_folder():
    assert vswitch_cni.__name__ == "vswitch_cni"
    assert Path(vswitch_cni.__file__).parent == REPO / "cni"
    assert "cni" not in sys.modules            # never imported under a second name


def test_importing_the_folder_under_its_folder_name_is_refused():
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import cni"
    p = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert p.returncode != 0 and "the CNI plugin package is vswitch_cni" in p.stderr


def test_launcher_from_the_checkout(tmp_path):
    rep = install.install_report(str(tmp_path / "bin"), str(tmp_path / "net.d"), launcher=True)
    exe = rep["python_plugin"]       # the launcher replaces the Python plugin beside the client
    text = Path(exe).read_text()
    assert text.startswith(f"#!{os.path.realpath(sys.executable)} -IS\n")
    assert str(REPO / "cni") in text            # the folder, loaded as vswitch_cni
    assert run_version(exe)["cniVersion"] == "1.1.0"
    assert run_version(rep["plugin"])["cniVersion"] == "1.1.0"


def test_launcher_from_a_site_packages_layout(tmp_path):
    # what a wheel installs: site-packages/vswitch and site-packages/vswitch_cni
    site = tmp_path / "site-packages"
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(Path(vswitch.__file__).parent, site / "vswitch", ignore=ignore)
    shutil.copytree(REPO / "cni", site / "vswitch_cni", ignore=ignore)
    exe = tmp_path / "vswitch"
    exe.write_text(install.launcher_text(vswitch_root=str(site),
                                         plugin_dir=str(site / "vswitch_cni")))
    exe.chmod(0o755)
    text = exe.read_text()
    assert "importlib" not in text and str(REPO) not in text    # plain sys.path, nothing else
    out = run_version(exe)
    assert out["supportedVersions"][-1] == "1.1.0"
    # and it really ran the copy: a broken copy fails
    (site / "vswitch_cni" / "results.py").write_text("raise ImportError('the copy ran')\n")
    p = subprocess.run([str(exe)], env=VERSION_ENV, capture_output=True, text=True)
    assert p.returncode != 0 and "the copy ran" in p.stderr


@pytest.mark.parametrize("script", ["vswitchd", "vswitchctl", "vswitch-cni", "vswitch-bench"])
def test_every_console_script_prints_the_project_version(script):
    exe = Path(sys.executable).parent / script
    if not exe.exists():
        pytest.fail(f"{exe} is missing: run pip install -e . (pyproject [project.scripts])")
    p = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p
    assert p.stdout.strip() == f"{script} {vswitch.__version__}"


def test_license_file_is_the_apache_2_0_text_pyproject_declares():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()


@pytest.mark.slow
def test_wheel_installs_the_plugin_as_vswitch_cni_and_its_launcher_runs(tmp_path):
    """Build the real wheel (it compiles the extension: a minute or two), install it without
    dependencies into a throwaway venv, write the launcher with that venv's vswitchctl, run
    VERSION; the wheel has no top-level cni or scapy requirement."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.so", "__pycache__", "results", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                    "--no-deps", "-w", str(wheels), str(src)], check=True, timeout=1200)
    wheel, = wheels.glob("vswitch-*.whl")
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "vswitch_cni" in tops and "cni" not in tops, sorted(tops)
    client = zipfile.ZipFile(wheel).getinfo("vswitch_cni/vswitch-client")    # the C client
    assert (client.external_attr >> 16) & 0o111 and client.file_size > 10000
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    assert "Requires-Dist: scapy" in meta and "extra == \"sim\"" in meta
    assert not [ln for ln in meta.splitlines()
                if ln.startswith("Requires-Dist: scapy") and "extra" not in ln]
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"),
                    "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    site, = (env_dir / "lib").glob("python3*/site-packages")
    assert (site / "vswitch_cni" / "plugin.py").exists() and not (site / "cni").exists()
    assert (site / "vswitch" / "__init__.py").exists()
    ctl = env_dir / "bin" / "vswitchctl"
    subprocess.run([str(ctl), "install-cni", "--bin-dir", str(tmp_path / "bin"),
                    "--conf-dir", str(tmp_path / "net.d")], check=True, timeout=60,
                   cwd=str(tmp_path))
    assert (site / "vswitch_cni" / "vswitch-client").read_bytes().startswith(b"\x7fELF")
    client = tmp_path / "bin" / "vswitch"      # the C client, from the wheel
    assert client.read_bytes() == (site / "vswitch_cni" / "vswitch-client").read_bytes()
    assert run_version(client)["cniVersion"] == "1.1.0"
    plugin = tmp_path / "bin" / "vswitch-py"   # the relocatable plugin (tests/cni/test_zipapp.py)
    data = plugin.read_bytes()
    assert data.startswith(b"#!/bin/sh\n") and str(site).encode() not in data
    assert str(REPO).encode() not in data
    assert run_version(plugin)["cniVersion"] == "1.1.0"
    subprocess.run([str(ctl), "install-cni", "--launcher", "--bin-dir", str(tmp_path / "lbin"),
                    "--conf-dir", str(tmp_path / "lnet.d")], check=True, timeout=60, cwd=str(tmp_path))
    launcher = tmp_path / "lbin" / "vswitch-py"    # the developer launcher, in a site-packages layout
    text = launcher.read_text()
    assert str(site) in text and str(REPO) not in text and "importlib" not in text
    assert run_version(launcher)["cniVersion"] == "1.1.0"
    p = subprocess.run([str(env_dir / "bin" / "vswitch-cni"), "--version"], capture_output=True,
                       text=True, check=True)
    assert p.stdout.strip() == f"vswitch-cni {vswitch.__version__}"


def test_the_simulation_imports_without_scapy():
    # scapy is the "sim" extra (test includes it): vswitch.sim loads it only where a frame
    # is shown or matched as a scapy packet; here scapy is made unimportable
    code = ("import sys; sys.modules['scapy'] = None\n"
            "import vswitch.sim\n"
            "try:\n    import scapy\nexcept ImportError:\n    print('blocked')\n"
            "print(sorted(m for m in sys.modules if m.startswith('scapy.')))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["blocked", "[]"]
