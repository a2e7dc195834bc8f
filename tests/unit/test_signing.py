from __future__ import annotations

from pathlib import Path

import pytest

from shared.manifest import Manifest
from shared.signing import KeyFileError, SignatureError, SigningKey, TrustStore, canonical_json
from tests.fakes import manifest


def test_sign_and_verify_round_trip_through_json(tmp_path: Path) -> None:
    key = SigningKey.generate()
    key.save(tmp_path / "op.key")
    assert (tmp_path / "op.key").stat().st_mode & 0o777 == 0o600
    loaded = SigningKey.load(tmp_path / "op.key")
    assert loaded.key_id == key.key_id
    trust = TrustStore()
    assert trust.add(key.public_b64) == key.key_id
    trust.save(tmp_path / "trust.json")
    trust = TrustStore.load(tmp_path / "trust.json")
    signed = loaded.sign(manifest())
    # reformatted in transit: still the same canonical bytes
    trust.verify(Manifest.from_json(signed.to_json().replace("\n", " ")))


def test_tampering_unknown_keys_and_unsigned_are_refused() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    trust = TrustStore()
    trust.add(key.public_b64)
    signed = key.sign(manifest())
    with pytest.raises(SignatureError, match="does not verify"):
        trust.verify(signed.model_copy(update={"version": 99}))
    with pytest.raises(SignatureError, match="unknown key"):
        trust.verify(other.sign(manifest()))
    with pytest.raises(SignatureError, match="not signed"):
        trust.verify(manifest())
    forged = other.sign(manifest()).model_copy(update={"key_id": key.key_id})
    with pytest.raises(SignatureError, match="does not verify"):
        trust.verify(forged)


def test_canonical_json_is_order_and_space_free() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_bad_key_files(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("nope")
    with pytest.raises(KeyFileError):
        SigningKey.load(tmp_path / "k")
    (tmp_path / "t.json").write_text('{"keys": [{"public_key": "!!"}]}')
    with pytest.raises(KeyFileError):
        TrustStore.load(tmp_path / "t.json")
