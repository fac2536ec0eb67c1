"""Headless Chromium from Debian's packages, for tests that look at a rendered page.

`find_chromium()` returns the browser on PATH (`chromium` or `chromium-browser`); when it is
missing and the tests run as root it installs Debian's `chromium` with apt-get, and it makes
sure a Korean font is there (`fonts-nanum`), since without one Hangul renders as empty boxes.
It never skips: a browser that cannot be found or installed fails the test with what to do.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

NAMES = ("chromium", "chromium-browser")
APT_TIMEOUT_S = 900
RUN_TIMEOUT_S = 120


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"{' and '.join(packages)} missing and the tests do not run as root: "
                    f"install them with `sudo apt-get install -y --no-install-recommends {' '.join(packages)}`", pytrace=False)
    print(f"\n[chromium.py] installing {' '.join(packages)} from Debian's packages (apt-get update && apt-get install)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=APT_TIMEOUT_S, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.fail(f"`{' '.join(cmd)}` did not finish: {e}", pytrace=False)
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}", pytrace=False)


def has_korean_font() -> bool:
    """Whether fontconfig knows a font that covers Korean (what Chromium falls back to)."""
    if not shutil.which("fc-list"):
        return False
    done = subprocess.run(["fc-list", ":lang=ko", "family"], capture_output=True, text=True, timeout=60)
    return bool(done.stdout.strip())


def find_chromium() -> str:
    """Path of the Chromium binary, installing the browser and a Korean font when missing."""
    path = next((p for p in map(shutil.which, NAMES) if p), None)
    if path is None:
        _apt_install("chromium")
        path = next((p for p in map(shutil.which, NAMES) if p), None)
        if path is None:
            pytest.fail("apt-get installed chromium but neither `chromium` nor `chromium-browser` is on PATH", pytrace=False)
    if not has_korean_font():
        _apt_install("fonts-nanum")
        subprocess.run(["fc-cache", "-f"], capture_output=True, timeout=300)
        if not has_korean_font():
            pytest.fail("fonts-nanum is installed but fontconfig lists no Korean font (`fc-list :lang=ko`)", pytrace=False)
    return path


class Chromium:
    """Runs the headless browser on a local file: its DOM after load, or a screenshot."""

    def __init__(self, binary: str):
        self.binary = binary

    def _run(self, page: Path, *extra: str) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="indai-chromium-") as profile:
            cmd = [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *extra,
                   Path(page).resolve().as_uri()]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"chromium did not finish within {RUN_TIMEOUT_S} s: {' '.join(cmd)}", pytrace=False)
        if done.returncode != 0:
            pytest.fail(f"chromium failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}", pytrace=False)
        return done

    def dump_dom(self, page: Path) -> str:
        return self._run(page, "--dump-dom").stdout

    def screenshot(self, page: Path, png: Path, width: int = 1280, height: int = 2000) -> Path:
        png = Path(png).resolve()
        png.parent.mkdir(parents=True, exist_ok=True)
        self._run(page, f"--screenshot={png}", f"--window-size={width},{height}")
        if not png.is_file() or png.stat().st_size == 0:
            pytest.fail(f"chromium wrote no screenshot to {png}", pytrace=False)
        return png


@pytest.fixture(scope="session")
def chromium() -> Chromium:
    return Chromium(find_chromium())
