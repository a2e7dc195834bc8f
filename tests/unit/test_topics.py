from __future__ import annotations

import pytest

from shared import topics


def test_builders_fix_qos_and_retain() -> None:
    assert topics.device_status("f", "d") == topics.Topic("tandem/v1/f/devices/d/status", 1, True)
    assert topics.device_telemetry("f", "d").retain is False
    assert topics.device_update("f", "d").retain is True
    assert topics.manifest("f", "m").name == "tandem/v1/f/models/m/manifest"
    assert topics.manifest("f", "m", group="g").name == "tandem/v1/f/groups/g/models/m/manifest"
    assert topics.manifest("f", "m", device="d").name == "tandem/v1/f/devices/d/models/m/manifest"


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "a b", ".."])
def test_identifiers_cannot_break_out(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.device_status("f", bad)
    with pytest.raises(ValueError):
        topics.manifest(bad, "m")


def test_parsing_round_trips() -> None:
    assert topics.parse_manifest(topics.manifest("f", "m", group="g").name) == topics.ManifestTopic(
        "f", "m", "group", "g"
    )
    assert topics.parse_manifest(topics.manifest("f", "m").name) == topics.ManifestTopic(
        "f", "m", "fleet", None
    )
    assert topics.parse_manifest("tandem/v1/f/devices/d/status") is None
    assert topics.parse_manifest("other/v1/f/models/m/manifest") is None
    assert topics.parse_device("tandem/v1/f/devices/d/telemetry") == topics.DeviceTopic(
        "f", "d", "telemetry"
    )
    assert topics.parse_device("tandem/v1/f/devices/d/x/telemetry") is None
    assert topics.SCOPE_RANK["device"] > topics.SCOPE_RANK["group"] > topics.SCOPE_RANK["fleet"]
    with pytest.raises(ValueError):
        topics.manifest("f", "m", group="g", device="d")
