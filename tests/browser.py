"""Drive Debian's headless chromium from tests: the rendered DOM of a page, and a screenshot of it.

Why a real browser: escaping bugs and broken markup only show once a browser has
parsed the page and run its script; a string search over the HTML the server sent
cannot tell a caption shown as text from one that became an element.

Chromium is not a Python dependency: CI installs it with `apt-get install -y chromium`.
When it is missing the tests fail with that instruction instead of skipping, so a
green run always means the page was checked in a browser.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = os.environ.get("PSEUDOTRACK_CHROMIUM", "/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


class BrowserMissing(RuntimeError):
    pass


def _installable() -> bool:
    return CHROMIUM == "/usr/bin/chromium" and os.geteuid() == 0 and shutil.which("apt-get") is not None


def _install() -> None:
    """On a fresh Debian machine where the tests run as root, the README's test command sets chromium up itself."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "chromium"], check=False, env=env, capture_output=True, timeout=900
    )


def _usable() -> bool:
    return os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)


def chromium() -> str:
    """The chromium executable (installed with apt-get when missing and allowed), or BrowserMissing saying how."""
    if not _usable() and _installable():
        _install()
    path = CHROMIUM if _usable() else None
    if path is None:
        raise BrowserMissing(
            f"{CHROMIUM} not found: the dashboard's browser tests need Debian's chromium; install it with "
            "`apt-get update && apt-get install -y chromium` (or set PSEUDOTRACK_CHROMIUM to a chromium binary)"
        )
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    # A fresh profile each time: no state leaks between tests, nothing is written to $HOME.
    profile = tempfile.mkdtemp(prefix="pt-chromium-")
    try:
        command = [chromium(), *FLAGS, f"--user-data-dir={profile}", *args]
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited with {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}")
    return done


def dump_dom(url: str, timeout: float = 60.0, budget_ms: int = 3000) -> str:
    """The DOM after load and `budget_ms` of (virtual) time for scripts, serialised as HTML."""
    done = _run([f"--virtual-time-budget={budget_ms}", "--dump-dom", url], timeout)
    return done.stdout.decode("utf-8", errors="replace")


def screenshot(
    url: str, png: str | Path, width: int = 1280, height: int = 2000, timeout: float = 60.0, budget_ms: int = 3000
) -> Path:
    """Write a PNG of the page at width x height; returns its path."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", f"--window-size={width},{height}", url], timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {png}")
    return png
