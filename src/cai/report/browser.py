"""Headless Chromium for the report: a screenshot for the README, and the tests that
open the page in a real browser.

We drive the system's Chromium (Debian's ``chromium`` package) through Playwright's
Python driver and never download a browser build: ``executable_path`` points at the
system binary. Without Playwright, a screenshot falls back to Chromium's own
``--headless --screenshot`` flag.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from cai.errors import CaiError

#: Quiet, offline, throwaway: no sandbox (root in containers), no GPU, no background
#: traffic, no updates, no sync, no first-run pages.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
]


def find_chromium() -> str | None:
    """The Chromium binary: ``$CAI_CHROMIUM``, else the first of chromium, chromium-browser,
    google-chrome on PATH."""
    env = os.environ.get("CAI_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def launch(playwright, user_data_dir: str):
    """A persistent headless context on the system Chromium with a fresh profile folder."""
    exe = find_chromium()
    if not exe:
        raise CaiError("no Chromium found (install Debian's 'chromium' package or set CAI_CHROMIUM)")
    return playwright.chromium.launch_persistent_context(
        user_data_dir, executable_path=exe, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1280, "height": 900},
    )


def screenshot(html: str | Path, png: str | Path, full_page: bool = False, height: int = 1800) -> Path:
    """A PNG of the top of the page at ``html`` (a file), 1280 x ``height`` px (or the
    whole page with ``full_page``, which for a big run is tens of thousands of px tall)."""
    html, png = Path(html).resolve(), Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cai-chromium-") as profile:
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            return _cli_screenshot(html, png, profile, height)
        with sync_playwright() as p:
            ctx = launch(p, profile)
            try:
                page = ctx.new_page()
                page.set_viewport_size({"width": 1280, "height": height})
                page.goto(html.as_uri())
                page.wait_for_load_state("load")
                page.screenshot(path=str(png), full_page=full_page)
            finally:
                ctx.close()
    return png


def _cli_screenshot(html: Path, png: Path, profile: str, height: int) -> Path:
    exe = find_chromium()
    if not exe:
        raise CaiError("no Chromium found (install Debian's 'chromium' package or set CAI_CHROMIUM)")
    cmd = [exe, "--headless", *CHROMIUM_ARGS, f"--user-data-dir={profile}", f"--screenshot={png.resolve()}",
           f"--window-size=1280,{height}", "--hide-scrollbars", html.as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0 or not png.is_file():
        raise CaiError(f"chromium screenshot failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return png
