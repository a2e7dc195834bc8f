"""An edge bundle: the artifact and its template manifest, as ``tandem-cloud model package``
takes them. The contract (names, shapes, datatypes, quantization) is read from the
artifact's interpreter details, never typed by hand."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cloud.releases.packaging import tensor_spec
from shared.manifest import (
    MANIFEST_FILE,
    MANIFEST_SCHEMA_V1,
    CloudTarget,
    EdgeArtifact,
    GoldenSample,
    Manifest,
    Preprocessing,
    RoutingDefaults,
    utc_now,
)


def template_manifest(
    *,
    model: str,
    blob: bytes,
    input_detail: dict[str, Any],
    output_detail: dict[str, Any],
    cloud: CloudTarget,
    labels: list[str],
    routing: RoutingDefaults,
    golden: list[GoldenSample],
) -> Manifest:
    """Version 1 of a model taking raw features (any input scale folded into its first
    layer) and giving logits."""
    return Manifest(
        schema=MANIFEST_SCHEMA_V1,
        model=model,
        version=1,
        created=utc_now(),
        edge=EdgeArtifact(
            format="tflite",
            file="model.tflite",
            sha256=hashlib.sha256(blob).hexdigest(),
            size=len(blob),
        ),
        cloud=cloud,
        input=tensor_spec(input_detail, "input"),
        output=tensor_spec(output_detail, "logits"),
        output_kind="logits",
        labels=labels,
        preprocessing=Preprocessing(),
        routing=routing,
        golden=golden,
    )


def write_bundle(folder: Path, manifest: Manifest, blob: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / manifest.edge.file).write_bytes(blob)
    (folder / MANIFEST_FILE).write_text(manifest.to_json())
    return folder
