"""The retained ``status`` message of a device: its birth certificate when it connects, and
``offline`` (its Last Will, or its own goodbye) when it leaves.

The birth tells the fleet who the device is (group, agent version, capabilities), what it
serves, and which session this is: ``session`` increases across restarts, so consumers can
tell a restart from a reconnect.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.identifiers import Identifier


class ModelVersion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Identifier
    version: int


class DeviceStatus(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Identifier
    state: Literal["online", "offline"]
    group: Identifier | None = None
    agent_version: str = ""
    session: int = Field(default=0, ge=0)
    models: list[ModelVersion] = []
    capabilities: list[str] = []
    ts: datetime | None = None
