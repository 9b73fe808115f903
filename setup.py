"""Packaging: metadata lives in setup.cfg; this file only puts the viewer into the package.

The wheel and the sdist carry ``console_proxy/viewer/``: our page (``static/*.html|js|css|svg``)
and noVNC (``node_modules/@novnc/novnc``, as ``npm ci`` installs it from
``static/package-lock.json``), in the layout the proxy serves (see console_proxy/pages.py). It is
made at build time, never committed: from a checkout, ``npm ci`` runs in a temporary directory
(``--prefer-offline``: a warm npm cache needs no network); from an sdist, which already carries
the viewer, it is copied as it is.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
SHIPPED = HERE / "console_proxy" / "viewer"  # present in an sdist only
VIEWER = Path("console_proxy", "viewer")
OWN_FILES = ("*.html", "*.js", "*.css", "*.svg")
NOVNC = Path("node_modules", "@novnc", "novnc")
NOVNC_PARTS = ("core", "vendor", "package.json", "LICENSE.txt", "AUTHORS", "README.md")


def make_viewer(target: Path) -> None:
    """Write the viewer into ``target`` (a build or release tree)."""
    if target.exists():
        shutil.rmtree(target)
    if SHIPPED.is_dir() and not (STATIC / "package-lock.json").is_file():
        shutil.copytree(SHIPPED, target)
        return
    if not (STATIC / "package-lock.json").is_file():
        raise SystemExit("cannot build the viewer: no static/package-lock.json and no console_proxy/viewer/")
    target.mkdir(parents=True)
    for pattern in OWN_FILES:
        for path in sorted(STATIC.glob(pattern)):
            shutil.copy2(path, target / path.name)
    with tempfile.TemporaryDirectory(prefix="consolegate-npm-") as work:
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(STATIC / name, Path(work) / name)
        try:
            subprocess.run(
                ["npm", "ci", "--prefer-offline", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
                cwd=work,
                check=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"cannot build the viewer: npm ci failed ({exc}); Node.js and npm are needed") from None
        for part in NOVNC_PARTS:
            source = Path(work) / NOVNC / part
            if source.is_dir():
                shutil.copytree(source, target / NOVNC / part)
            elif source.is_file():
                (target / NOVNC).mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / NOVNC / part)


class BuildWithViewer(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):  # an editable install serves static/ from the checkout
            make_viewer(Path(self.build_lib) / VIEWER)


class SdistWithViewer(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        make_viewer(Path(base_dir) / VIEWER)


setup(cmdclass={"build_py": BuildWithViewer, "sdist": SdistWithViewer})
