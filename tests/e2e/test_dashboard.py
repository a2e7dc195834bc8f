"""The dashboard of a running demo, in a real headless Chromium (Debian's package, driven by
Playwright without downloading a browser): it loads with no console errors, shows the
demo's devices, and a screenshot is written to ``out/dashboard.png``."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "out" / "dashboard.png"


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"demo never printed {pattern!r}:\n{''.join(seen)[-2000:]}")


def test_dashboard_shows_the_running_demo(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is not installed (scripts/test installs it)"
    demo = subprocess.Popen(
        [
            sys.executable,
            "-u",
            str(ROOT / "scripts" / "demo.py"),
            "--wan-ms",
            "5",
            "--hold-s",
            "120",
            "--out",
            str(tmp_path / "demo"),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = _read_until(demo, r"dashboard: (\S+)", 60).group(1)
        _read_until(demo, r"agents keep serving", 240)
        errors: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            for device in ("dev-0", "dev-1", "dev-2"):
                page.wait_for_selector(f'tr[data-device="{device}"]', timeout=20_000)
            page.wait_for_function(
                "document.querySelector('#online').textContent === '3'", timeout=20_000
            )
            page.wait_for_timeout(2500)  # a refresh with telemetry on the charts
            assert "digits:2" in page.inner_text("#devices")
            assert "COMPLETED" in page.inner_text("#rollouts")
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            browser.close()
        assert errors == []
        assert SCREENSHOT.stat().st_size > 10_000
    finally:
        demo.send_signal(signal.SIGTERM)
        try:
            demo.wait(timeout=60)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
        if demo.stdout:
            demo.stdout.close()
