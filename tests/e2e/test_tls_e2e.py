"""Mutual TLS end to end: a real orchestrator process serving HTTPS with client
certificates required, real worker processes, certificates made by the test's own CA.

Waiting is a poll with a deadline; deadlines are generous (a loaded 2-core machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from devkit.certs import CertificateAuthority, Issued
from devkit.poll import eventually
from devkit.procs import OrchestratorProcess, Process, astart_orchestrator, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN_TOKEN = "tls-admin-token-0123456789"
WORKER_TOKEN = "tls-worker-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CLUSTER = {"Authorization": f"Bearer {WORKER_TOKEN}"}
WORKER_ID = "w-tls"
DEADLINE_S = 60.0


@dataclass
class Pki:
    """A CA and what it issued, as files under ``directory``; a second CA nobody trusts."""

    directory: Path
    ca: CertificateAuthority
    ca_file: Path
    server: Issued
    server_cert: Path
    server_key: Path
    rogue: CertificateAuthority

    def client_files(self, worker_id: str, *, ca: CertificateAuthority | None = None) -> Path:
        """A client certificate for ``worker_id`` (CN) as ``<dir>/<id>.crt``/``.key``."""
        issuer = ca or self.ca
        stem = f"{worker_id}-{'rogue' if issuer is self.rogue else 'ok'}"
        cert, _ = issuer.client(worker_id).write(self.directory, stem)
        return cert

    def client_context(self, cert: Path | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if cert is not None:
            context.load_cert_chain(cert, cert.with_suffix(".key"))
        return context

    def rotate_server(self) -> Issued:
        """A new server certificate from the same CA, swapped in as a cert-manager would:
        the key, then the certificate, each replaced atomically."""
        issued = self.ca.server()
        staged_cert, staged_key = issued.write(self.directory / "staged", "server")
        os.replace(staged_key, self.server_key)
        os.replace(staged_cert, self.server_cert)
        self.server = issued
        return issued


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    ca = CertificateAuthority("streamherd e2e CA")
    server = ca.server()
    cert, key = server.write(directory, "server")
    return Pki(
        directory=directory,
        ca=ca,
        ca_file=ca.write(directory / "ca.pem"),
        server=server,
        server_cert=cert,
        server_key=key,
        rogue=CertificateAuthority("rogue CA"),
    )


@contextlib.asynccontextmanager
async def tls_orchestrator(
    tmp_path: Path, pki: Pki, **settings: str
) -> AsyncIterator[tuple[OrchestratorProcess, httpx.AsyncClient]]:
    """An orchestrator serving mutual TLS; an admin client holding an operator certificate."""
    operator = pki.client_files("operator")
    env = {
        "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'orch.db'}",
        "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
        "ORCH_WORKER_TOKEN": WORKER_TOKEN,
        "ORCH_HEARTBEAT_INTERVAL_S": "0.5",
        "ORCH_LEASE_TTL_S": "15",
        "ORCH_TLS_CERT": str(pki.server_cert),
        "ORCH_TLS_KEY": str(pki.server_key),
        "ORCH_TLS_CLIENT_CA": str(pki.ca_file),
        "ORCH_TLS_RELOAD_INTERVAL_S": "0.2",
        **settings,
    }
    context = pki.client_context(operator)
    process = await astart_orchestrator(env, log_dir=tmp_path, tls=context)
    try:
        async with httpx.AsyncClient(
            base_url=process.url, headers=ADMIN, verify=context, timeout=20
        ) as admin:
            yield process, admin
    finally:
        await process.astop()


async def start_worker(url: str, tmp_path: Path, pki: Pki, worker_id: str = WORKER_ID) -> Process:
    cert = pki.client_files(worker_id)
    return await Process.start(
        "worker",
        worker_env(
            tmp_path / "state",
            "demo",
            orchestrator_url=url,
            WORKER_ID=worker_id,
            WORKER_MAX_STREAMS="2",
            WORKER_TOKEN=WORKER_TOKEN,
            WORKER_CA_FILE=str(pki.ca_file),
            WORKER_CLIENT_CERT=str(cert),
            WORKER_CLIENT_KEY=str(cert.with_suffix(".key")),
            WORKER_REQUEST_TIMEOUT_S="20",
            WORKER_RETRY_MAX_ATTEMPTS="3",
        ),
    )


async def served_serial(port: int, context: ssl.SSLContext) -> int:
    """The serial number of the certificate a new handshake is shown."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return x509.load_der_x509_certificate(der).serial_number


async def worker_row(admin: httpx.AsyncClient, worker_id: str = WORKER_ID) -> dict[str, object]:
    answer = await admin.get(f"/api/v1/workers/{worker_id}")
    return answer.json() if answer.status_code == 200 else {}


async def beats_of(worker: Process) -> tuple[float, float]:
    """(successful heartbeats, heartbeats that did not succeed) from the worker's /metrics."""
    port = await worker.health_port()
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    ok = failed = 0.0
    for line in text.splitlines():
        if line.startswith('streamherd_worker_requests_total{operation="heartbeat"'):
            value = float(line.rsplit(" ", 1)[1])
            if 'outcome="success"' in line:
                ok += value
            else:
                failed += value
    return ok, failed


async def test_a_worker_registers_and_beats_over_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    """The worker's WORKER_CA_FILE/CLIENT_CERT/CLIENT_KEY reach an mTLS orchestrator."""
    async with tls_orchestrator(tmp_path, pki) as (orch, admin):
        worker = await start_worker(orch.url, tmp_path, pki)
        try:

            async def beating() -> bool:
                row = await worker_row(admin)
                ok, _ = await beats_of(worker)
                return row.get("state") == "active" and ok >= 3

            await eventually(beating, timeout=DEADLINE_S, what="the worker beating over mTLS")
            assert (await beats_of(worker))[1] == 0
        finally:
            await worker.terminate()


async def test_the_handshake_refuses_a_foreign_ca_and_no_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    """A client certificate from another CA, or none, never gets an HTTP answer."""
    rogue = pki.client_files(WORKER_ID, ca=pki.rogue)
    async with tls_orchestrator(tmp_path, pki) as (orch, _):
        for cert in (rogue, None):
            async with httpx.AsyncClient(verify=pki.client_context(cert), timeout=20) as client:
                with pytest.raises(httpx.TransportError):
                    await client.get(f"{orch.url}/health")
        # And plain HTTP on the TLS port is no way around it.
        async with httpx.AsyncClient(timeout=20) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(f"http://127.0.0.1:{orch.port}/api/v1/workers", headers=ADMIN)


async def test_a_certificate_registers_only_the_worker_it_names(tmp_path: Path, pki: Pki) -> None:
    """A valid certificate for another worker id gets 403 FORBIDDEN at register."""
    other = pki.client_files("w-other")
    async with tls_orchestrator(tmp_path, pki) as (orch, _):
        async with httpx.AsyncClient(
            base_url=orch.url, verify=pki.client_context(other), headers=CLUSTER, timeout=20
        ) as client:
            body = {"worker_id": WORKER_ID, "capacity": 1}
            refused = await client.post("/api/v1/workers/register", json=body)
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["code"] == "FORBIDDEN"
            assert refused.json()["error"]["details"]["certificate_names"] == ["w-other"]
            body["worker_id"] = "w-other"
            accepted = await client.post("/api/v1/workers/register", json=body)
            assert accepted.status_code == 200, accepted.text


async def test_server_certificate_rotation_while_a_worker_beats(tmp_path: Path, pki: Pki) -> None:
    """New files are picked up without a restart: new handshakes see the new serial, and
    the beating worker loses no beat."""
    async with tls_orchestrator(tmp_path, pki) as (orch, admin):
        worker = await start_worker(orch.url, tmp_path, pki)
        probe = pki.client_context(pki.client_files("probe"))
        try:

            async def beating() -> bool:
                return (await beats_of(worker))[0] >= 3

            await eventually(beating, timeout=DEADLINE_S, what="the worker beating")
            assert await served_serial(orch.port, probe) == pki.server.serial
            new = pki.rotate_server()

            async def new_serial() -> bool:
                return await served_serial(orch.port, probe) == new.serial

            await eventually(new_serial, timeout=DEADLINE_S, what="the new certificate served")
            before, _ = await beats_of(worker)

            async def beats_after_rotation() -> bool:
                return (await beats_of(worker))[0] >= before + 3

            await eventually(beats_after_rotation, timeout=DEADLINE_S, what="beats after")
            assert (await beats_of(worker))[1] == 0
            assert (await worker_row(admin)).get("state") == "active"
            metrics = (await admin.get("/metrics")).text
            assert 'streamherd_tls_reloads_total{outcome="ok"}' in metrics
        finally:
            await worker.terminate()


async def test_sighup_reloads_and_a_bad_certificate_keeps_the_old(tmp_path: Path, pki: Pki) -> None:
    """With polling off, SIGHUP reloads; a broken file on SIGHUP leaves the served one."""
    async with tls_orchestrator(tmp_path, pki, ORCH_TLS_RELOAD_INTERVAL_S="0") as (orch, _):
        probe = pki.client_context(pki.client_files("probe"))
        first = pki.server.serial
        pki.server_cert.write_text("not a certificate\n")
        os.kill(orch.pid, signal.SIGHUP)
        await eventually(
            lambda: "orchestrator.tls_reload_failed" in orch.log_text(),
            timeout=DEADLINE_S,
            what="the failed reload logged",
        )
        assert await served_serial(orch.port, probe) == first
        new = pki.rotate_server()
        os.kill(orch.pid, signal.SIGHUP)

        async def new_serial() -> bool:
            return await served_serial(orch.port, probe) == new.serial

        await eventually(new_serial, timeout=DEADLINE_S, what="the new certificate on SIGHUP")
        assert orch.alive()


async def test_the_cli_talks_to_a_mutual_tls_orchestrator(tmp_path: Path, pki: Pki) -> None:
    """``streamherd`` with STREAMHERD_CA_FILE and a client certificate gets in; without
    the certificate it is one line and the unreachable exit status."""
    from typer.testing import CliRunner

    from streamherd_cli.app import app

    operator = pki.client_files("operator-cli")
    async with tls_orchestrator(tmp_path, pki) as (orch, _):
        env = {
            "STREAMHERD_URL": orch.url,
            "STREAMHERD_TOKEN": ADMIN_TOKEN,
            "STREAMHERD_CA_FILE": str(pki.ca_file),
        }
        with_cert = {
            **env,
            "STREAMHERD_CLIENT_CERT": str(operator),
            "STREAMHERD_CLIENT_KEY": str(operator.with_suffix(".key")),
        }
        ok = await asyncio.to_thread(
            CliRunner().invoke, app, ["workers", "ls", "--json"], env=with_cert
        )
        assert ok.exit_code == 0, ok.output
        refused = await asyncio.to_thread(
            CliRunner().invoke, app, ["workers", "ls", "--json"], env=env
        )
        assert refused.exit_code != 0 and "Traceback" not in refused.output
