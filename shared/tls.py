"""TLS for Tandem's clients and servers: one place that turns certificate files into an
``ssl.SSLContext``.

Clients (paho through ``tls_set_context``, httpx through ``verify=``) get a context that
verifies the server against ``ca_file`` (None: the system's CAs) with its hostname checked,
TLS 1.2 or later, and that presents a client certificate when ``cert_file`` is given: a
device's X.509 identity (CN = its id) for brokers such as Mosquitto with
``use_identity_as_username`` or AWS IoT Core. Files are read when the context is made, so a
missing file, a file that is not PEM, an encrypted key or a key of another certificate is a
``SettingsError`` naming the file at start, not a handshake failure later.

A client context's sockets close themselves when their handshake fails: paho 2.2 leaves
such a socket to the garbage collector (``_ssl_wrap_socket``), so a device whose broker
refuses its certificate would hold one more descriptor, and warn, on every retry.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from shared.settings_files import SettingsError


class _ClosingSSLSocket(ssl.SSLSocket):
    """An ``SSLSocket`` that closes itself when its handshake fails (see the module's
    docstring); a non-blocking socket's want-read/want-write is no failure."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except BaseException:
            self.close()
            raise


@dataclass(frozen=True)
class TlsFiles:
    """A client's TLS setting: the CA to verify servers against, and its own certificate.

    ``key_file`` None with a ``cert_file``: the key is in the certificate's file."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise SettingsError(f"key_file {self.key_file} is set without a cert_file")

    @property
    def has_identity(self) -> bool:
        return self.cert_file is not None

    def context(self, *, identity: bool = True) -> ssl.SSLContext:
        """A client context; ``identity=False`` leaves the client certificate out (for
        servers that must not learn who the device is)."""
        return client_context(
            self.ca_file,
            self.cert_file if identity else None,
            self.key_file if identity else None,
        )


def client_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """Verify servers against ``ca_file`` (None: the system's trust store); present
    ``cert_file``/``key_file`` if given. ``SettingsError`` for files that cannot be used."""
    if key_file is not None and cert_file is None:
        raise SettingsError(f"key_file {key_file} is set without a cert_file")
    # PROTOCOL_TLS_CLIENT: certificate and hostname checked; no CA loaded yet, so that a
    # ca_file is the only one trusted (create_default_context would add the system's)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _ClosingSSLSocket
    if ca_file is not None:
        _load_ca(context, ca_file, "CA file")
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None:
        _load_identity(context, cert_file, key_file)
    return context


def server_context(
    cert_file: Path, key_file: Path | None = None, client_ca_file: Path | None = None
) -> ssl.SSLContext:
    """A server context: ``cert_file``/``key_file`` presented; with ``client_ca_file``,
    every client must present a certificate that CA issued."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_identity(context, cert_file, key_file)
    if client_ca_file is not None:
        _load_ca(context, client_ca_file, "client CA file")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _read_pem(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise SettingsError(f"TLS {what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read TLS {what} {path}: {exc}") from None


def _load_ca(context: ssl.SSLContext, path: Path, what: str) -> None:
    # read here, not by load_verify_locations, so that each failure can say what it is
    pem = _read_pem(path, what)
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise SettingsError(f"TLS {what} {path} holds no PEM certificate")
    try:
        context.load_verify_locations(cadata=pem)
    except ssl.SSLError as exc:
        raise SettingsError(f"TLS {what} {path} is not a valid certificate bundle: {exc}") from None


def _no_passphrase() -> bytes:
    # without a callback OpenSSL would prompt on the terminal for an encrypted key
    return b""


def _load_identity(context: ssl.SSLContext, cert_file: Path, key_file: Path | None) -> None:
    if "-----BEGIN CERTIFICATE-----" not in _read_pem(cert_file, "certificate"):
        raise SettingsError(f"TLS certificate {cert_file} holds no PEM certificate")
    key = key_file if key_file is not None else cert_file
    key_pem = _read_pem(key, "key")
    if "PRIVATE KEY-----" not in key_pem:
        where = "" if key_file is not None else " (the certificate's file: set key_file)"
        raise SettingsError(f"TLS key {key} holds no PEM private key{where}")
    if "ENCRYPTED" in key_pem:
        raise SettingsError(
            f"TLS key {key} is encrypted: give an unencrypted key, readable by this user only"
        )
    try:
        context.load_cert_chain(str(cert_file), str(key), password=_no_passphrase)
    except ssl.SSLError as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise SettingsError(
                f"TLS key {key} is not the key of the certificate {cert_file}"
            ) from None
        raise SettingsError(
            f"TLS certificate {cert_file} or key {key} is unusable: {exc}"
        ) from None
