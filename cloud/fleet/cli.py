"""``tandem-cloud fleet``: roll out, roll back, and see where every device stands.

    tandem-cloud fleet rollout digits@5 [--group G | --devices a,b] [--canary 1|10%]
                                        [--waves 2] [--max-failure-rate 0] [--wave-timeout 300]
                                        [--shadow [--gate-min-samples 500] [--gate-margin 0.01]
                                                  [--shadow-timeout-s 3600]]
    tandem-cloud fleet resume ID
    tandem-cloud fleet controller [--lease-ttl 15] [--poll 1]
    tandem-cloud fleet rollback digits [--to 4]
    tandem-cloud fleet status
    tandem-cloud fleet device-token DEVICE | samples | capture on|off|clear
                                        (cloud/fleet/samples/cli.py)

Broker and fleet come from the cloud settings (``TANDEM_CLOUD_MQTT__URL``,
``..._USERNAME``/``_PASSWORD``, ``TANDEM_CLOUD_FLEET``) or ``--broker``/``--fleet``.

One controller acts on a fleet's rollouts at a time: the holder of the lease
``rollouts:<fleet>`` in the fleet store. ``controller`` runs until stopped (SIGTERM), taking
the lease when it is free and running every unfinished rollout; run one on each of several
instances and the others take over when the holder dies. ``rollout`` and ``resume`` run the
rollout themselves when they get the lease, or else wait for the controller that holds it
(and take over if it dies). ``--lease-ttl`` and ``--poll`` override the ``[controller]``
settings, which ``serve`` uses too when it takes part (``controller.run_in_server``).

``--shadow`` starts the rollout with a shadow phase gated by field accuracy: the canary's
agents run the release beside their serving model, without answering with it, until
``--gate-min-samples`` of its runs have a cloud label; it goes on only if its agreement with
the cloud is at least the serving model's minus ``--gate-margin`` on those same requests
(checked again before each wave), else it is aborted with the figures, having never served
(``cloud/fleet/gate.py``). ``--shadow-timeout-s`` bounds the wait for those samples.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Any

from cloud.fleet import queries
from cloud.fleet.controller import FleetController, default_holder, lease_name
from cloud.fleet.gate import DEFAULT_MARGIN, DEFAULT_MIN_SAMPLES
from cloud.fleet.lease import Lease, LeaseLostError
from cloud.fleet.listener import FleetListener
from cloud.fleet.rollout import RolloutController, RolloutError
from cloud.fleet.samples.cli import ACTIONS as SAMPLE_ACTIONS
from cloud.fleet.samples.cli import add_sample_parsers, run_sample_action
from cloud.fleet.store import FleetStore, Rollout, open_store
from cloud.releases.registry import Registry
from cloud.settings import CloudSettings
from shared.mqtt import MqttClient, MqttSettings
from shared.signing import SigningKey

FINISHED = ("COMPLETED", "ABORTED")


def add_fleet_parser(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="rollouts and fleet status").add_subparsers(
        dest="action", required=True
    )
    for p in (
        fleet.add_parser("rollout", help="canary, then waves, then the whole target"),
        fleet.add_parser("resume", help="carry on an interrupted rollout"),
        fleet.add_parser("controller", help="run rollouts as they come (one instance acts)"),
        fleet.add_parser("rollback", help="a new release with the previous artifact"),
        fleet.add_parser("status", help="each device's model version and job state"),
    ):
        p.add_argument("--fleet")
        p.add_argument("--broker", help="mqtt://host:port (default: settings)")
        p.add_argument("--username")
        p.add_argument("--password")
        p.add_argument("--registry", type=Path)
        p.add_argument("--state-dir", type=Path)
        if p.prog.endswith(("rollout", "resume", "controller")):
            p.add_argument("--lease-ttl", type=float, help="seconds (default: settings, 15)")
            p.add_argument("--poll", type=float, help="seconds between looks for new rollouts")
        if p.prog.endswith("rollout"):
            p.add_argument("release", help="MODEL@VERSION")
            target = p.add_mutually_exclusive_group()
            target.add_argument("--group")
            target.add_argument("--devices", help="comma-separated device ids")
            p.add_argument("--canary", default="1", help="a count, or a percentage like 10%%")
            p.add_argument("--waves", type=int, default=2)
            p.add_argument("--max-failure-rate", type=float, default=0.0)
            p.add_argument("--wave-timeout", type=float, default=300.0)
            p.add_argument(
                "--shadow",
                action="store_true",
                help="first run the release as a shadow on the canary, gated by field accuracy",
            )
            p.add_argument(
                "--gate-min-samples",
                type=int,
                default=DEFAULT_MIN_SAMPLES,
                help="labelled samples",
            )
            p.add_argument(
                "--gate-margin", type=float, default=DEFAULT_MARGIN, help="how much worse may pass"
            )
            p.add_argument("--shadow-timeout-s", type=float, default=3600.0)
        elif p.prog.endswith("resume"):
            p.add_argument("id", type=int)
        elif p.prog.endswith("rollback"):
            p.add_argument("model")
            p.add_argument("--to", type=int, help="the release whose artifact to go back to")
            p.add_argument("--key", type=Path, help="signing key (default: settings)")
    add_sample_parsers(fleet)


def fleet_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The fleet flags as overrides of the settings loader (``main``), so they are validated
    like the file and the environment, and ``--broker`` keeps the file's MQTT account."""
    updates: dict[str, Any] = {
        key: value
        for key in ("fleet", "registry", "state_dir")
        if (value := getattr(args, key, None)) is not None
    }
    mqtt = {
        key: value
        for key in ("url", "username", "password")
        if (value := getattr(args, "broker" if key == "url" else key, None))
    }
    if mqtt:
        updates["mqtt"] = mqtt
    controller = {
        key: value
        for key, flag in (("lease_ttl_s", "lease_ttl"), ("poll_s", "poll"))
        if (value := getattr(args, flag, None)) is not None
    }
    if controller:  # over the [controller] section (TANDEM_CLOUD_CONTROLLER__*)
        updates["controller"] = controller
    return updates


def _connect(settings: CloudSettings, store: FleetStore) -> MqttClient:
    mqtt_settings = settings.mqtt or MqttSettings(protocol="5")  # the cloud speaks MQTT 5
    mqtt = MqttClient(mqtt_settings, client_id=f"controller-{time.time_ns()}")
    FleetListener(store, settings.fleet).attach(mqtt)
    mqtt.start(wait_s=10.0)
    time.sleep(0.5)  # retained status and update messages arrive
    return mqtt


def run_fleet(args: argparse.Namespace, settings: CloudSettings) -> int:
    """``settings`` already carry the fleet flags (``fleet_overrides``)."""
    if args.action in SAMPLE_ACTIONS:  # no store connection or listener needed
        return run_sample_action(args, settings)
    store = open_store(settings.database_url, settings.state_dir)
    mqtt = _connect(settings, store)
    try:
        if args.action == "status":
            print_status(store, settings.fleet)
            return 0
        if settings.registry is None:
            raise RolloutError("a registry folder is needed (--registry or TANDEM_CLOUD_REGISTRY)")
        registry = Registry(settings.registry)
        if args.action == "controller":
            return _serve_controller(
                FleetController(
                    store,
                    mqtt,
                    registry,
                    settings.fleet,
                    settings.controller,
                    progress=lambda line: print(line, flush=True),
                )
            )
        if args.action == "rollback":  # an operator's act of its own: no lease
            controller = RolloutController(store, mqtt, registry, settings.fleet)
            key_path = args.key or settings.signing_key
            if key_path is None:
                raise RolloutError("rollback signs a release: --key or TANDEM_CLOUD_SIGNING_KEY")
            release = controller.rollback(args.model, SigningKey.load(key_path), args.to)
            print(f"published {release.model}@{release.version} (artifact {release.edge.url})")
            return 0
        ttl_s = settings.controller.lease_ttl_s
        lease = Lease(store, lease_name(settings.fleet), default_holder(), ttl_s)
        controller = RolloutController(
            store, mqtt, registry, settings.fleet, progress=print, lease=lease
        )
        if args.action == "rollout":
            model, _, version = args.release.partition("@")
            if not version.isdigit():
                raise RolloutError("the release is MODEL@VERSION, e.g. digits@5")
            rollout_id = controller.create(
                model,
                int(version),
                group=args.group,
                devices=args.devices.split(",") if args.devices else None,
                canary=args.canary,
                waves=args.waves,
                max_failure_rate=args.max_failure_rate,
                wave_timeout_s=args.wave_timeout,
                shadow=args.shadow,
                gate_min_samples=args.gate_min_samples,
                gate_margin=args.gate_margin,
                shadow_timeout_s=args.shadow_timeout_s,
            )
        else:
            rollout_id = args.id
        print(f"rollout {rollout_id}")
        result = _run_or_follow(controller, lease, rollout_id)
        print(f"rollout {result.id}: {result.state} {result.detail}".rstrip())
        return 0 if result.state == "COMPLETED" else 3
    finally:
        mqtt.stop()
        store.close()


def _serve_controller(controller: FleetController) -> int:
    """Until SIGTERM or SIGINT: the holder then stops acting, releases the lease and exits."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: controller.stop())
    try:
        controller.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _run_or_follow(controller: RolloutController, lease: Lease, rollout_id: int) -> Rollout:
    """Run the rollout while holding the lease; while another instance holds it, follow the
    rollout in the store until it ends, taking over if that instance goes away."""
    store = controller.store
    told = False
    while True:
        if lease.acquire():
            try:
                return controller.run(rollout_id)
            except LeaseLostError as exc:
                print(f"rollout {rollout_id}: {exc}")
            finally:
                lease.release()
        r = store.rollout(rollout_id)
        if r.state in FINISHED:
            return r
        if not told:
            holder = store.lease_holder(lease.name) or "another instance"
            print(f"rollout {rollout_id}: run by {holder}; following it")
            told = True
        time.sleep(lease.renew_every_s)


def print_status(store: FleetStore, fleet: str) -> None:
    """The fleet at a glance: devices, what they serve, their last job and, where the
    collector's database is at hand (same ``--state-dir``), their latest key figures."""
    rows = []
    after = None
    while True:  # page by page, the API's own queries
        page = queries.device_page(store, fleet, limit=1000, after=after)
        for d in page.devices:
            models = ", ".join(f"{m['model']}:{m['version']}" for m in d["models"]) or "-"
            job = d["job"]
            job_text = f"{job['model']}@{job['version']} {job['state']}" if job else "-"
            rate, p95 = d["offload_rate"], d["p95_ms"]
            rows.append(
                (
                    d["device"],
                    d["group"] or "-",
                    "online" if d["online"] else "offline",
                    models,
                    job_text,
                    f"{100 * rate:.1f}%" if rate is not None else "-",
                    f"{p95:.1f}" if p95 is not None else "-",
                    d["last_seen"][11:19],
                    job["reason"] if job else "",
                )
            )
        if page.next is None:
            break
        after = page.next
    total, online = queries.online_counts(store, fleet)
    print(f"fleet {fleet}: {total} devices, {online} online")
    head = (
        "device",
        "group",
        "status",
        "serving",
        "last job",
        "offload",
        "p95 ms",
        "seen",
        "reason",
    )
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    for ro in store.rollouts(fleet)[-5:]:
        where = "(shadow)" if ro.shadow and ro.phase == "shadow" else f"wave {ro.current_wave}"
        print(
            f"rollout {ro.id}: {ro.model}@{ro.version} -> {ro.target_kind} {ro.target or ''} "
            f"{ro.state} {where} {ro.detail}".rstrip()
        )
