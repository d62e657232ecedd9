"""TLS settings, the reload of the served certificate, and the worker-id binding."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from devkit.certs import CertificateAuthority
from devkit.procs import run_orchestrator_cli
from orchestrator.__main__ import EXIT_BAD_CONFIG
from orchestrator.config import Settings
from orchestrator.errors import Forbidden
from orchestrator.metrics import OrchestratorMetrics
from orchestrator.tls import (
    PEER_STATE_KEY,
    PeerIdentity,
    ServerTLS,
    TLSFiles,
    TLSFilesError,
    build_server_context,
    cert_fingerprint,
    check_worker_binding,
)


class Files:
    """A CA, a server certificate and its key on disk."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = CertificateAuthority()
        self.ca_file = self.ca.write(directory / "ca.pem")
        self.cert, self.key = self.ca.server().write(directory, "server")

    def tls_files(self, *, client_ca: bool = True) -> TLSFiles:
        return TLSFiles(str(self.cert), str(self.key), str(self.ca_file) if client_ca else None)

    def env(self) -> dict[str, str]:
        return {
            "ORCH_TLS_CERT": str(self.cert),
            "ORCH_TLS_KEY": str(self.key),
            "ORCH_TLS_CLIENT_CA": str(self.ca_file),
        }


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


# --- settings -------------------------------------------------------------------------


def _refusal(**settings: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        Settings(**settings)
    return str(caught.value)


def test_a_certificate_needs_its_key_and_the_key_its_certificate(files: Files) -> None:
    """Half a pair is refused, naming what is missing."""
    assert "ORCH_TLS_CERT needs ORCH_TLS_KEY" in _refusal(tls_cert=str(files.cert))
    assert "ORCH_TLS_KEY needs ORCH_TLS_CERT" in _refusal(tls_key=str(files.key))


def test_a_client_ca_or_binding_without_tls_is_refused(files: Files) -> None:
    """mTLS needs TLS; binding worker ids needs client certificates."""
    assert "ORCH_TLS_CLIENT_CA needs ORCH_TLS_CERT" in _refusal(tls_client_ca=str(files.ca_file))
    refused = _refusal(tls_cert=str(files.cert), tls_key=str(files.key), tls_bind_worker_id=True)
    assert "ORCH_TLS_BIND_WORKER_ID needs ORCH_TLS_CLIENT_CA" in refused


def test_missing_files_are_refused(tmp_path: Path) -> None:
    """A path that is no file is named."""
    assert "no such file" in _refusal(tls_cert=str(tmp_path / "nope.crt"), tls_key=str(tmp_path))


def test_binding_is_on_by_default_with_a_client_ca_only(files: Files) -> None:
    """ORCH_TLS_BIND_WORKER_ID unset: on with client certificates, off without."""
    plain = Settings(tls_cert=str(files.cert), tls_key=str(files.key))
    mutual = Settings(**{k.removeprefix("ORCH_").lower(): v for k, v in files.env().items()})
    opted_out = mutual.model_copy(update={"tls_bind_worker_id": False})
    assert (plain.tls_binds_worker_id, mutual.tls_binds_worker_id) == (False, True)
    assert not opted_out.tls_binds_worker_id


def test_tls_does_not_lift_the_token_rule_beyond_loopback(files: Files) -> None:
    """TLS encrypts, it does not authenticate: no tokens beyond loopback is still refused."""
    refused = _refusal(host="0.0.0.0", tls_cert=str(files.cert), tls_key=str(files.key))
    assert "ORCH_ADMIN_TOKEN" in refused


@pytest.mark.parametrize(
    ("broken", "named"),
    [
        pytest.param("cert", "ORCH_TLS_CERT", id="cert-not-pem"),
        pytest.param("key", "ORCH_TLS_KEY", id="key-not-pem"),
        pytest.param("mismatch", "ORCH_TLS_KEY", id="key-of-another-certificate"),
        pytest.param("ca", "ORCH_TLS_CLIENT_CA", id="ca-not-pem"),
    ],
)
def test_unusable_files_stop_the_start_with_one_line(
    files: Files, tmp_path: Path, broken: str, named: str
) -> None:
    """Files that exist but cannot make a context: exit 2, one line naming the setting."""
    env = {**files.env(), "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'o.db'}"}
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    if broken == "cert":
        env["ORCH_TLS_CERT"] = str(junk)
    elif broken == "key":
        env["ORCH_TLS_KEY"] = str(junk)
    elif broken == "ca":
        env["ORCH_TLS_CLIENT_CA"] = str(junk)
    else:
        _, other_key = files.ca.server().write(tmp_path / "other", "server")
        env["ORCH_TLS_KEY"] = str(other_key)
    done = run_orchestrator_cli(env=env)
    assert done.returncode == EXIT_BAD_CONFIG, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# --- the context and its reload -------------------------------------------------------


def test_the_context_requires_client_certificates_only_with_a_client_ca(files: Files) -> None:
    """CERT_REQUIRED with a client CA, none asked for without; TLS 1.2 at least."""
    mutual = build_server_context(files.tls_files())
    plain = build_server_context(files.tls_files(client_ca=False))
    assert mutual.verify_mode is ssl.CERT_REQUIRED
    assert plain.verify_mode is ssl.CERT_NONE
    assert mutual.minimum_version is ssl.TLSVersion.TLSv1_2


def test_build_names_the_setting_at_fault(files: Files, tmp_path: Path) -> None:
    """A TLSFilesError says which setting to fix."""
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    with pytest.raises(TLSFilesError, match="ORCH_TLS_CLIENT_CA"):
        build_server_context(TLSFiles(str(files.cert), str(files.key), str(junk)))


def _metric(metrics: OrchestratorMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("streamherd_tls_reloads_total", {"outcome": outcome})
    return value or 0.0


async def test_unchanged_files_do_not_reload(files: Files) -> None:
    """The poll finds nothing new: the context stays the same object."""
    tls = ServerTLS(files.tls_files())
    before = tls.current
    assert await tls.check() is None
    assert tls.current is before and tls.reloads == 0


async def test_a_new_certificate_is_swapped_in(files: Files) -> None:
    """New files: a new context, the new fingerprint, counted ok; uvicorn's context stays."""
    metrics = OrchestratorMetrics()
    tls = ServerTLS(files.tls_files(), metrics=metrics)
    served, old = tls.context, tls.fingerprint
    files.ca.server().write(files.directory, "server")
    assert await tls.check() is True
    assert tls.current is not served and tls.context is served
    assert tls.fingerprint != old
    assert tls.fingerprint == cert_fingerprint(files.cert.read_bytes())
    assert _metric(metrics, "ok") == 1


@pytest.mark.parametrize("damage", ["bad-pem", "mismatched-key", "missing-file"])
async def test_a_failed_reload_keeps_the_old_certificate(
    files: Files, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever is wrong with the new files, the old context keeps serving; one error line
    per distinct bad state, counted as failed; repaired files then load."""
    metrics = OrchestratorMetrics()
    tls = ServerTLS(files.tls_files(), metrics=metrics)
    current, fingerprint = tls.current, tls.fingerprint
    good_cert, good_key = files.cert.read_bytes(), files.key.read_bytes()
    if damage == "bad-pem":
        files.cert.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    elif damage == "mismatched-key":
        other = files.ca.server()
        files.cert.write_bytes(other.cert_pem)
    else:
        files.key.unlink()
    with caplog.at_level(logging.ERROR, logger="orchestrator.tls"):
        assert await tls.check() is False
        assert await tls.check() is None  # the same bad state: not said twice
    assert tls.current is current and tls.fingerprint == fingerprint
    failures = [r for r in caplog.records if "tls_reload_failed" in r.getMessage()]
    assert len(failures) == 1
    assert _metric(metrics, "failed") == 1
    files.cert.write_bytes(good_cert)
    files.key.write_bytes(good_key)
    assert await tls.check() is True
    assert tls.fingerprint == fingerprint


async def test_a_requested_reload_runs_even_when_nothing_changed(files: Files) -> None:
    """SIGHUP's path: ``request_reload`` wakes the watcher, which reloads regardless."""
    tls = ServerTLS(files.tls_files())
    watcher = asyncio.create_task(tls.watch(0))
    try:
        tls.request_reload()
        async with asyncio.timeout(30):
            while tls.reloads == 0:
                await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
    assert tls.failures == 0


# --- the peer and the binding ---------------------------------------------------------

PEERCERT = {
    "subject": ((("organizationName", "acme"),), (("commonName", "w1"),)),
    "subjectAltName": (("DNS", "w1.workers.example"), ("IP Address", "10.0.0.1")),
    "serialNumber": "0A1B",
}


def test_the_peer_is_named_by_its_cn_and_dns_names() -> None:
    """CN and DNS SAN entries name the peer; IP entries do not."""
    peer = PeerIdentity.from_peercert(PEERCERT)
    assert peer.names() == ("w1", "w1.workers.example")
    assert peer.names_worker("w1") and peer.names_worker("w1.workers.example")
    assert not peer.names_worker("W1") and not peer.names_worker("10.0.0.1")
    assert peer.describe() == "cert CN=w1 DNS=w1.workers.example serial=0A1B"


def _request(*, bind: bool, peer: PeerIdentity | None) -> Request:
    settings = SimpleNamespace(tls_binds_worker_id=bind)
    app = SimpleNamespace(state=SimpleNamespace(settings=settings))
    state = {PEER_STATE_KEY: peer} if peer is not None else {}
    return Request({"type": "http", "app": app, "state": state, "headers": []})


def test_binding_lets_the_named_worker_register() -> None:
    """The certificate names the worker: no objection."""
    peer = PeerIdentity.from_peercert(PEERCERT)
    check_worker_binding(_request(bind=True, peer=peer), "w1", is_admin=False)
    check_worker_binding(_request(bind=True, peer=peer), "w1.workers.example", is_admin=False)


def test_binding_refuses_another_worker_or_no_certificate() -> None:
    """Another id, or no certificate at all, is 403 FORBIDDEN."""
    peer = PeerIdentity.from_peercert(PEERCERT)
    with pytest.raises(Forbidden, match="does not name"):
        check_worker_binding(_request(bind=True, peer=peer), "w2", is_admin=False)
    with pytest.raises(Forbidden, match="required"):
        check_worker_binding(_request(bind=True, peer=None), "w1", is_admin=False)


def test_binding_off_or_the_admin_token_is_not_held_to_the_certificate() -> None:
    """No binding configured, or the admin acting for a worker: nothing checked."""
    peer = PeerIdentity.from_peercert(PEERCERT)
    check_worker_binding(_request(bind=False, peer=peer), "w2", is_admin=False)
    check_worker_binding(_request(bind=True, peer=peer), "w2", is_admin=True)
