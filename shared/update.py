"""Update job states and the report an agent publishes (retained) on its ``update`` topic.

After AWS IoT Jobs: ``QUEUED -> DOWNLOADING -> VERIFYING -> ACTIVATING -> ACTIVE``, or a
terminal ``REJECTED`` (bad signature, expired, not newer, incompatible: nothing downloaded),
``FAILED`` (download, digest, validation: the previous model still serves) or
``ROLLED_BACK`` (activated, then failed its health watch: the previous model serves again).
Every report carries the manifest version and a reason.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field

from shared.identifiers import Identifier


class UpdateState(str, Enum):
    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    ACTIVATING = "ACTIVATING"
    ACTIVE = "ACTIVE"
    REJECTED = "REJECTED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def failure(self) -> bool:
        return self in (UpdateState.REJECTED, UpdateState.FAILED, UpdateState.ROLLED_BACK)


TERMINAL = frozenset(
    {UpdateState.ACTIVE, UpdateState.REJECTED, UpdateState.FAILED, UpdateState.ROLLED_BACK}
)


class UpdateReport(BaseModel):
    """One job state of one device for one model release."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Identifier
    model: Identifier
    version: int = Field(ge=1)
    state: UpdateState
    reason: str = ""
    active_version: int | None = Field(
        default=None, description="the version serving when this was reported"
    )
    ts: datetime
