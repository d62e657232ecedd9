"""The worker's TLS files: refused in one line at start when unusable, reloaded into the
client's context when rotated."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from devkit.certs import CertificateAuthority
from devkit.clock import FakeClock
from worker.config import ClientConfig, ConfigError, load_settings
from worker.transport import TLS_FILES_CHECK_S, CertificateRefresher, build_ssl_context


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def _config(ca_file: Path, cert: Path, key: Path) -> ClientConfig:
    return ClientConfig(
        orchestrator_url="https://orch:8443",
        worker_id="w1",
        capacity=1,
        ca_file=str(ca_file),
        client_cert=str(cert),
        client_key=str(key),
    )


def test_unusable_tls_files_are_one_line_naming_the_setting(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA file that is no PEM, or a key of another certificate, is refused at start."""
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    cert, _ = ca.client("w1").write(tmp_path, "w1")
    _, other_key = ca.client("w2").write(tmp_path, "w2")
    for name in ("WORKER_CA_FILE", "WORKER_CLIENT_CERT", "WORKER_CLIENT_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="WORKER_CA_FILE=.*not a usable CA bundle"):
        load_settings(["--ca-file", str(junk)])
    with pytest.raises(ConfigError, match="WORKER_CLIENT_CERT=.*WORKER_CLIENT_KEY=.*matching key"):
        load_settings(["--client-cert", str(cert), "--client-key", str(other_key)])


def _presented_serial(context: ssl.SSLContext, ca: CertificateAuthority, tmp_path: Path) -> str:
    """The serial of the client certificate ``context`` presents, read by a real server."""
    server_cert, server_key = ca.server().write(tmp_path / "srv", "server")
    ca_file = ca.write(tmp_path / "srv" / "ca.pem")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_cert, server_key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(ca_file)
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = context.wrap_bio(client_in, client_out, server_hostname="localhost")
    peer = server.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):  # a handshake in memory, both sides stepped by hand
        for side in (client, peer):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    cert = peer.getpeercert()
    assert cert, "no client certificate reached the server"
    return str(cert["serialNumber"])


def test_a_rotated_client_certificate_is_presented_without_a_restart(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """After the check interval, changed files are loaded into the same context."""
    ca_file = ca.write(tmp_path / "ca.pem")
    first = ca.client("w1")
    cert, key = first.write(tmp_path, "w1")
    config = _config(ca_file, cert, key)
    context = build_ssl_context(config)
    clock = FakeClock()
    refresher = CertificateRefresher(config, context, clock=clock)
    assert int(_presented_serial(context, ca, tmp_path), 16) == first.serial

    second = ca.client("w1")
    second.write(tmp_path, "w1")
    os.utime(cert, ns=(1, 1))  # a distinct stamp even within the file system's granularity
    assert refresher.refresh() is None  # not time to look yet
    clock.advance(TLS_FILES_CHECK_S)
    assert refresher.refresh() is True
    assert int(_presented_serial(context, ca, tmp_path), 16) == second.serial
    clock.advance(TLS_FILES_CHECK_S)
    assert refresher.refresh() is None  # nothing changed since


def test_a_half_written_rotation_keeps_the_loaded_certificate(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """A certificate whose key has not arrived yet fails to load: the old one stays, and
    the next change loads the pair."""
    ca_file = ca.write(tmp_path / "ca.pem")
    first = ca.client("w1")
    cert, key = first.write(tmp_path, "w1")
    config = _config(ca_file, cert, key)
    context = build_ssl_context(config)
    clock = FakeClock()
    refresher = CertificateRefresher(config, context, clock=clock)
    second = ca.client("w1")
    cert.write_bytes(second.cert_pem)
    clock.advance(TLS_FILES_CHECK_S)
    assert refresher.refresh() is False
    assert int(_presented_serial(context, ca, tmp_path), 16) == first.serial
    key.write_bytes(second.key_pem)
    os.utime(key, ns=(2, 2))
    clock.advance(TLS_FILES_CHECK_S)
    assert refresher.refresh() is True
    assert int(_presented_serial(context, ca, tmp_path), 16) == second.serial
