"""A small real fleet for update tests: Mosquitto, the cloud server with its registry, signing
keys, a controller connection, and agents (``AgentService``) that log in as dev-0, dev-1...
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from agent.device.service import AgentService
from agent.settings import AgentSettings
from cloud.app import create_app
from cloud.fleet.listener import FleetListener
from cloud.fleet.rollout import RolloutController
from cloud.fleet.store import FleetStore
from cloud.releases.packaging import PackageRequest, package
from cloud.releases.registry import Registry
from cloud.settings import CloudSettings
from shared import topics
from shared.manifest import Manifest
from shared.mqtt import MqttClient, MqttSettings
from shared.signing import SigningKey, TrustStore
from shared.topics import Topic
from shared.update import UpdateReport
from tests.helpers import CLOUD_REPO, EDGE_F32, EDGE_INT8, serve_in_thread
from tests.mosquitto import Mosquitto

FLEET = "testfleet"


class Asgi:
    """Wraps the cloud app to watch (and optionally break) registry traffic."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.artifact_requests: list[dict[str, str]] = []
        #: The path of every registry request (artifacts, manifests, bundle files).
        self.registry_paths: list[str] = []
        self.cut_next_download_at: int | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/registry/"):
            self.registry_paths.append(scope["path"])
        if (
            scope["type"] == "http"
            and scope["path"].startswith("/registry/")
            and scope["path"].endswith(".tflite")
        ):
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            self.artifact_requests.append(headers)
            if self.cut_next_download_at is not None:
                cut, self.cut_next_download_at = self.cut_next_download_at, None
                await self._cut(scope, receive, send, cut)
                return
        await self.app(scope, receive, send)

    async def _cut(self, scope: Any, receive: Any, send: Any, cut: int) -> None:
        """Send the headers and ``cut`` bytes of the body, then drop the connection."""
        sent = 0

        async def partial(message: Any) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if sent + len(body) >= cut:
                    await send(
                        {
                            "type": "http.response.body",
                            "body": body[: cut - sent],
                            "more_body": True,
                        }
                    )
                    raise ConnectionResetError("test cut the download")
                sent += len(body)
            await send(message)

        await self.app(scope, receive, partial)


@dataclass
class Fleet:
    tmp: Path
    broker: Mosquitto
    url: str
    server: Asgi
    registry: Registry
    key: SigningKey
    trust_path: Path
    controller: MqttClient
    store: FleetStore
    agents: dict[str, AgentService] = field(default_factory=dict)
    reports: dict[str, list[UpdateReport]] = field(default_factory=dict)
    token: str | None = None  # the cloud's bearer token, given to every agent

    def agent_settings(self, device: str, group: str | None = None, **update: Any) -> AgentSettings:
        return AgentSettings(
            model_dir=EDGE_INT8,
            device=device,
            fleet=FLEET,
            group=group,
            state_dir=self.tmp / "agents" / device,
            cloud={"url": self.url, **({"token": self.token} if self.token else {})},
            mqtt=self.broker.settings_for(device, keepalive_s=5),
            update={
                "trust_store": self.trust_path,
                "health_watch_s": 0.3,
                "settle_s": 0.2,
                "download": {"backoff_s": 0.05},
                **update,
            },
        )

    def start_agent(self, device: str, group: str | None = None, **update: Any) -> AgentService:
        service = AgentService(self.agent_settings(device, group, **update))
        service.start(wait_s=10)
        self.agents[device] = service
        return service

    def release(self, edge_dir: Path = EDGE_F32, **kw: Any) -> Manifest:
        """Package an edge model folder (artifact + template) as the next release."""
        return package(
            PackageRequest(edge=edge_dir / "model.tflite", template=Manifest.load(edge_dir), **kw),
            self.key,
            self.registry,
        )

    def publish(
        self,
        manifest: Manifest,
        *,
        group: str | None = None,
        device: str | None = None,
        raw: bytes | None = None,
    ) -> None:
        topic = topics.manifest(FLEET, manifest.model, group=group, device=device)
        payload = raw if raw is not None else manifest.to_json().encode()
        assert self.controller.publish_wait(topic, payload)

    def rollout_controller(self, **kw: Any) -> RolloutController:
        return RolloutController(self.store, self.controller, self.registry, FLEET, **kw)


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def last_state(fleet: Fleet, device: str, version: int) -> tuple[str, str] | None:
    states = fleet.store.job_states(FLEET, "digits", version)
    if device not in states:
        return None
    state, reason = states[device]
    return state.value, reason


@contextmanager
def running_fleet(
    tmp: Path, broker: Mosquitto, *, token: str | None = None, repo: Path = CLOUD_REPO
) -> Iterator[Fleet]:
    """The fleet; with ``token``, the cloud server requires it (registry included); its
    cloud serves the model repository ``repo``."""
    key = SigningKey.generate()
    trust = TrustStore()
    trust.add(key.public_b64)
    trust_path = tmp / "trust.json"
    trust.save(trust_path)
    registry_dir = tmp / "registry"
    registry = Registry(registry_dir)
    # v1 is what every agent boots with (the factory model): the registry starts there too
    factory = Manifest.load(EDGE_INT8)
    registry.publish(
        key.sign(
            factory.model_copy(
                update={
                    "edge": factory.edge.model_copy(
                        update={"url": "/registry/digits/1/model.tflite"}
                    )
                }
            )
        ),
        (EDGE_INT8 / "model.tflite").read_bytes(),
    )
    tokens = [SecretStr(token)] if token else []
    server = Asgi(create_app(CloudSettings(repo=repo, registry=registry_dir, tokens=tokens)))
    store = FleetStore(tmp / "fleet.db")
    controller = MqttClient(
        MqttSettings(url=broker.service_url, username="controller", password=SecretStr("ctl-pw")),
        client_id="controller-test",
    )
    FleetListener(store, FLEET).attach(controller)
    controller.start(wait_s=10)
    with serve_in_thread(server) as url:
        fleet = Fleet(
            tmp, broker, url, server, registry, key, trust_path, controller, store, token=token
        )
        try:
            yield fleet
        finally:
            for service in fleet.agents.values():
                stop_quietly(service)
            controller.stop()
            store.close()


def stop_quietly(service: AgentService) -> None:
    with contextlib.suppress(Exception):  # a test may have stopped it already
        service.stop()


def retained_json(
    topic: str, broker: Mosquitto, user: str = "controller", password: str = "ctl-pw"
) -> Any:
    """The retained message on ``topic`` (None if there is none). The broker sends what a
    subscription holds before anything published after it on the same connection, so a
    marker published once subscribed says when a retained message, if any, has arrived: no
    time limit stands for "there is none". (``user`` must be allowed to publish the marker
    under ``tandem/v1/``: the controller is.)"""
    got: list[bytes] = []
    marked = threading.Event()
    marker = Topic(f"{topics.PREFIX}/test/peek-{time.monotonic_ns()}", 1, False)

    def on(t: str, payload: bytes, retained: bool) -> None:
        got.append(payload)

    c = MqttClient(
        MqttSettings(url=broker.url_for(user), username=user, password=SecretStr(password)),
        client_id=f"peek-{time.monotonic_ns()}",
    )
    c.subscribe(topic, on)
    c.subscribe(marker.name, lambda t, payload, retained: marked.set())
    c.start(wait_s=10)
    try:
        assert c.publish_wait(marker, b""), "the marker was not acknowledged"
        assert marked.wait(10), "the marker never came back"
    finally:
        c.stop()
    return json.loads(got[-1]) if got and got[-1] else None
