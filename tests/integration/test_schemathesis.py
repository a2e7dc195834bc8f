"""Schemathesis against both servers' OpenAPI documents, on real uvicorn: whatever a
client sends within the documents (positive) or outside them (negative), no route answers a
5xx, and every error is ``{"error": "<message>"}``.

The cloud app has every optional part: a registry folder, and the fleet routes over a store
holding one device's shadow and audit figures, a rollout in its shadow phase and one field
sample, with an unreachable broker (the app never waits for it). Each operation is fuzzed
with random path parameters, and again with the served model's own name and version (so
bodies reach the model's checks) and the seeded rollout, device and sample (so the fleet
routes reach real rows). Derandomized, a bounded number of examples per operation: the same
cases every run.

The sample upload (``POST /fleet/samples``) takes its own media type, sent as the raw bytes
generated, and a device's token: each case gets the real token of the device it names (or
of a device of its own when what it names is not a device id), so fuzzed bodies reach the
upload's parser, not only its door.

Schemathesis's pytest loader for fixtures (``schemathesis.pytest.from_fixture``) fails on
pytest 9 (it sets ``Function._nodeid``), so operations are taken from the schema and run
through Hypothesis here; ``test_every_route_is_fuzzed`` keeps the lists below in step with
the documents.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.checks import not_a_server_error

from agent import Agent, AgentSettings
from agent.server import create_app as agent_app
from cloud.app import create_app as cloud_app
from cloud.fleet.samples.store import SampleStore
from cloud.fleet.store import FleetStore
from cloud.settings import CloudSettings
from shared.identifiers import IDENTIFIER_RE
from shared.mqtt import MqttSettings
from shared.samples import (
    CONTENT_TYPE,
    DEVICE_HEADER,
    Answer,
    device_token,
)
from shared.status import DeviceStatus, ModelVersion
from tests.helpers import CLOUD_MODEL, CLOUD_REPO, EDGE_INT8, closed_port_url, serve_in_thread
from tests.sample_items import feature_sample
from tests.shadow_sim import audit, shadow_stats, telemetry

pytestmark = pytest.mark.slow

EXAMPLES = 12  # per operation, mode and set of path parameters
UPLOAD_FACTOR = 4  # the sample upload's body is a device's: fuzzed more

OIP = [
    "POST /v2/models/{name}/infer",
    "POST /v2/models/{name}/versions/{version}/infer",
    "GET /v2/health/live",
    "GET /v2/health/ready",
    "GET /v2",
    "GET /v2/models/{name}",
    "GET /v2/models/{name}/versions/{version}",
    "GET /v2/models/{name}/config",
    "GET /v2/models/{name}/versions/{version}/config",
    "GET /v2/models/{name}/ready",
    "GET /v2/models/{name}/versions/{version}/ready",
]
CLOUD = [
    *OIP,
    "POST /v2/repository/index",
    "POST /v2/repository/models/{name}/load",
    # unloading the repository's model would make every later case a 503: not fuzzed
    "GET /registry/{model}",
    "GET /registry/{model}/{version}/manifest.json",
    "GET /registry/{model}/{version}/{file}",
    "GET /fleet/devices",
    "GET /fleet/devices/{device}",
    "GET /fleet/summary",
    "GET /fleet/rollouts/{rollout_id}/gate",
    "GET /fleet/loop",
    "POST /fleet/samples",
    "GET /fleet/samples",
    "GET /fleet/samples/summary",
    "PUT /fleet/samples/{device}/{sample}/label",
    "GET /fleet/samples/{device}/{sample}",
]
NOT_FUZZED = {"POST /v2/repository/models/{name}/unload"}
UPLOAD = "POST /fleet/samples"
DEVICE_SECRET = "device-secret-for-fuzzing"
FUZZ_FLEET = "default"
SEEDED_DEVICE = "dev-seeded"

schemathesis.serializer.alias(CONTENT_TYPE, "application/octet-stream")


@schemathesis.check
def errors_are_error_documents(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx and 5xx body is ``{"error": str}``, the one error shape of both servers."""
    if response.status_code >= 400:
        doc = response.json()
        if not (isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], str)):
            raise AssertionError(f"{response.status_code} with body {response.text[:200]!r}")
    return None


CHECKS = [not_a_server_error, errors_are_error_documents]


def _fuzz(schema: Any, label: str, served: dict[str, str]) -> None:
    """Every generation mode of one operation, with random path parameters and, where it
    has them, the served model's."""
    method, path = label.split(" ", 1)
    operation = schema[path][method]
    names = {p.name for p in operation.path_parameters}
    fixed = {k: v for k, v in served.items() if k in names}
    variants: list[dict[str, str] | None] = [None, fixed] if fixed else [None]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for path_parameters in variants:
            if mode is GenerationMode.NEGATIVE and not _breakable(operation, path_parameters):
                continue
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

            @settings(
                max_examples=EXAMPLES * (UPLOAD_FACTOR if label == UPLOAD else 1),
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink],
            )
            @given(case=strategy)
            def run(case: Case) -> None:
                if label == UPLOAD:
                    _sign(case)
                case.call_and_validate(checks=CHECKS)

            run()


def _sign(case: Case) -> None:
    """A device's real upload token on every case, for the device it names (a device of its
    own when what it names is not a device id)."""
    headers = case.headers if case.headers is not None else {}
    device = headers.get(DEVICE_HEADER)
    if not (isinstance(device, str) and IDENTIFIER_RE.match(device)):
        device = headers[DEVICE_HEADER] = "dev-fuzz"
    headers["Authorization"] = f"Bearer {device_token(DEVICE_SECRET, FUZZ_FLEET, device)}"
    case.headers = headers


def _breakable(operation: Any, fixed: dict[str, str] | None) -> bool:
    """Whether a request can break this operation's document: it has a body, a query, or a
    path parameter that is not any string (and not fixed)."""
    loose = [
        p
        for p in operation.path_parameters
        if p.definition.get("schema", {}).get("type") != "string" and p.name not in (fixed or {})
    ]
    return bool(operation.body) or bool(list(operation.query)) or bool(loose)


@contextmanager
def _schema(app: Any) -> Iterator[Any]:
    """The app's document, loaded from it on a real server (over ASGI, every call would run
    the app's lifespan again: its MQTT client started and stopped per request)."""
    with serve_in_thread(app) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def _seed(state: Path) -> dict[str, str]:
    """A device with shadow and audit figures, a rollout in its shadow phase (its gate is
    computed live) and a stored sample: the path parameters that reach them."""
    store = FleetStore(state / "fleet.db")
    store.record_status(
        FUZZ_FLEET,
        DeviceStatus(
            device=SEEDED_DEVICE, state="online", models=[ModelVersion(model="digits", version=1)]
        ),
    )
    store.record_telemetry_many(
        FUZZ_FLEET,
        [
            telemetry(
                SEEDED_DEVICE,
                1,
                shadow=shadow_stats(2, both=8, shadow_only=1, serving_only=1),
                audit=audit(1, audited=20, wrong=1),
            )
        ],
    )
    rollout = store.create_rollout(
        FUZZ_FLEET, "digits", 2, "fleet", None, "1", 1, 0.1, 30.0, shadow=True
    )
    store.plan_waves(rollout, [[SEEDED_DEVICE]])
    store.update_rollout(
        rollout, state="RUNNING", phase="shadow", shadow_started="2000-01-01T00:00:00+00:00"
    )
    meta, payload = feature_sample(
        np.arange(64) % 17,
        ts=datetime(2026, 12, 1, tzinfo=timezone.utc),
        edge=Answer(index=2, confidence=0.4),
        cloud=Answer(index=5, confidence=0.9),
    )
    SampleStore(store, state / "samples").add(FUZZ_FLEET, SEEDED_DEVICE, [(meta, payload)])
    store.close()
    return {"rollout_id": str(rollout), "device": SEEDED_DEVICE, "sample": meta.id}


@pytest.fixture(scope="module")
def cloud_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, dict[str, str]]]:
    state = tmp_path_factory.mktemp("cloud")
    (state / "registry").mkdir()
    seeded = _seed(state)
    settings = CloudSettings(
        repo=CLOUD_REPO,
        registry=state / "registry",
        state_dir=state,
        mqtt=MqttSettings(url=closed_port_url().replace("http://", "mqtt://")),
        repo_poll_s=0,
        fleet=FUZZ_FLEET,
        samples={"device_token_secret": DEVICE_SECRET},
    )
    with _schema(cloud_app(settings)) as schema:
        yield schema, seeded


@pytest.fixture(scope="module")
def agent_schema() -> Iterator[Any]:
    with Agent(AgentSettings(model_dir=EDGE_INT8)) as agent, _schema(agent_app(agent)) as schema:
        yield schema


@pytest.mark.parametrize("label", CLOUD)
def test_cloud_api(cloud_schema: tuple[Any, dict[str, str]], label: str) -> None:
    schema, seeded = cloud_schema
    _fuzz(schema, label, {"name": CLOUD_MODEL, "version": "1", **seeded})


@pytest.mark.parametrize("label", OIP)
def test_agent_api(agent_schema: Any, label: str) -> None:
    _fuzz(agent_schema, label, {"name": "digits", "version": "1"})


def test_every_route_is_fuzzed(cloud_schema: tuple[Any, dict[str, str]], agent_schema: Any) -> None:
    """The lists above are the documents' operations (a new route is fuzzed, or named here
    as not fuzzed)."""

    def labels(schema: Any) -> set[str]:
        return {result.ok().label for result in schema.get_all_operations()}

    assert labels(cloud_schema[0]) == set(CLOUD) | NOT_FUZZED
    assert labels(agent_schema) == set(OIP)
