"""The capture switch as the device holds it: the fleet's retained commands
(``shared.commands.CaptureCommand`` on ``shared.topics.agent_command_topics``) at fleet,
group and device scope, the most specific one present deciding (device > group > fleet);
an empty retained payload deletes a scope's command.

The scopes are persisted in the state folder (``capture.json``) at every change, so a
device that boots with no network keeps the last state it was told, and one that
reconnects does not flicker while the broker resends the retained commands one scope at a
time. (A command deleted while the device was offline is not seen: MQTT does not send
what is no longer retained. The next command at any scope sets things right.)

A device whose settings fix ``capture.enabled`` ignores the switch altogether (its audit
rate included) and logs that once: the owner's choice outranks the fleet's. A malformed or
oversized payload is counted and logged, never raised: the handler runs on paho's network
thread, which an exception would kill.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from agent.device.store import atomic_write
from shared import topics
from shared.commands import MAX_COMMAND_BYTES, CaptureCommand

log = logging.getLogger(__name__)

#: Most specific last.
SCOPES = ("fleet", "group", "device")


class CaptureSwitch:
    def __init__(self, path: Path, fixed: bool | None = None) -> None:
        """``fixed``: the device setting ``capture.enabled`` (None: follow the fleet)."""
        self.path = path
        self.fixed = fixed
        #: Called (on the thread that changed it) after the effective state changed.
        self.listeners: list[Callable[[], None]] = []
        self.malformed = 0
        self.oversized = 0
        self._lock = threading.Lock()
        self._scopes: dict[str, CaptureCommand] = self._load()
        self._told_fixed = False
        #: ``time.monotonic()`` when capture last turned on (-inf: on since boot).
        self._on_since = -math.inf

    def _load(self) -> dict[str, CaptureCommand]:
        try:
            doc = json.loads(self.path.read_bytes())
            return {s: CaptureCommand.model_validate(doc[s]) for s in SCOPES if s in doc}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, ValidationError) as exc:
            log.warning(
                "ignoring an unreadable %s (%s): capture follows the fleet anew", self.path, exc
            )
            return {}

    def _save(self) -> None:
        doc = {s: c.model_dump(mode="json") for s, c in self._scopes.items()}
        atomic_write(self.path, json.dumps(doc).encode())

    @property
    def command(self) -> CaptureCommand | None:
        """The fleet's command in force (the most specific scope present), or None."""
        with self._lock:
            return self._command()

    def _command(self) -> CaptureCommand | None:
        for scope in reversed(SCOPES):
            if scope in self._scopes:
                return self._scopes[scope]
        return None

    @property
    def enabled(self) -> bool:
        with self._lock:
            return self._state()[0]

    def enabled_at(self, answered: float) -> bool:
        """Whether an answer given at ``answered`` (``time.monotonic()``) may be kept: capture
        is on now and was on then. Consumers run behind a queue, so an answer given while
        capture was off may be handled just after it turned on; the switch is a privacy
        switch, and that answer must not be kept. (Conservative: after off-then-on, answers
        of the earlier on-period still queued are dropped too.)"""
        with self._lock:
            return self._state()[0] and answered >= self._on_since

    @property
    def audit_rate(self) -> float | None:
        """The fleet's audit rate in force (None: the device's own setting)."""
        with self._lock:
            return self._state()[1]

    def _state(self) -> tuple[bool, float | None]:
        """Enabled and the fleet's audit rate (the caller holds the lock)."""
        if self.fixed is not None:
            return self.fixed, None
        command = self._command()
        if command is None:
            return False, None
        return command.enabled, command.audit_rate

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """The MQTT handler of the command topics (paho's thread: never raises)."""
        try:
            self._on_message(topic, payload)
        except Exception:
            log.exception("capture command on %s failed", topic)

    def _on_message(self, topic: str, payload: bytes) -> None:
        scope = topics.parse_command_scope(topic)
        if scope is None:
            self.malformed += 1
            log.warning("ignoring a capture command on unexpected topic %s", topic)
            return
        if len(payload) > MAX_COMMAND_BYTES:
            self.oversized += 1
            log.warning(
                "ignoring a %d-byte capture command on %s (at most %d)",
                len(payload),
                topic,
                MAX_COMMAND_BYTES,
            )
            return
        command: CaptureCommand | None = None
        if payload:
            try:
                command = CaptureCommand.model_validate_json(payload)
            except ValidationError as exc:
                self.malformed += 1
                log.warning("ignoring a malformed capture command on %s: %s", topic, exc)
                return
        if self.fixed is not None:
            if not self._told_fixed:
                self._told_fixed = True
                log.info(
                    "capture is fixed %s by this device's settings: the fleet's switch is ignored",
                    "on" if self.fixed else "off",
                )
            return
        self.set(scope, command)

    def set(self, scope: str, command: CaptureCommand | None) -> None:
        """Put (or with None, delete) ``scope``'s command, persist, tell the listeners."""
        with self._lock:
            before = self._state()
            if command is None:
                if self._scopes.pop(scope, None) is None:
                    return
            elif self._scopes.get(scope) == command:
                return
            else:
                self._scopes[scope] = command
            after = self._state()
            if after[0] and not before[0]:
                self._on_since = time.monotonic()
            self._save()
        if after != before:
            log.info(
                "capture switch: %s (audit rate %s)",
                "on" if after[0] else "off",
                "the device's own" if after[1] is None else after[1],
            )
            for listener in self.listeners:
                listener()
