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


def test_dashboard_pages_the_device_table(tmp_path: Path) -> None:
    """120 devices: the table shows 50 at a time, and next/previous walk the pages."""
    from playwright.sync_api import sync_playwright

    from cloud.app import create_app
    from cloud.fleet.store import FleetStore
    from cloud.settings import CloudSettings
    from shared.mqtt import MqttSettings
    from shared.status import DeviceStatus
    from tests.helpers import CLOUD_REPO, closed_port_url, serve_in_thread

    store = FleetStore(tmp_path / "fleet.db")
    for i in range(120):
        store.record_status("paged", DeviceStatus(device=f"d{i:03d}", state="online"))
    store.close()
    settings = CloudSettings(
        repo=CLOUD_REPO,
        fleet="paged",
        state_dir=tmp_path,
        mqtt=MqttSettings(url=closed_port_url().replace("http://", "mqtt://")),
    )
    errors: list[str] = []
    with serve_in_thread(create_app(settings)) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/dashboard/")

        def rows() -> list[str]:
            return page.eval_on_selector_all(
                "#devices tbody tr", "trs => trs.map(t => t.dataset.device)"
            )

        page.wait_for_function("document.querySelector('#page-info').textContent !== ''")
        assert page.inner_text("#page-info") == "1–50 of 120"
        assert rows() == [f"d{i:03d}" for i in range(50)] and page.is_disabled("#prev")
        page.click("#next")
        page.wait_for_function("document.querySelector('#page-info').textContent.startsWith('51')")
        assert rows() == [f"d{i:03d}" for i in range(50, 100)]
        page.click("#next")
        page.wait_for_function("document.querySelector('#page-info').textContent.startsWith('101')")
        assert page.inner_text("#page-info") == "101–120 of 120"
        assert rows() == [f"d{i:03d}" for i in range(100, 120)] and page.is_disabled("#next")
        page.click("#prev")
        page.wait_for_function("document.querySelector('#page-info').textContent.startsWith('51')")
        assert rows()[0] == "d050"
        browser.close()
    assert errors == []
