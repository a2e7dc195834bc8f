"""The agent's HTTPS clients (the cloud fallback, artifact downloads) against a real
``tandem-cloud serve`` over HTTPS, its certificate from the test fleet CA
(``tests/certs.py``): they verify the server against the configured CA, fail clearly
without it or with another CA, and present the device's certificate to a cloud that
requires one (``[tls] client_ca_file``), to the configured origins only.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from subprocess import Popen

import httpx
import numpy as np
import pytest

from agent.device.download import Downloader, download_client
from agent.device.service import AgentService
from agent.errors import CloudUnavailableError, DownloadError
from agent.inference.cloud_client import CloudClient
from agent.inference.core import Agent
from agent.settings import AgentSettings, DownloadSettings
from cloud.releases.registry import Registry
from shared.manifest import CloudTarget, Manifest
from shared.tls import TlsFiles, client_context
from tests.certs import CertFiles, Pki
from tests.fleet import wait_for
from tests.helpers import CLOUD_MODEL, CLOUD_REPO, EDGE_INT8, ROOT, free_port

TARGET = CloudTarget(model=CLOUD_MODEL)
X = np.zeros((2, 64), dtype=np.float32)
EDGE = Manifest.load(EDGE_INT8)
ARTIFACT = f"/registry/{EDGE.model}/{EDGE.version}/{EDGE.edge.file}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _toml(values: dict[str, object]) -> str:
    return "".join(
        f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}\n" for k, v in values.items()
    )


def _up_or_gone(proc: Popen[bytes], url: str, context: ssl.SSLContext) -> bool:
    if proc.poll() is not None:
        return True
    try:
        return httpx.get(f"{url}/v2/health/ready", verify=context).status_code == 200
    except httpx.TransportError:
        return False


def _start(workdir: Path, settings: str, ready_context: ssl.SSLContext) -> tuple[Popen[bytes], str]:
    """One ``tandem-cloud serve`` on a free port, once it answers over HTTPS. A port taken
    between ``free_port`` and the bind (the suite's other servers) means another port."""
    for _ in range(3):
        port = free_port()
        config = workdir / "cloud.toml"
        config.write_text(f"port = {port}\n{settings}")
        with (workdir / "cloud.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cloud.cli", "--config", str(config), "serve"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"https://127.0.0.1:{port}"
        ready = partial(_up_or_gone, proc, url, ready_context)
        wait_for(ready, 60, "tandem-cloud serve over HTTPS")
        if proc.poll() is None:
            return proc, url
        why = (workdir / "cloud.log").read_text(errors="replace")
        if "address already in use" not in why:
            break
    raise AssertionError(f"tandem-cloud serve did not start: {why}")


@contextmanager
def https_cloud(workdir: Path, pki: Pki, *, client_ca: Path | None) -> Iterator[str]:
    """``tandem-cloud serve`` in a child process with ``[tls]`` settings and a registry
    holding the factory model's release; its https:// URL once it answers."""
    registry = workdir / "registry"
    Registry(registry).publish(EDGE, (EDGE_INT8 / EDGE.edge.file).read_bytes())
    tls: dict[str, object] = {"cert_file": pki.server.cert, "key_file": pki.server.key}
    if client_ca is not None:
        tls["client_ca_file"] = client_ca
    settings = (
        _toml(
            {
                "repo": CLOUD_REPO,
                "registry": registry,
                "state_dir": workdir / "state",
                "repo_poll_s": 0,
                "log_level": "WARNING",
            }
        )
        + "[tls]\n"
        + _toml(tls)
    )
    device = pki.device("dev-1")
    proc, url = _start(workdir, settings, client_context(pki.ca_file, device.cert, device.key))
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cloud_https(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[str]:
    with https_cloud(tmp_path_factory.mktemp("cloud-https"), pki, client_ca=None) as url:
        yield url


@pytest.fixture(scope="module")
def cloud_mtls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[str]:
    with https_cloud(tmp_path_factory.mktemp("cloud-mtls"), pki, client_ca=pki.ca_file) as url:
        yield url


def infer(url: str, tls: TlsFiles | None) -> np.ndarray:
    client = CloudClient(url, tls=tls, binary=True)
    try:
        return client.infer(X, TARGET, timeout_s=10).output
    finally:
        client.close()


def download(url: str, tls: TlsFiles | None, part: Path, origins: list[str]) -> Path:
    http = download_client(None, origins, tls)
    try:
        downloader = Downloader(http, DownloadSettings(attempts=1, timeout_s=10))
        return downloader.fetch(url + ARTIFACT, part, EDGE.edge.size, EDGE.edge.sha256)
    finally:
        http.close()


def identity(files: CertFiles, pki: Pki) -> TlsFiles:
    return TlsFiles(pki.ca_file, files.cert, files.key)


# ------------------------------------------------------------------ the server's certificate


def test_the_cloud_client_trusts_the_configured_ca(cloud_https: str, pki: Pki) -> None:
    assert infer(cloud_https, TlsFiles(ca_file=pki.ca_file)).shape == (2, 10)


@pytest.mark.parametrize("trust", ["system", "other-ca"])
def test_the_cloud_client_refuses_a_server_its_ca_did_not_sign(
    cloud_https: str, pki: Pki, trust: str
) -> None:
    tls = None if trust == "system" else TlsFiles(ca_file=pki.other.ca_file)
    with pytest.raises(CloudUnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
        infer(cloud_https, tls)


def test_downloads_trust_the_configured_ca(cloud_https: str, pki: Pki, tmp_path: Path) -> None:
    got = download(cloud_https, TlsFiles(ca_file=pki.ca_file), tmp_path / "a.part", [])
    assert got.read_bytes() == (EDGE_INT8 / EDGE.edge.file).read_bytes()


@pytest.mark.parametrize("trust", ["system", "other-ca"])
def test_downloads_refuse_a_server_their_ca_did_not_sign(
    cloud_https: str, pki: Pki, tmp_path: Path, trust: str
) -> None:
    tls = None if trust == "system" else TlsFiles(ca_file=pki.other.ca_file)
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
        download(cloud_https, tls, tmp_path / "a.part", [cloud_https])
    assert not (tmp_path / "a.part").exists() or (tmp_path / "a.part").stat().st_size == 0


# ------------------------------------------------------------- the device's certificate


def test_a_cloud_that_requires_client_certificates_takes_the_devices(
    cloud_mtls: str, pki: Pki
) -> None:
    assert infer(cloud_mtls, identity(pki.device("dev-1"), pki)).shape == (2, 10)


@pytest.mark.parametrize("kind", ["none", "expired", "unknown-ca"])
def test_a_cloud_that_requires_client_certificates_refuses_others(
    cloud_mtls: str, pki: Pki, kind: str
) -> None:
    tls = {
        "none": TlsFiles(ca_file=pki.ca_file),
        "expired": identity(pki.expired("dev-1"), pki),
        "unknown-ca": identity(pki.stranger("dev-1"), pki),
    }[kind]
    with pytest.raises(CloudUnavailableError, match="cloud unreachable"):
        infer(cloud_mtls, tls)


def test_downloads_present_the_device_certificate_to_the_configured_origins_only(
    cloud_mtls: str, pki: Pki, tmp_path: Path
) -> None:
    """The registry is a configured origin: it gets the certificate. The same server named
    only by an artifact URL (not configured) does not, and refuses the download."""
    tls = identity(pki.device("dev-1"), pki)
    got = download(cloud_mtls, tls, tmp_path / "a.part", [cloud_mtls])
    assert got.read_bytes() == (EDGE_INT8 / EDGE.edge.file).read_bytes()
    with pytest.raises(DownloadError):
        download(cloud_mtls, tls, tmp_path / "b.part", ["https://registry.example"])


# ------------------------------------------------------------ the agent's own settings


def _agent_settings(tmp_path: Path, url: str, **cloud: object) -> AgentSettings:
    return AgentSettings(
        model_dir=EDGE_INT8, state_dir=tmp_path / "state", cloud={"url": url, **cloud}
    )


def test_the_agent_escalates_over_https_with_the_ca_of_its_settings(
    cloud_https: str, pki: Pki, tmp_path: Path
) -> None:
    """``[cloud] ca_file`` reaches the running agent's cloud client: with it the cloud
    answers; without it the agent cannot verify the server and answers locally."""
    sample = X[0]
    with Agent(_agent_settings(tmp_path, cloud_https, ca_file=pki.ca_file)) as agent:
        assert agent.infer(sample, mode="cloud", deadline_ms=10_000).source == "cloud"
    with Agent(_agent_settings(tmp_path, cloud_https)) as agent:
        refused = agent.infer(sample, mode="cloud", deadline_ms=10_000)
        assert refused.source == "edge"


def test_the_services_downloads_use_the_ca_and_certificate_of_its_settings(
    cloud_mtls: str, pki: Pki, tmp_path: Path
) -> None:
    device = pki.device("dev-1")
    settings = _agent_settings(
        tmp_path, cloud_mtls, ca_file=pki.ca_file, cert_file=device.cert, key_file=device.key
    )
    service = AgentService(settings)
    try:
        downloader = Downloader(service.http, DownloadSettings(attempts=1, timeout_s=10))
        got = downloader.fetch(
            cloud_mtls + ARTIFACT, tmp_path / "a.part", EDGE.edge.size, EDGE.edge.sha256
        )
        assert got.read_bytes() == (EDGE_INT8 / EDGE.edge.file).read_bytes()
    finally:
        service.stop()
