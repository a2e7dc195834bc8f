"""Settings of the inference server's own: ONNX Runtime's session options. The composition
root's ``CloudSettings`` holds them; the serving wing never reads the rest (MQTT, fleet)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class OrtSettings(BaseModel):
    """ONNX Runtime session options applied to every model."""

    model_config = ConfigDict(extra="forbid")

    intra_op_threads: int = Field(default=1, ge=0, description="0 lets ONNX Runtime choose")
    inter_op_threads: int = Field(default=1, ge=0)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
