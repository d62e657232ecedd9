"""A small real cluster for fault tests: orchestrator and worker processes, and their faults.

``Cluster`` starts ``python -m orchestrator`` replicas (a SQLite file or a PostgreSQL
database), real ``python -m worker`` processes running the probe processor, optionally
each in its own network namespace (``devkit.faults.netns``), and wires the invariant checker
to them. Every process is started in its own session and killed on ``close()``, whatever
happened. Times are shrunk (heartbeat 0.3 s, lease 1.5 s, reaper 0.2 s) so a fault and the
recovery from it take a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devkit.faults.invariants import InvariantChecker, WorkerInfo
from devkit.faults.netns import Namespace
from devkit.faults.probe import PROBE_DIR_ENV
from devkit.faults.proxy import TcpProxy
from devkit.poll import eventually
from devkit.procs import (
    ChildProcess,
    OrchestratorProcess,
    astart_orchestrator,
    child_env,
    free_port,
)

API = "/api/v1"
ADMIN_TOKEN = "faults-admin-token-0123"
WORKER_TOKEN = "faults-worker-token-0123"
PROBE_PROCESSOR = "module:devkit.faults.probe:run"
WORKER_START_TIMEOUT_S = 40.0
NS_HEALTH_PORT = 18081


@dataclass(frozen=True)
class Timing:
    heartbeat_s: float = 0.3
    lease_s: float = 1.5
    reaper_s: float = 0.2
    request_timeout_s: float = 0.5
    breaker_recovery_s: float = 0.3
    breaker_max_recovery_s: float = 1.0

    def orchestrator_env(self) -> dict[str, str]:
        return {
            "ORCH_HEARTBEAT_INTERVAL_S": str(self.heartbeat_s),
            "ORCH_LEASE_TTL_S": str(self.lease_s),
            "ORCH_REAPER_INTERVAL_S": str(self.reaper_s),
            "ORCH_LOG_LEVEL": "INFO",
        }

    def worker_env(self) -> dict[str, str]:
        return {
            "WORKER_RETRY_MAX_ATTEMPTS": "2",
            "WORKER_RETRY_BASE_DELAY_S": "0.05",
            "WORKER_RETRY_MAX_DELAY_S": "0.2",
            "WORKER_REQUEST_TIMEOUT_S": str(self.request_timeout_s),
            "WORKER_CIRCUIT_RECOVERY_TIMEOUT_S": str(self.breaker_recovery_s),
            "WORKER_CIRCUIT_MAX_RECOVERY_TIMEOUT_S": str(self.breaker_max_recovery_s),
            "WORKER_SHUTDOWN_TIMEOUT_S": "2",
            "WORKER_PROCESSOR_RESTART_BASE_S": "0.05",
            "WORKER_PROCESSOR_RESTART_MAX_S": "0.2",
        }


@dataclass
class OrchestratorNode:
    """One orchestrator replica that can be killed and started again on the same port."""

    name: str
    env: dict[str, str]
    host: str
    log_dir: Path
    port: int | None = None
    proc: OrchestratorProcess | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    async def start(self) -> None:
        self.proc = await astart_orchestrator(
            self.env, port=self.port, host=self.host, log_dir=self.log_dir
        )
        self.port = self.proc.port
        self.starts += 1

    async def kill(self) -> None:
        if self.proc is not None:
            await self.proc.akill()

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.astop()

    def log_tail(self, lines: int = 30) -> str:
        return self.proc.log_tail(lines) if self.proc is not None else ""


@dataclass
class WorkerNode:
    """One ``python -m worker`` process (in a namespace, or not) under the test's control."""

    worker_id: str
    capacity: int
    orchestrator_url: str
    state_dir: Path
    probe_dir: Path
    log_dir: Path
    timing: Timing
    namespace: Namespace | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    child: ChildProcess | None = None
    health_port: int = 0
    paused: bool = False
    partitioned: bool = False
    starts: int = 0

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.child.process if self.child is not None else None

    @property
    def health_host(self) -> str:
        return self.namespace.address if self.namespace is not None else "127.0.0.1"

    @property
    def health_url(self) -> str:
        return f"http://{self.health_host}:{self.health_port}/health"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive() and self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker_id=self.worker_id,
            capacity=self.capacity,
            pid=self.pid,
            health_url=self.health_url if self.alive() else None,
            reachable=self.alive() and not self.paused and not self.partitioned,
        )

    def env(self) -> dict[str, str]:
        return child_env(
            {
                **self.timing.worker_env(),
                "WORKER_ORCHESTRATOR_URL": self.orchestrator_url,
                "WORKER_ID": self.worker_id,
                "WORKER_MAX_STREAMS": str(self.capacity),
                "WORKER_TOKEN": WORKER_TOKEN,
                "WORKER_STATE_DIR": str(self.state_dir),
                "WORKER_HEALTH_HOST": self.health_host,
                "WORKER_HEALTH_PORT": str(self.health_port),
                "WORKER_PROCESSOR": PROBE_PROCESSOR,
                PROBE_DIR_ENV: str(self.probe_dir),
                **self.extra_env,
            },
            drop=("WORKER_", "ORCH_"),
        )

    def log_text(self) -> str:
        return self.child.log_text() if self.child is not None else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def start(self, *, wait: bool = True) -> None:
        """Spawn the worker; with ``wait``, until its /health answers."""
        assert not self.alive(), f"{self.worker_id} is already running"
        self.health_port = NS_HEALTH_PORT if self.namespace is not None else free_port()
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        prefix = self.namespace.exec_prefix() if self.namespace is not None else []
        self.child = ChildProcess(
            name=self.worker_id,
            argv=[*prefix, sys.executable, "-m", "worker"],
            env=self.env(),
            log_path=self.log_dir / f"worker-{self.worker_id}-{self.starts}.log",
        )
        self.child.spawn()
        self.paused = False
        if wait:
            await self.wait_healthy()

    async def wait_healthy(self, timeout: float = WORKER_START_TIMEOUT_S) -> None:
        async with httpx.AsyncClient(timeout=1.0) as client:

            async def answers() -> bool:
                if not self.alive():
                    raise AssertionError(
                        f"worker {self.worker_id} exited with {self.proc and self.proc.poll()}:"
                        f"\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    return (await client.get(self.health_url)).status_code == 200
                return False

            await eventually(answers, timeout=timeout, what=f"{self.worker_id} /health")

    def _signal(self, sig: signal.Signals) -> None:
        if self.alive() and self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    async def kill(self) -> None:
        """``kill -9``: no leave, no last write of the state file."""
        if self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False
        self._signal(signal.SIGKILL)
        await self._reap(10)

    async def terminate(self, timeout: float = 15.0) -> int | None:
        """Graceful stop (SIGTERM: stop streams, leave); SIGKILL after ``timeout``."""
        self.resume()
        self._signal(signal.SIGTERM)
        return await self._reap(timeout)

    def pause(self) -> None:
        """SIGSTOP: the process is frozen, its sockets stay open (a GC pause, a VM stall)."""
        self._signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self._signal(signal.SIGCONT)
            self.paused = False

    async def _reap(self, timeout: float) -> int | None:
        """Its exit status once it exits; SIGKILL to its group after ``timeout``."""
        if self.child is None or self.child.process is None:
            return None
        process = self.child.process
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            pass
        return await self.child.akill()


@dataclass
class Cluster:
    """Orchestrator replicas, workers, an admin client and the invariant checker."""

    root: Path
    timing: Timing = field(default_factory=Timing)
    database_url: str | None = None
    replicas: int = 1
    host: str = "127.0.0.1"
    # Put a fail-over TCP proxy in front of the replicas and point the workers at it.
    balancer: bool = False
    orchestrators: list[OrchestratorNode] = field(default_factory=list)
    workers: dict[str, WorkerNode] = field(default_factory=dict)
    proxies: list[TcpProxy] = field(default_factory=list)
    checker: InvariantChecker | None = None
    front: TcpProxy | None = None
    http: httpx.AsyncClient | None = None

    @property
    def probe_dir(self) -> Path:
        return self.root / "probe"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.root / 'orchestrator.db'}"

    async def start(self) -> Cluster:
        self.probe_dir.mkdir(parents=True, exist_ok=True)
        for index in range(self.replicas):
            env = {
                "ORCH_DATABASE_URL": self.db_url,
                "ORCH_ADMIN_TOKEN": ADMIN_TOKEN,
                "ORCH_WORKER_TOKEN": WORKER_TOKEN,
                "ORCH_REPLICA_ID": f"replica-{index}",
                **self.timing.orchestrator_env(),
            }
            node = OrchestratorNode(f"orch-{index}", env, self.host, self.root / "logs")
            self.orchestrators.append(node)
            await node.start()
        if self.balancer:
            self.front = await TcpProxy(
                [(self.host, o.port) for o in self.orchestrators if o.port is not None],
                listen_host=self.host,
            ).start()
            self.proxies.append(self.front)
        self.http = httpx.AsyncClient(
            timeout=5.0, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        self.checker = InvariantChecker(
            replicas=lambda: [o.url for o in self.orchestrators if o.alive()],
            workers=lambda: [w.info() for w in self.workers.values()],
            admin_token=ADMIN_TOKEN,
            probe_dir=self.probe_dir,
        )
        await self.checker.__aenter__()
        return self

    async def close(self) -> None:
        for worker in self.workers.values():
            with contextlib.suppress(Exception):
                await worker.kill()
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                await proxy.close()
        for node in self.orchestrators:
            with contextlib.suppress(Exception):
                await node.kill()
        if self.checker is not None:
            await self.checker.__aexit__()
        if self.http is not None:
            await self.http.aclose()

    async def __aenter__(self) -> Cluster:
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # --- the pieces ------------------------------------------------------------------

    @property
    def check(self) -> InvariantChecker:
        assert self.checker is not None
        return self.checker

    @property
    def orchestrator_url(self) -> str:
        """Where workers connect: the balancer if there is one, else the first replica."""
        if self.front is not None:
            return self.front.url
        return self.orchestrators[0].url

    def live_url(self) -> str:
        for node in self.orchestrators:
            if node.alive():
                return node.url
        raise AssertionError("no orchestrator replica is running")

    async def add_worker(
        self,
        worker_id: str,
        capacity: int,
        *,
        namespace: Namespace | None = None,
        orchestrator_url: str | None = None,
        start: bool = True,
        **extra_env: str,
    ) -> WorkerNode:
        node = WorkerNode(
            worker_id=worker_id,
            capacity=capacity,
            orchestrator_url=orchestrator_url or self.orchestrator_url,
            state_dir=self.root / "state" / worker_id,
            probe_dir=self.probe_dir,
            log_dir=self.root / "logs",
            timing=self.timing,
            namespace=namespace,
            extra_env=dict(extra_env),
        )
        self.workers[worker_id] = node
        if start:
            await node.start()
        return node

    async def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        assert self.http is not None
        return await self.http.request(method, f"{self.live_url()}{API}{path}", **kwargs)

    async def create_streams(self, count: int) -> list[int]:
        r = await self.admin(
            "POST",
            "/streams",
            json={"streams": [{"name": f"s{i}", "url": f"http://radio/{i}"} for i in range(count)]},
        )
        assert r.status_code == 201, r.text
        return [s["id"] for s in r.json()["created"]]

    async def events(self, *types: str) -> list[dict[str, Any]]:
        """Every event so far (of the given types), paged through GET /events."""
        found: list[dict[str, Any]] = []
        after = 0
        for _ in range(1000):
            r = await self.admin("GET", "/events", params={"after": after, "limit": 1000})
            assert r.status_code == 200, r.text
            page = r.json()
            found.extend(e for e in page["items"] if not types or e["type"] in types)
            if not page["items"]:
                return found
            after = page["next_after"]
        raise AssertionError("GET /events paging did not end")

    async def owners(self) -> dict[int, tuple[str | None, int]]:
        snap = await self.check.read(self.live_url())
        return {sid: (s["owner"], s["token"]) for sid, s in snap.streams.items()}

    def live_workers(self) -> list[str]:
        return [w.worker_id for w in self.workers.values() if w.alive() and not w.paused]

    async def settle(self, *, deadline_s: float = 40.0, live: Sequence[str] | None = None) -> Any:
        return await self.check.settle(
            list(live) if live is not None else self.live_workers(), deadline_s=deadline_s
        )

    def diagnostics(self) -> str:
        parts = []
        for node in self.orchestrators:
            parts.append(f"--- {node.name} ---\n{node.log_tail(20)}")
        for worker in self.workers.values():
            parts.append(f"--- {worker.worker_id} ---\n{worker.log_tail(20)}")
        return "\n".join(parts)
