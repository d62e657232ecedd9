"""``make run``: a whole cluster on this machine: an orchestrator on a SQLite file, a dozen
demo streams, three demo workers, their logs interleaved; Ctrl-C stops it all cleanly.

The dashboard's URL comes first (with the admin token to type in); then the processes'
own lines, which are few once the fleet settles (the demo processors' progress is DEBUG),
and every ``SUMMARY_EVERY_S`` one summary line of the fleet.

Everything lives under ``./.demo/`` (the database, worker state, nothing else), so a re-run
picks up where the last one stopped: streams that exist are not created again. Knobs, all
optional: ``DEMO_DIR`` (./.demo), ``DEMO_PORT`` (8000), ``DEMO_WORKER_BASE_PORT`` (8081:
workers use it and the next two), ``DEMO_WORKERS`` (3), ``DEMO_ADMIN_TOKEN``,
``DEMO_WORKER_TOKEN``.

On SIGINT or SIGTERM the workers get SIGTERM first (so they release their streams and
leave), then the orchestrator; a second Ctrl-C kills whatever is still running. The exit
status is 0 after a requested stop, 1 when a process died on its own or never started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 8000
DEFAULT_WORKER_BASE_PORT = 8081
DEFAULT_WORKERS = 3
DEFAULT_ADMIN_TOKEN = "demo-admin-token"
DEFAULT_WORKER_TOKEN = "demo-worker-token"
READY_TIMEOUT_S = 60.0
WORKER_STOP_TIMEOUT_S = 30.0
ORCHESTRATOR_STOP_TIMEOUT_S = 15.0
LINE_LIMIT = 1 << 20
# How often the fleet is summed up in one line while the demo runs.
SUMMARY_EVERY_S = 30.0

DEMO_STREAMS: tuple[tuple[str, str], ...] = (
    ("Radio Aurora", "https://streams.example.invalid/aurora.mp3"),
    ("Jazz Lantern FM", "https://streams.example.invalid/jazz-lantern.aac"),
    ("Harbour Talk 94.2", "https://streams.example.invalid/harbour-talk.mp3"),
    ("Night Owl Classics", "https://streams.example.invalid/night-owl.ogg"),
    ("Metro Beat", "https://streams.example.invalid/metro-beat.mp3"),
    ("Folk & Field", "https://streams.example.invalid/folk-field.aac"),
    ("Coastline Country", "https://streams.example.invalid/coastline.mp3"),
    ("Radio Nova Sur", "https://streams.example.invalid/nova-sur.mp3"),
    ("Deep Current Ambient", "https://streams.example.invalid/deep-current.ogg"),
    ("City Hall Live", "https://streams.example.invalid/city-hall.mp3"),
    ("Northern Lights Pop", "https://streams.example.invalid/northern-lights.aac"),
    ("Kids' Corner Radio", "https://streams.example.invalid/kids-corner.mp3"),
)


@dataclass(frozen=True)
class DemoConfig:
    directory: Path
    port: int
    worker_base_port: int
    workers: int
    admin_token: str
    worker_token: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DemoConfig:
        return cls(
            directory=Path(env.get("DEMO_DIR") or ".demo").resolve(),
            port=int(env.get("DEMO_PORT") or DEFAULT_PORT),
            worker_base_port=int(env.get("DEMO_WORKER_BASE_PORT") or DEFAULT_WORKER_BASE_PORT),
            workers=int(env.get("DEMO_WORKERS") or DEFAULT_WORKERS),
            admin_token=env.get("DEMO_ADMIN_TOKEN") or DEFAULT_ADMIN_TOKEN,
            worker_token=env.get("DEMO_WORKER_TOKEN") or DEFAULT_WORKER_TOKEN,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def worker_ids(self) -> list[str]:
        return [f"demo-worker-{n}" for n in range(1, self.workers + 1)]


def say(text: str) -> None:
    for line in text.splitlines():
        print(f"demo | {line}", flush=True)


def describe_exit(code: int) -> str:
    return str(code) if code >= 0 else signal.Signals(-code).name


class Child:
    """One child process whose output is copied to ours, each line prefixed."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, width: int) -> None:
        self.name = name
        self.process = process
        self.prefix = f"{name:<{width}} | "
        self.pump = asyncio.create_task(self._copy_output(), name=f"pump-{name}")

    @classmethod
    async def start(
        cls, name: str, argv: Sequence[str], env: Mapping[str, str], width: int
    ) -> Child:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO,
            env=dict(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=LINE_LIMIT,
            # Its own session: the terminal's Ctrl-C reaches us only, and we choose the order.
            start_new_session=True,
        )
        return cls(name, process, width)

    async def _copy_output(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than LINE_LIMIT: pass on a piece of it
                line = await stream.read(LINE_LIMIT)
            if not line:
                return
            print(self.prefix + line.decode(errors="replace").rstrip(), flush=True)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    async def stop(self, timeout: float, force: asyncio.Event) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` or as soon as ``force`` is set."""
        self.signal(signal.SIGTERM)
        waiter = asyncio.create_task(self.process.wait())
        forced = asyncio.create_task(force.wait())
        await asyncio.wait({waiter, forced}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not waiter.done():
            say(f"{self.name} did not stop in time: killing it")
            self.signal(signal.SIGKILL)
        code = await waiter
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.pump
        return code


def child_env(overrides: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "WORKER_"))}
    env.update(overrides)
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def wait_ready(config: DemoConfig, orchestrator: Child, stop: asyncio.Event) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + READY_TIMEOUT_S
    async with httpx.AsyncClient(timeout=2.0) as http:
        while not stop.is_set() and orchestrator.running and loop.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{config.url}/ready")).status_code == 200:
                    return True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await stop.wait()
    return False


async def ensure_streams(config: DemoConfig) -> int:
    """Create the demo streams that do not exist yet (by name); returns how many were new."""
    async with httpx.AsyncClient(base_url=config.url, timeout=10.0) as http:
        names: set[str] = set()
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = await http.get("/api/v1/streams", params=params, headers=config.admin_headers)
            page.raise_for_status()
            body = page.json()
            names.update(s["name"] for s in body["items"])
            cursor = body.get("next_cursor")
            if not cursor:
                break
        missing = [
            {"name": name, "url": url, "metadata": {"demo": True}}
            for name, url in DEMO_STREAMS
            if name not in names
        ]
        if missing:
            created = await http.post(
                "/api/v1/streams", json={"streams": missing}, headers=config.admin_headers
            )
            created.raise_for_status()
        return len(missing)


def dashboard_line(config: DemoConfig) -> str:
    """The first line the demo prints: where to look, and the token the page asks for."""
    hint = f" (admin token: {config.admin_token})" if config.admin_token else ""
    return f"dashboard: {config.url}/ui/{hint}"


def banner(config: DemoConfig) -> str:
    auth = f"-H 'Authorization: Bearer {config.admin_token}'"
    health = ", ".join(
        f"http://127.0.0.1:{config.worker_base_port + i}/health" for i in range(config.workers)
    )
    return "\n".join(
        [
            "streamherd demo is running; Ctrl-C stops it",
            f"  dashboard      {config.url}/ui/",
            f"  API docs       {config.url}/docs",
            f"  cluster        curl {auth} {config.url}/api/v1/cluster",
            f"  streams        curl {auth} {config.url}/api/v1/streams",
            f"  workers        curl {auth} {config.url}/api/v1/workers",
            f"  live events    ws://127.0.0.1:{config.port}/api/v1/events/ws"
            f"?token={config.admin_token}",
            f"  worker health  {health}",
            f"  metrics        {config.url}/metrics",
            f"  data           {config.directory}",
        ]
    )


def summary_line(cluster: Mapping[str, Any], workers: Sequence[Mapping[str, Any]]) -> str:
    """The fleet in one line: streams by status, assigned, and each live worker's load."""
    streams = cluster.get("streams", {})
    loads = " ".join(
        f"{w['worker_id']}={w['held']}/{w['capacity']}"
        for w in workers
        if w.get("state") in ("active", "suspect", "draining")
    )
    return (
        f"fleet: {streams.get('active', 0)} active streams, {cluster.get('assigned', 0)} "
        f"assigned, {cluster.get('unassigned', 0)} waiting; workers {loads or 'none'}"
    )


async def summarise(config: DemoConfig, stop: asyncio.Event) -> None:
    """One summary line every ``SUMMARY_EVERY_S`` until ``stop``; a failed read is skipped."""
    async with httpx.AsyncClient(
        base_url=config.url, headers=config.admin_headers, timeout=5.0
    ) as http:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUMMARY_EVERY_S):
                    await stop.wait()
            if stop.is_set():
                return
            try:
                cluster = (await http.get("/api/v1/cluster")).raise_for_status().json()
                workers = (await http.get("/api/v1/workers")).raise_for_status().json()
            except (httpx.HTTPError, ValueError):
                continue
            say(summary_line(cluster, workers.get("items", [])))


async def run(config: DemoConfig) -> int:
    say(dashboard_line(config))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            say(f"{sig.name} again: killing what is left")
            force.set()
        else:
            say(f"{sig.name}: stopping the workers, then the orchestrator")
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    config.directory.mkdir(parents=True, exist_ok=True)
    worker_ids = config.worker_ids()
    width = max(len("orchestrator"), *(len(w) for w in worker_ids))
    orchestrator_env = child_env(
        {
            "ORCH_DATABASE_URL": f"sqlite+aiosqlite:///{config.directory / 'streamherd.db'}",
            "ORCH_HOST": "127.0.0.1",
            "ORCH_PORT": str(config.port),
            "ORCH_ADMIN_TOKEN": config.admin_token,
            "ORCH_WORKER_TOKEN": config.worker_token,
            "ORCH_HEARTBEAT_INTERVAL_S": "2",
            "ORCH_LEASE_TTL_S": "6",
            "ORCH_AUTO_MIGRATE": "true",
        }
    )
    orchestrator = await Child.start(
        "orchestrator", [sys.executable, "-m", "orchestrator"], orchestrator_env, width
    )
    workers: list[Child] = []
    status = 0
    try:
        if not await wait_ready(config, orchestrator, stop):
            if stop.is_set():
                return 0
            say(f"the orchestrator did not become ready on {config.url}")
            return 1
        created = await ensure_streams(config)
        say(f"{created} demo streams created, {len(DEMO_STREAMS) - created} already there")
        for n, worker_id in enumerate(worker_ids):
            env = child_env(
                {
                    "WORKER_ORCHESTRATOR_URL": config.url,
                    "WORKER_ID": worker_id,
                    "WORKER_TOKEN": config.worker_token,
                    "WORKER_PROCESSOR": "demo",
                    "WORKER_MAX_STREAMS": "6",
                    "WORKER_STATE_DIR": str(config.directory / "state" / worker_id),
                    "WORKER_HEALTH_PORT": str(config.worker_base_port + n),
                }
            )
            workers.append(
                await Child.start(worker_id, [sys.executable, "-m", "worker"], env, width)
            )
        say(banner(config))
        summaries = asyncio.create_task(summarise(config, stop), name="demo.summary")
        everyone = [orchestrator, *workers]
        exits = {asyncio.create_task(c.process.wait()): c for c in everyone}
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        summaries.cancel()
        for task in exits:
            task.cancel()
        if not stop.is_set():
            died = next(exits[t] for t in done if t in exits)
            say(f"{died.name} exited on its own ({died.process.returncode}): stopping the rest")
            status = 1
        return status
    except httpx.HTTPError as exc:
        say(f"talking to the orchestrator failed: {exc!r}")
        return 1
    finally:
        codes = await asyncio.gather(*(w.stop(WORKER_STOP_TIMEOUT_S, force) for w in workers))
        code = await orchestrator.stop(ORCHESTRATOR_STOP_TIMEOUT_S, force)
        summary = "".join(
            f"{w.name}={describe_exit(c)}, " for w, c in zip(workers, codes, strict=True)
        )
        say(f"stopped: {summary}orchestrator={describe_exit(code)}")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    del argv  # configured through DEMO_* variables only
    return asyncio.run(run(DemoConfig.from_env(os.environ)))


if __name__ == "__main__":
    sys.exit(main())
