"""A test PKI made with ``cryptography``: a fleet CA, a server certificate for
127.0.0.1/localhost, device certificates whose CN is the device id, and the bad ones an
attacker or a neglected device brings (expired, issued by another CA).

Keys are EC P-256 (fast to make: a whole PKI takes milliseconds). Files are PEM, written
under one directory; ``Pki.device`` writes a device's pair once and returns its paths.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class Authority:
    """One CA: its key, its self-signed certificate (``ca.pem`` in ``dir``), and what it
    signs."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 365 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.ca_file = self.dir / "ca.pem"
        self.ca_file.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        stem: str,
        cn: str,
        *,
        server: bool = False,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> CertFiles:
        """A leaf certificate and its key, ``<stem>.pem`` and ``<stem>.key``: a server's
        (SAN 127.0.0.1 and localhost, serverAuth) or a client's (clientAuth)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _DAY)
            .not_valid_after(not_after or now + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        files = CertFiles(self.dir / f"{stem}.pem", self.dir / f"{stem}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, files.key)
        return files


class Pki:
    """The fleet's CA with its server certificate, and a stranger CA beside it."""

    def __init__(self, directory: Path) -> None:
        self.ca = Authority(directory / "fleet", "Tandem test fleet CA")
        self.other = Authority(directory / "other", "Some other CA")
        self.server = self.ca.issue("server", "localhost", server=True)
        self._devices: dict[str, CertFiles] = {}

    @property
    def ca_file(self) -> Path:
        return self.ca.ca_file

    def device(self, device: str) -> CertFiles:
        """``device``'s certificate from the fleet CA (CN = the device id), made once."""
        if device not in self._devices:
            self._devices[device] = self.ca.issue(f"device-{device}", device)
        return self._devices[device]

    def expired(self, device: str) -> CertFiles:
        """A certificate the fleet CA issued to ``device`` that ran out yesterday."""
        now = _now()
        return self.ca.issue(
            f"expired-{device}", device, not_before=now - 30 * _DAY, not_after=now - _DAY
        )

    def stranger(self, device: str) -> CertFiles:
        """A certificate for ``device``'s id from a CA the fleet does not trust."""
        return self.other.issue(f"stranger-{device}", device)
