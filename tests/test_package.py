"""The built package serves its own viewer: sdist, then a wheel built from that sdist (so the
sdist is proven to carry the viewer), installed in a fresh venv, then ``console-proxy serve``
with no ``--static-dir`` answers ``/console`` and a noVNC module. The slow test (~30 s): it runs
``python -m build`` (``--no-isolation``: offline, with this venv's setuptools and wheel) and
``npm ci`` (``--prefer-offline``) on a copy of the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from proxyproc import REPO, free_port

from console_proxy import keyring
from console_proxy.keyring import Keyring

pytestmark = pytest.mark.slow
VIEWER = "console_proxy/viewer"
RFB_MODULE = f"{VIEWER}/node_modules/@novnc/novnc/core/rfb.js"


def _copy_checkout(dest: Path) -> Path:
    """Tracked and new (not ignored) files only: no node_modules, no build/, no .venv."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(source.read_bytes())
    return dest


def _build(tmp_path: Path) -> tuple[Path, Path]:
    source, dist = _copy_checkout(tmp_path / "src"), tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    return next(dist.glob("*.tar.gz")), next(dist.glob("*.whl"))


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    """The wheel installed alone in a new venv; its two dependencies are read from this venv's
    site-packages as a plain path (no .pth there runs, so the checkout's editable finder does not)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    site = next((venv / "lib").glob("python3.*/site-packages"))
    (site / "zz-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.status, answer.headers.get("Content-Type", ""), answer.read()


def test_the_wheel_serves_the_viewer_and_novnc_without_a_checkout(tmp_path: Path) -> None:
    sdist, wheel = _build(tmp_path)
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(name.endswith(f"/{RFB_MODULE}") for name in names)
    assert not any("/static/node_modules/" in name for name in names)
    assert any(name.endswith("/contrib/systemd/console-proxy.service") for name in names)
    with zipfile.ZipFile(wheel) as archive:
        assert {f"{VIEWER}/console.html", f"{VIEWER}/console.js", RFB_MODULE} <= set(archive.namelist())
        assert any(name.endswith(".dist-info/LICENSE") for name in archive.namelist())

    venv = _fresh_venv(tmp_path, wheel)
    ring = tmp_path / "proxy-keyring.json"
    keyring.save(Keyring.generate(time.time()), ring, public_only=True)
    port = free_port()
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import console_proxy; print(console_proxy.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
    ).stdout
    assert where.startswith(str(venv))
    proxy = subprocess.Popen(
        [str(venv / "bin" / "console-proxy"), "serve", "--listen", f"127.0.0.1:{port}", "--keyring", str(ring)],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proxy.stdout is not None
        assert "console-proxy listening" in next(
            line for line in proxy.stdout if "listening" in line or "error" in line
        )
        status, kind, page = _get(f"http://127.0.0.1:{port}/console")
        assert (status, kind.split(";")[0]) == (200, "text/html") and b"console.js" in page
        status, kind, module = _get(f"http://127.0.0.1:{port}/novnc/core/rfb.js")
        assert status == 200 and "javascript" in kind and b"export default class RFB" in module
    finally:
        proxy.terminate()
        proxy.wait(20)
