"""The long-running rollout controller: any number of instances, one acting at a time.

Each instance tries to take the fleet's lease (``rollouts:<fleet>`` in the fleet store); the
one holding it runs every unfinished rollout (PLANNED or RUNNING) in order, then keeps looking
for new ones; the others wait, and try again every third of the lease's time to live. When the
holder dies, its lease expires and another instance takes over: the rollout carries on from
what the store says (the plan, the wave, the devices already published), the way a restarted
controller does (``cloud/fleet/rollout.py``). A holder that stops cleanly releases the lease,
so that the next one need not wait for it to expire.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable

from cloud.fleet import queries
from cloud.fleet.lease import Lease, LeaseLostError
from cloud.fleet.rollout import RolloutController
from cloud.fleet.store import FleetStore
from cloud.releases.registry import Registry
from cloud.settings import ControllerSettings  # the [controller] section: one definition
from shared.errors import TandemError
from shared.mqtt import MqttClient

__all__ = [
    "BackgroundController",
    "ControllerSettings",
    "FleetController",
    "default_holder",
    "lease_name",
]

log = logging.getLogger(__name__)


def lease_name(fleet: str) -> str:
    """The lease that makes one controller at a time act on ``fleet``'s rollouts."""
    return f"rollouts:{fleet}"


def default_holder() -> str:
    """This process, as a lease holder: unique across hosts and processes."""
    return f"{socket.gethostname()}:{os.getpid()}"


class FleetController:
    """Runs ``fleet``'s unfinished rollouts while it holds the lease (``serve``)."""

    def __init__(
        self,
        store: FleetStore,
        mqtt: MqttClient,
        registry: Registry,
        fleet: str,
        settings: ControllerSettings,
        *,
        holder: str | None = None,
        progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.settings = settings
        self.progress = progress
        self.lease = Lease(
            store, lease_name(fleet), holder or default_holder(), settings.lease_ttl_s
        )
        self.rollouts = RolloutController(
            store,
            mqtt,
            registry,
            fleet,
            poll_s=settings.wave_poll_s,
            progress=progress,
            lease=self.lease,
        )
        self._stop = threading.Event()
        self._failures: dict[int, str] = {}  # rollout -> the error last reported for it

    def stop(self) -> None:
        """Stop acting now (safe from a signal handler); ``serve`` then returns."""
        self._stop.set()
        self.lease.drop()

    def serve(self) -> None:
        """Until ``stop()``: take the lease when it is free, run what is unfinished."""
        holding = False
        try:
            while not self._stop.is_set():
                # held: the renewal thread keeps it; else one try to take it
                if self.lease.held or self.lease.acquire():
                    if not holding:
                        self.progress(f"{self.lease.holder} holds the lease {self.lease.name}")
                        holding = True
                    try:
                        self.run_unfinished()
                    except Exception:  # the store is away: the next pass tries again
                        log.exception("looking for unfinished rollouts failed")
                    wait = self.settings.poll_s
                else:
                    if holding:
                        self.progress(f"{self.lease.holder} lost the lease {self.lease.name}")
                        holding = False
                    wait = self.lease.renew_every_s
                self._stop.wait(wait)
        finally:
            self.lease.release()

    def run_unfinished(self) -> None:
        """Each unfinished rollout in turn, while the lease is held. An error of one
        rollout (the broker away past the wave's deadline, no devices) is reported once and
        the rollout tried again at the next pass; a lost lease ends the pass."""
        for rollout_id in queries.unfinished_rollouts(self.store, self.fleet):
            if self._stop.is_set():
                return
            r = self.store.rollout(rollout_id)
            what = f"rollout {r.id} ({r.model}@{r.version})"
            if rollout_id not in self._failures:  # said once, not at every retry
                self.progress(
                    f"{what}: resuming at wave {r.current_wave}"
                    if r.state == "RUNNING"
                    else f"{what}: starting"
                )
            try:
                result = self.rollouts.run(rollout_id)
            except LeaseLostError as exc:
                self.progress(f"{what}: stopped, {exc}")
                return
            except TandemError as exc:
                if self._failures.get(rollout_id) != exc.message:
                    self._failures[rollout_id] = exc.message
                    self.progress(f"{what}: {exc.message}")
                continue
            except Exception:  # the store or the broker misbehaved: next pass
                log.exception("%s failed", what)
                continue
            self._failures.pop(rollout_id, None)
            self.progress(f"rollout {result.id}: {result.state} {result.detail}".rstrip())


class BackgroundController:
    """A ``FleetController`` on a thread of its own, over its own MQTT connection: what
    ``tandem-cloud serve`` runs with ``controller.run_in_server``, so that each of N
    instances behind a load balancer takes part in the lease and no extra process is needed.
    ``stop()`` returns once the lease is released: the next instance need not wait for it to
    expire."""

    def __init__(self, controller: FleetController, mqtt: MqttClient) -> None:
        self.controller = controller
        self.mqtt = mqtt
        self._thread = threading.Thread(
            target=self._serve, name=f"controller-{controller.fleet}", daemon=True
        )

    def _serve(self) -> None:
        try:
            self.controller.serve()
        except Exception:  # serve() handles the store's and the broker's errors itself
            log.exception("the rollout controller stopped")

    def start(self) -> None:
        """Connect in the background (retrying) and start taking part; never waits."""
        self.mqtt.start()
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop acting, release the lease, disconnect."""
        self.controller.stop()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.mqtt.stop()
