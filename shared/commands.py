"""Commands an operator sends to agents over MQTT (``shared.topics.capture_command``).

Only one today: the capture switch of the learning loop. A command is a state, not an
event: it is retained, so that a device finds the latest one when it connects, and the most
specific scope present (device > group > fleet) is the one that holds. An empty retained
payload deletes the command at that scope.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

#: Largest command payload an agent reads (a larger one is refused unread, and counted).
MAX_COMMAND_BYTES = 4096


class CaptureCommand(BaseModel):
    """Turn field-data capture on or off (and optionally set its audit rate). An agent whose
    own settings fix ``capture.enabled`` ignores the switch and says so in its log: the
    device owner's choice outranks the fleet's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool
    audit_rate: float | None = Field(
        default=None, ge=0.0, le=1.0, description="None: the agent's own setting"
    )
    ts: datetime | None = None
