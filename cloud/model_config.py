"""Per-model serving settings: ``<repo>/<model>/config.toml`` (optional; Triton's
``config.pbtxt`` in spirit, in a simpler format of ours). Missing file, missing keys: the
defaults below. A malformed file is that model's load error, reported on its readiness.

    max_batch_size = 32        # 0 or 1: no dynamic batching
    max_queue_delay_us = 500   # how long the first request of a batch waits for company, at most
    close_when_quiet = true    # ...or less, once requests stop coming (a lone one goes at once)
    max_queue_size = 256       # requests waiting; beyond it: 503 with Retry-After at once
    timeout_ms = 5000          # a request that waits longer gets a 503
    instances = 1              # ONNX Runtime sessions (batches run concurrently up to this)
    versions = "all"           # "all", {latest = 2}, or {specific = [1, 3]}
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import ContractError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_FILE = "config.toml"


class Latest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latest: int = Field(ge=1)


class Specific(BaseModel):
    model_config = ConfigDict(extra="forbid")
    specific: list[int] = Field(min_length=1)


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=0)
    max_queue_delay_us: int = Field(default=500, ge=0)
    close_when_quiet: bool = True
    max_queue_size: int = Field(default=256, ge=1)
    timeout_ms: float = Field(default=5000.0, gt=0)
    instances: int = Field(default=1, ge=1, le=16)
    versions: Literal["all"] | Latest | Specific = "all"

    def selects(self, available: list[int]) -> list[int]:
        """The versions this policy serves, of those present on disk."""
        if isinstance(self.versions, Latest):
            return sorted(available)[-self.versions.latest :]
        if isinstance(self.versions, Specific):
            return [v for v in sorted(available) if v in self.versions.specific]
        return sorted(available)

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except (OSError, ValueError, ValidationError) as exc:
            raise ContractError(f"invalid {path}: {exc}") from None
