from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.errors import ContractError
from shared.manifest import Manifest, TensorSpec
from tests.fakes import manifest
from tests.helpers import EDGE_INT8


def test_json_round_trip_uses_schema_alias() -> None:
    m = manifest()
    text = m.to_json()
    assert '"schema": "tandem.manifest/v1"' in text
    assert Manifest.from_json(text) == m


def test_demo_manifests_load() -> None:
    m = Manifest.load(EDGE_INT8)
    assert m.ref == "digits:1" and m.input.datatype == "INT8" and m.input.quantization
    assert len(m.golden) >= 5


def test_contract_checks() -> None:
    good = manifest().document()
    with pytest.raises(ValidationError, match="labels"):
        Manifest.model_validate({**good, "labels": ["a", "b"]})
    with pytest.raises(ValidationError, match="model"):
        Manifest.model_validate({**good, "model": "../etc"})
    with pytest.raises(ValidationError):
        Manifest.model_validate({**good, "surprise": 1})
    with pytest.raises(ValidationError, match="golden"):
        Manifest.model_validate(
            {**good, "golden": [{"input": [1.0], "expected": [1, 0, 0], "label": 0}]}
        )
    with pytest.raises(ValidationError, match="datatype"):
        TensorSpec(name="x", shape=[1], datatype="FLOAT")
    assert TensorSpec(name="x", shape=[-1, 4], datatype="FP32").accepts((7, 4))
    assert not TensorSpec(name="x", shape=[-1, 4], datatype="FP32").accepts((7, 5))


def test_unreadable_and_invalid_files_are_contract_errors(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="cannot read"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ContractError, match="invalid manifest"):
        Manifest.load(tmp_path)


def _doc() -> dict[str, object]:
    return json.loads(Manifest.load(EDGE_INT8).to_json())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 100_000,  # RecursionError in the JSON decoder
        json.dumps({**_doc(), "labels": "X"}).replace('"X"', "[" * 100_000 + "]" * 100_000),
        json.dumps({**_doc(), "output": {**_doc()["output"], "shape": []}}),  # type: ignore[dict-item]
        json.dumps({**_doc(), "input": {**_doc()["input"], "shape": []}}),  # type: ignore[dict-item]
        b"\xff\xfe\xfd{",
        b"[]",
        b"3",
        json.dumps({**_doc(), "version": "two", "labels": 5}),
        (EDGE_INT8 / "manifest.json").read_bytes()[:500],
    ],
    ids=[
        "deep",
        "deep-field",
        "no-output-dims",
        "no-input-dims",
        "not-utf8",
        "list",
        "number",
        "wrong-types",
        "truncated",
    ],
)
def test_any_unparsable_document_is_a_contract_error(payload: str | bytes) -> None:
    with pytest.raises(ContractError, match="invalid manifest"):
        Manifest.from_json(payload)
