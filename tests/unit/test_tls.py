"""``shared.tls``: certificate files that cannot be used are one-line ``SettingsError``s
naming the file, at start; and the settings of agent, cloud and MQTT that lead there."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.settings import AgentSettings
from cloud.cli import main as cloud_main
from cloud.settings import CloudSettings
from shared.mqtt import MqttClient, MqttSettings
from shared.settings_files import SettingsError
from shared.tls import TlsFiles, client_context, server_context
from tests.certs import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_a_device_pair_and_the_fleet_ca_make_a_client_context(pki: Pki) -> None:
    files = pki.device("dev-1")
    context = client_context(pki.ca_file, files.cert, files.key)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    # the fleet CA alone: not the system's CAs besides
    assert [c["subject"] for c in context.get_ca_certs()] == [
        ((("commonName", "Tandem test fleet CA"),),)
    ]
    assert client_context().get_ca_certs() == ssl.create_default_context().get_ca_certs()


def test_a_key_in_the_certificates_file_is_found(pki: Pki, tmp_path: Path) -> None:
    files = pki.device("dev-1")
    both = tmp_path / "both.pem"
    both.write_bytes(files.cert.read_bytes() + files.key.read_bytes())
    client_context(pki.ca_file, both)


def _encrypted(key: Path, tmp_path: Path) -> Path:
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    out = tmp_path / "encrypted.key"
    out.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    return out


def test_unusable_files_are_named(pki: Pki, tmp_path: Path) -> None:
    one, other = pki.device("dev-1"), pki.device("dev-2")
    cases: list[tuple[tuple[Path | None, Path | None, Path | None], str]] = [
        ((tmp_path / "missing.pem", None, None), "CA file .*missing.pem does not exist"),
        ((one.key, None, None), "holds no PEM certificate"),
        ((tmp_path, None, None), "cannot read TLS CA file"),
        ((pki.ca_file, one.cert, other.key), "is not the key of the certificate"),
        ((pki.ca_file, one.key, one.key), "certificate .* holds no PEM certificate"),
        ((pki.ca_file, one.cert, None), "holds no PEM private key .*set key_file"),
        ((pki.ca_file, one.cert, tmp_path / "gone.key"), "key .*gone.key does not exist"),
        ((pki.ca_file, None, one.key), "key_file .* without a cert_file"),
        ((pki.ca_file, one.cert, _encrypted(one.key, tmp_path)), "is encrypted"),
    ]
    for args, message in cases:
        with pytest.raises(SettingsError, match=message):
            client_context(*args)


def test_tls_files_leave_the_identity_out_when_asked(pki: Pki) -> None:
    files = pki.device("dev-1")
    tls = TlsFiles(pki.ca_file, files.cert, files.key)
    assert tls.has_identity
    tls.context(identity=False)  # would load the pair (and fail) if it did not
    with pytest.raises(SettingsError, match="without a cert_file"):
        TlsFiles(pki.ca_file, None, files.key)


def test_a_server_context_requires_client_certificates_from_its_ca(pki: Pki) -> None:
    assert server_context(pki.server.cert, pki.server.key).verify_mode == ssl.CERT_NONE
    required = server_context(pki.server.cert, pki.server.key, pki.ca_file)
    assert required.verify_mode == ssl.CERT_REQUIRED


def test_another_devices_certificate_without_its_key_cannot_be_presented(pki: Pki) -> None:
    """A certificate is public (a TLS 1.2 handshake shows it to anyone on the path);
    presenting it takes its key. dev-2 with dev-1's certificate and its own key does not
    get as far as the broker: its client refuses to start, naming the mismatch."""
    settings = MqttSettings(
        url="mqtts://127.0.0.1:8883",
        ca_file=pki.ca_file,
        cert_file=pki.device("dev-1").cert,
        key_file=pki.device("dev-2").key,
    )
    with pytest.raises(SettingsError, match="is not the key of the certificate"):
        MqttClient(settings, "dev-2")


def test_a_client_certificate_needs_an_mqtts_url(pki: Pki) -> None:
    files = pki.device("dev-2")
    settings = MqttSettings(url="mqtt://127.0.0.1:1883", cert_file=files.cert, key_file=files.key)
    with pytest.raises(SettingsError, match="needs an mqtts:// URL"):
        MqttClient(settings, "dev-2")


def test_the_agents_cloud_section_gives_both_https_clients_their_tls(pki: Pki) -> None:
    files = pki.device("dev-1")
    assert AgentSettings.load(None).cloud.tls is None  # nothing set: httpx's own defaults
    settings = AgentSettings.load(
        None, cloud={"url": "https://cloud", "ca_file": pki.ca_file, "cert_file": files.cert}
    )
    assert settings.cloud.tls == TlsFiles(pki.ca_file, files.cert, None)
    with pytest.raises(SettingsError, match="key_file is set without a cert_file"):
        AgentSettings.load(None, cloud={"key_file": files.key})


def test_the_clouds_tls_section_needs_a_certificate(pki: Pki) -> None:
    with pytest.raises(SettingsError, match="need a cert_file"):
        CloudSettings.load(None, tls={"client_ca_file": pki.ca_file})


def test_serve_refuses_an_unusable_certificate_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "cloud.toml"
    config.write_text(f'[tls]\ncert_file = "{tmp_path / "missing.pem"}"\n')
    with pytest.raises(SystemExit) as exit_info:
        cloud_main(["--config", str(config), "serve", "--port", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing.pem does not exist" in err and len(err.strip().splitlines()) == 1
