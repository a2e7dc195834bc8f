"""The dashboard's learning-loop panel in a real headless Chromium, against a real cloud
server behind operator tokens (the page sends the one in its URL fragment): field samples
uploaded through ``POST /fleet/samples`` with device tokens (one relabelled by an operator),
telemetry with shadow and audit sections (the audits with and without the manifest's
guarantee) stored as the collector stores them, and two rollouts, one stopped by its gate
and one in its shadow phase. The panel shows each figure the API computes, the reported
epsilon against the audits' intervals at the reported delta, an empty state for what is
missing, and API strings holding markup as text; it asks the samples summary for its model
only and reads no manifest from the registry (the server has none). A screenshot is written
to ``out/dashboard_loop.png``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from tests.e2e.test_dashboard import CHROMIUM
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

FLEET = "loopfleet"
OPERATOR = "operator-token-for-the-dashboard"
SECRET = "device-secret-for-the-dashboard"
EARLY = "2000-01-01T00:00:00.000000+00:00"
#: markup in strings the API passes through (a rollout's detail, a gate's reason)
SCRIPT = "<script>window.__xss = 'script'</script>"
IMG = "<img src=x onerror=\"window.__xss = 'img'\">"
SCREENSHOT = ROOT / "out" / "dashboard_loop.png"


@dataclass
class Served:
    url: str
    store_path: Path


def _fleet(path: Path) -> None:
    """Devices, their shadow and audit telemetry, and two rollouts. The audits of digits@1
    and @2 carry their manifests' guarantee (epsilon 5 % and 2 %, delta 0.1), those of @4
    none."""
    from cloud.fleet.gate import GateStats, decide
    from cloud.fleet.store import FleetStore
    from shared.status import DeviceStatus, ModelVersion
    from shared.telemetry import FieldAccuracy
    from tests.shadow_sim import audit as plain_audit
    from tests.shadow_sim import shadow_stats, telemetry

    def audit(version: int, audited: int, wrong: int) -> FieldAccuracy:
        epsilon = {1: 0.05, 2: 0.02}.get(version)
        a = plain_audit(version, audited=audited, wrong=wrong)
        if epsilon is None:
            return a
        return a.model_copy(update={"epsilon": epsilon, "delta": 0.1})

    store = FleetStore(path)
    serving = {"dev-a": 1, "dev-b": 1, "dev-c": 2}
    for device, version in serving.items():
        store.record_status(
            FLEET,
            DeviceStatus(
                device=device,
                state="online",
                models=[ModelVersion(model="digits", version=version)],
            ),
        )
    store.record_status(
        FLEET,
        DeviceStatus(device="dev-k", state="online", models=[ModelVersion(model="kws", version=1)]),
    )
    messages = []
    for device in ("dev-a", "dev-b"):  # v2 as a shadow beside v1, audits of v1
        for seq in (1, 2, 3):
            messages.append(
                telemetry(
                    device,
                    seq,
                    shadow=shadow_stats(2, both=17, shadow_only=1, serving_only=3, wrong_both=1),
                    audit=audit(1, audited=100, wrong=1),
                )
            )
    # dev-c serves v2 (audited: far above its epsilon) and runs v3 as a shadow
    messages.append(
        telemetry(
            "dev-c",
            1,
            serving=2,
            shadow=shadow_stats(3, both=25, shadow_only=4, serving_only=1),
            audit=audit(2, audited=50, wrong=10),
        )
    )
    # a device the store has no status of yet, serving digits@4 (no guarantee)
    messages.append(telemetry("dev-j", 1, serving=4, audit=audit(4, audited=20, wrong=0)))
    assert all(store.record_telemetry_many(FLEET, messages))

    stopped = store.create_rollout(
        FLEET, "digits", 2, "fleet", None, "1", 2, 0.1, 30.0, shadow=True, gate_min_samples=100
    )
    verdict = decide(
        GateStats(
            samples=132,
            agree_serving=120,
            labelled=132,
            agree_cloud=108,
            serving_agree_cloud=120,
            shadow_only_right=6,
            serving_only_right=18,
        ),
        100,
        0.02,
    ).to_dict()
    verdict["detail"] = "candidate worse " + IMG
    store.update_rollout(
        stopped,
        state="ABORTED",
        phase="shadow",
        shadow_started=EARLY,
        gate=json.dumps(verdict),
        detail="shadow phase: gate fail " + SCRIPT,
    )
    running = store.create_rollout(
        FLEET, "digits", 3, "fleet", None, "1", 1, 0.1, 30.0, shadow=True, gate_min_samples=100
    )
    store.plan_waves(running, [["dev-c"], ["dev-a", "dev-b"]])
    store.update_rollout(running, state="RUNNING", phase="shadow", shadow_started=EARLY)
    store.close()


def _item(seed: int, version: int, kind: str, cloud: bool = True) -> tuple[object, bytes]:
    from shared.samples import Answer
    from tests.sample_items import feature_sample

    return feature_sample(
        np.random.default_rng(seed).integers(0, 17, 64),
        kind=kind,
        edge=Answer(index=2, confidence=0.41),
        cloud=Answer(index=5, confidence=0.97) if cloud else None,
        version=version,
        cloud_model="digits-cloud",
        threshold=0.7,
    )


def _upload(url: str) -> None:
    """Through the real upload route, each device with its own token; one label corrected."""
    from shared.samples import device_token, encode_upload

    batches = {
        "dev-a": [_item(i, 1, "escalation") for i in range(6)],
        "dev-b": [_item(10 + i, 1, "escalation") for i in range(2)]
        + [_item(20 + i, 1, "audit") for i in range(2)],
        "dev-c": [_item(30, 2, "audit"), _item(31, 2, "escalation", cloud=False)],
        # one sample each: past the five devices the table names
        **{f"dev-{c}": [_item(40 + i, 1, "escalation")] for i, c in enumerate("defghi")},
    }
    for device, items in batches.items():
        headers, body = encode_upload(
            device,
            items,  # type: ignore[arg-type]
            token=device_token(SECRET, FLEET, device),
        )
        answer = httpx.post(f"{url}/fleet/samples", headers=headers, content=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["stored"] == len(items)
    first = batches["dev-a"][0][0].id  # type: ignore[attr-defined]
    answer = httpx.put(
        f"{url}/fleet/samples/dev-a/{first}/label",
        json={"label": 7},
        headers={"Authorization": f"Bearer {OPERATOR}"},
    )
    assert answer.status_code == 200, answer.text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from cloud.app import create_app
    from cloud.settings import CloudSettings
    from shared.mqtt import MqttSettings
    from tests.helpers import CLOUD_REPO, closed_port_url, serve_in_thread

    tmp_path = tmp_path_factory.mktemp("dashboard-loop")
    _fleet(tmp_path / "fleet.db")
    settings = CloudSettings(
        repo=CLOUD_REPO,
        fleet=FLEET,
        state_dir=tmp_path,
        mqtt=MqttSettings(url=closed_port_url().replace("http://", "mqtt://")),
        tokens=[SecretStr(OPERATOR)],
        repo_poll_s=0,
        samples={"device_token_secret": SECRET},  # type: ignore[arg-type]
    )
    with serve_in_thread(create_app(settings)) as url:
        _upload(url)
        yield Served(url, tmp_path / "fleet.db")


def _pct(k: int, n: int) -> str:
    return f"{100 * k / n:.1f}%"


def _cells(page: object, box: str, version: int) -> dict[str, str]:
    """The cells of one version's row of a table of the panel, by their data-field."""
    return page.eval_on_selector_all(  # type: ignore[attr-defined, no-any-return]
        f'#{box} tr[data-version="{version}"] td[data-field]',
        "tds => Object.fromEntries(tds.map(td => [td.dataset.field, td.textContent]))",
    )


def test_the_panel_shows_the_loop_of_the_most_served_model(served: Served) -> None:
    from playwright.sync_api import sync_playwright

    from shared import bounds

    errors: list[str] = []
    asked: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: asked.append(r.url.removeprefix(served.url)))
        page.goto(f"{served.url}/dashboard/#token={OPERATOR}")
        page.wait_for_selector('#loop-versions tr[data-version="4"]', timeout=20_000)
        page.wait_for_selector('#loop-rollouts [data-rollout="2"]', timeout=20_000)
        # digits is served by three devices, kws by one
        assert page.eval_on_selector("#loop-model", "s => s.value") == "digits"
        assert page.eval_on_selector_all("#loop-model option", "os => os.map(o => o.value)") == [
            "digits",
            "kws",
        ]

        # field samples, from the upload API: by kind, label source, devices
        v1 = _cells(page, "loop-samples", 1)
        assert (v1["samples"], v1["escalation"], v1["audit"]) == ("16", "14", "2")
        assert (v1["label-cloud"], v1["label-operator"], v1["label-none"]) == ("15", "1", "0")
        assert v1["devices"] == "dev-a 6, dev-b 4, dev-d 1, dev-e 1, dev-f 1 (+3 more)"
        v2 = _cells(page, "loop-samples", 2)
        assert (v2["samples"], v2["escalation"], v2["audit"]) == ("2", "1", "1")
        assert (v2["label-cloud"], v2["label-none"], v2["devices"]) == ("1", "1", "dev-c 2")

        # the samples of the panel's model only, a few devices each; no manifests read
        assert "/fleet/samples/summary?model=digits&top=5" in asked
        assert not [u for u in asked if u.startswith("/registry")]

        # per version: v1 has audits only, v2 a shadow and audits, v3 a shadow only, v4
        # audits without a guarantee; each interval at the delta the devices reported
        s1 = _cells(page, "loop-versions", 1)
        assert s1["shadow"] == "no shadow" and s1["audited"] == "6 wrong of 600 on 2 devices"
        low, high = bounds.interval(6, 600, 0.1)
        assert s1["error"] == f"1.0% [{100 * low:.1f}%, {100 * high:.1f}%] 90%"
        assert s1["epsilon"] == "5.0% (δ 0.1)" and s1["verdict"] == "within ε"
        s2 = _cells(page, "loop-versions", 2)
        assert (s2["shadow-samples"], s2["labelled"]) == ("132 on 2 devices", "132")
        assert s2["candidate-agreement"] == _pct(108, 132)
        assert s2["serving-agreement"] == _pct(120, 132)
        assert s2["diff"].startswith(f"−{100 * 12 / 132:.1f} pts [")
        assert s2["agreement-serving"] == _pct(102, 132) and s2["would-escalate"] == "0.0%"
        assert s2["audited"] == "10 wrong of 50 on 1 device" and s2["error"].startswith("20.0% [")
        assert s2["error"].endswith(" 90%")
        assert s2["epsilon"] == "2.0% (δ 0.1)" and s2["verdict"] == "above ε"
        s3 = _cells(page, "loop-versions", 3)
        assert s3["candidate-agreement"] == _pct(29, 30) and s3["audit"] == "no audits"
        s4 = _cells(page, "loop-versions", 4)
        assert s4["shadow"] == "no shadow" and s4["audited"] == "0 wrong of 20 on 1 device"
        assert s4["error"].startswith("0.0% [0.0%, ") and s4["error"].endswith(" 95%")
        assert (s4["epsilon"], s4["verdict"]) == ("–", "no ε in the manifest")

        # rollouts, newest first: the running shadow waits, the stopped one says why
        assert page.eval_on_selector_all(
            "#loop-rollouts [data-rollout]", "ds => ds.map(d => d.dataset.rollout)"
        ) == ["2", "1"]
        running = page.inner_text('#loop-rollouts [data-rollout="2"]')
        assert "#2 digits@3 RUNNING · phase shadow" in running
        assert "GATE WAIT" in running and "on 30 labelled (min 100)" in running
        stopped = page.inner_text('#loop-rollouts [data-rollout="1"]')
        assert "#1 digits@2 ABORTED · phase shadow" in stopped
        assert "GATE FAIL" in stopped
        assert f"candidate {_pct(108, 132)} vs serving {_pct(120, 132)}" in stopped
        assert "on 132 labelled (min 100), margin 2.0 pts" in stopped

        # markup from the API is text: shown as written, never run
        assert SCRIPT in stopped and IMG in stopped
        assert page.evaluate("window.__xss") is None
        assert page.locator("#loop img, #loop script").count() == 0
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)

        # another model: its empty states
        page.select_option("#loop-model", "kws")
        page.wait_for_function(
            "document.querySelector('#loop-rollouts').textContent === 'no rollouts of kws yet'"
        )
        assert page.inner_text("#loop-samples") == "no samples yet"
        assert page.inner_text("#loop-versions") == "no shadow or audit figures yet"
        # the choice is in the fragment, beside the token: a reload (a bookmark) keeps it
        assert page.url.endswith(f"#token={OPERATOR}&model=kws")
        page.reload()
        page.wait_for_function(
            "document.querySelector('#loop-rollouts').textContent === 'no rollouts of kws yet'"
        )
        assert page.eval_on_selector("#loop-model", "s => s.value") == "kws"
        # a model in the fragment that the API would refuse: the most served one instead
        asked.clear()
        page.goto(f"{served.url}/dashboard/#token={OPERATOR}&model=no%20such")
        page.reload()
        page.wait_for_selector('#loop-versions tr[data-version="4"]', timeout=20_000)
        assert page.eval_on_selector("#loop-model", "s => s.value") == "digits"
        assert "/fleet/samples/summary?model=digits&top=5" in asked
        browser.close()
    assert errors == []


def test_without_the_operator_token_the_page_says_so(served: Served) -> None:
    """The server has tokens: a page opened without ``#token=`` shows the refusal, not an
    empty fleet (and the loop panel stays as loaded)."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{served.url}/dashboard/")
        page.wait_for_function(
            "document.querySelector('#updated').textContent.startsWith('cannot reach')"
        )
        # whichever of the poll's two requests was refused first
        assert re.search(r"/fleet/(summary|devices): HTTP 401$", page.inner_text("#updated"))
        assert page.inner_text("#online") == "–"
        browser.close()
    assert errors == []
