"""Ed25519 signing of manifests over their canonical JSON, keys, and the pinned trust store.

Canonical JSON: the manifest as JSON values (``by_alias``, without ``signature``), keys
sorted, no whitespace, UTF-8, no NaN. Operator and device compute the same bytes from the
same document, whatever order or spacing it travelled in.

A key id is the first 16 hex digits of the SHA-256 of the raw public key. The trust store is
a JSON file of key ids and public keys that devices pin; a manifest is accepted only if its
``key_id`` is in it and the signature verifies under that key.

``cryptography`` (about 8 MB of a device's resident memory, OpenSSL's bindings) is imported
only when a key is made, loaded or used: a device holds raw 32-byte public keys and pays for
the library when the first manifest arrives, not at boot.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import TandemError
from shared.manifest import Manifest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

#: An Ed25519 public key's raw length.
PUBLIC_KEY_BYTES = 32


class SignatureError(TandemError):
    """A manifest is unsigned, signed by a key not in the trust store, or tampered with."""

    http_status = 400


class KeyFileError(TandemError):
    """A key or trust store file is missing or malformed."""


def canonical_json(doc: Any) -> bytes:
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def manifest_signing_bytes(manifest: Manifest) -> bytes:
    """What the signature covers: everything in the manifest but the signature."""
    doc = manifest.document()
    doc.pop("signature", None)
    return canonical_json(doc)


def manifest_digest(manifest: Manifest) -> str:
    """SHA-256 of the whole document, signature included: what tells two copies of a
    manifest apart when one was tampered with but kept the other's version and signature.
    NaN is allowed here (a forged manifest may hold one; it still needs a name)."""
    doc = manifest.document()
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id_of(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey
    key_id: str

    @classmethod
    def generate(cls) -> SigningKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        private = Ed25519PrivateKey.generate()
        return cls(private, key_id_of(_raw_public(private)))

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise KeyFileError(f"cannot read private key {path}: {exc}") from None
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyFileError(f"{path} is not an Ed25519 private key")
        return cls(private, key_id_of(_raw_public(private)))

    def save(self, path: Path) -> None:
        """Write the private key as PKCS#8 PEM, readable by its owner only."""
        from cryptography.hazmat.primitives import serialization

        pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    @property
    def public_raw(self) -> bytes:
        return _raw_public(self.private)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode()

    def sign(self, manifest: Manifest) -> Manifest:
        """The manifest with ``key_id`` set and ``signature`` over its canonical JSON."""
        unsigned = manifest.model_copy(update={"key_id": self.key_id, "signature": None})
        sig = self.private.sign(manifest_signing_bytes(unsigned))
        return unsigned.model_copy(update={"signature": base64.b64encode(sig).decode()})


class TrustStore:
    """Public keys a device accepts manifests from: raw 32-byte Ed25519 keys by key id."""

    def __init__(self, keys: dict[str, bytes] | None = None) -> None:
        self.keys = dict(keys or {})

    def add(self, public_b64: str) -> str:
        try:
            raw = base64.b64decode(public_b64, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise KeyFileError(f"not an Ed25519 public key: {exc}") from None
        if len(raw) != PUBLIC_KEY_BYTES:
            raise KeyFileError(
                f"not an Ed25519 public key: {len(raw)} bytes, not {PUBLIC_KEY_BYTES}"
            )
        kid = key_id_of(raw)
        self.keys[kid] = raw
        return kid

    @classmethod
    def load(cls, path: Path) -> TrustStore:
        try:
            doc = json.loads(path.read_text())
            entries = doc["keys"]
            store = cls()
            for entry in entries:
                kid = store.add(entry["public_key"])
                if entry.get("key_id", kid) != kid:
                    raise KeyFileError(f"{path}: key id {entry['key_id']} does not match its key")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"cannot read trust store {path}: {exc}") from None
        return store

    def save(self, path: Path) -> None:
        doc = {
            "keys": [
                {"key_id": kid, "public_key": base64.b64encode(k).decode()}
                for kid, k in sorted(self.keys.items())
            ]
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")

    def verify(self, manifest: Manifest) -> None:
        """Raise ``SignatureError`` unless a trusted key signed exactly this manifest."""
        if not manifest.signature or not manifest.key_id:
            raise SignatureError("manifest is not signed")
        key = self.keys.get(manifest.key_id)
        if key is None:
            raise SignatureError(f"manifest signed by unknown key {manifest.key_id}")
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            sig = base64.b64decode(manifest.signature, validate=True)
            Ed25519PublicKey.from_public_bytes(key).verify(sig, manifest_signing_bytes(manifest))
        except (InvalidSignature, ValueError, binascii.Error):
            raise SignatureError(
                f"signature of {manifest.ref} does not verify under key {manifest.key_id}"
            ) from None
