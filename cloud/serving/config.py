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

    [inputs.images]            # an image input, by its ONNX name (optional, one per input)
    kind = "image"
    layout = "NHWC"            # or "NCHW"; the size and datatype are the ONNX input's own
    colour = "RGB"             # "RGB", "BGR" or "GRAY"
    resize = "squash"          # "squash", "crop" or "letterbox"
    mean = [0.0]               # (x - mean) / std per channel (one value: every channel)
    std = [255.0]
    max_pixels = 40000000      # width x height of a picture, refused before it is decoded
    # quantization = {scale = 0.0078125, zero_point = 0}   # an integer input only

An image section uses the manifest's vocabulary (``shared.contract.ImageSpec``): the input
then takes, besides tensors of its own shape, encoded JPEG/PNG as ``BYTES`` (one picture per
row, shape ``[n]``) and ``UINT8`` frames of any size (``[n, H, W, C]``, ``[H, W, C]``),
preprocessed as the agent preprocesses (``cloud/serving/image_inputs.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.contract import ImageSpec, Quantization
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


class ImageInputConfig(ImageSpec):
    """An ``[inputs.<name>]`` section: how pictures become that input. The height, width,
    channels and datatype are the ONNX input's; ``quantization`` is needed by an integer
    input only (as in a manifest)."""

    kind: Literal["image"] = "image"
    max_pixels: int = Field(default=40_000_000, ge=1)
    quantization: Quantization | None = None

    def image(self) -> ImageSpec:
        """The section's ``ImageSpec`` part, as a manifest would hold it."""
        return ImageSpec.model_validate(self.model_dump(include=set(ImageSpec.model_fields)))


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=32, ge=0)
    max_queue_delay_us: int = Field(default=500, ge=0)
    close_when_quiet: bool = True
    max_queue_size: int = Field(default=256, ge=1)
    timeout_ms: float = Field(default=5000.0, gt=0)
    instances: int = Field(default=1, ge=1, le=16)
    versions: Literal["all"] | Latest | Specific = "all"
    inputs: dict[str, ImageInputConfig] = Field(default_factory=dict)

    def selects(self, available: list[int]) -> list[int]:
        """The versions this policy serves, of those present on disk."""
        if isinstance(self.versions, Latest):
            return sorted(available)[-self.versions.latest :]
        if isinstance(self.versions, Specific):
            return [v for v in sorted(available) if v in self.versions.specific]
        return sorted(available)

    def batch_limit(self, batchable: bool) -> int:
        """Triton's ``max_batch_size`` of a model: this one's, if its tensors have a free
        first dimension (a request of more rows is refused, as Triton refuses it); 0, no
        batch dimension and no limit, otherwise."""
        return self.max_batch_size if batchable else 0

    def triton_sections(self, batching: bool, gpu: bool) -> dict[str, Any]:
        """What ``config.pbtxt`` would say of this file's settings (the README's mapping),
        as Triton's ``GET /v2/models/{m}/config`` writes it: version policy, instances and,
        when requests are merged, dynamic batching with its queue policy."""
        policy: dict[str, Any] = {"all": {}}
        if isinstance(self.versions, Latest):
            policy = {"latest": {"num_versions": self.versions.latest}}
        elif isinstance(self.versions, Specific):
            policy = {"specific": {"versions": sorted(self.versions.specific)}}
        sections: dict[str, Any] = {
            "version_policy": policy,
            "instance_group": [
                {"count": self.instances, "kind": "KIND_GPU" if gpu else "KIND_CPU"}
            ],
        }
        if batching:
            sections["dynamic_batching"] = {
                "max_queue_delay_microseconds": self.max_queue_delay_us,
                "default_queue_policy": {
                    "timeout_action": "REJECT",
                    "default_timeout_microseconds": round(self.timeout_ms * 1000),
                    "allow_timeout_override": False,
                    "max_queue_size": self.max_queue_size,
                },
            }
        return sections

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        path = model_dir / CONFIG_FILE
        if not path.is_file():
            return cls()
        try:
            return cls.model_validate(tomllib.loads(path.read_text()))
        except (OSError, ValueError, ValidationError) as exc:
            raise ContractError(f"invalid {path}: {exc}") from None
