"""A seed-001-style application, run as its own process by test_seed_app_e2e.py.

It uses only the seed's API, as fingerv7.py does: the client is created at import time
with the seed's keywords (no state_dir, no token: WORKER_TOKEN), register() is awaited
before any work, the application beats from its own slow loop (every SEED_BEAT_EVERY_S),
and the client is called from two ``asyncio.run`` calls. Each step prints one line,
``SEED {json}``, for the test to read.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from worker import create_resilient_worker_client

BEAT_EVERY_S = float(os.environ["SEED_BEAT_EVERY_S"])

orchestrator_client = create_resilient_worker_client(
    orchestrator_url=os.environ["SEED_ORCHESTRATOR_URL"],
    server_id=os.environ["SEED_SERVER_ID"],
    max_streams=int(os.environ["SEED_MAX_STREAMS"]),
    circuit_failure_threshold=5,
    circuit_recovery_timeout=60,
    retry_max_attempts=3,
    retry_base_delay=1.0,
)


def report(event: str, **fields: Any) -> None:
    print("SEED " + json.dumps({"event": event, **fields}), flush=True)


async def start() -> None:
    """The first asyncio.run: join (timed), then take streams."""
    started = time.monotonic()
    ok = await orchestrator_client.register()
    report("registered", ok=ok, seconds=round(time.monotonic() - started, 3))
    streams = await orchestrator_client.request_streams()
    report("streams", streams=sorted(streams))


async def run_forever() -> None:
    """The second asyncio.run: process what we hold, beat rarely, as fingerv7.py's loop."""
    beats = 0
    while True:
        ok = await orchestrator_client.send_heartbeat()
        health = await orchestrator_client.health_check()
        for stream_id in orchestrator_client.get_all_assigned_streams():
            if orchestrator_client.can_process_stream(stream_id):
                orchestrator_client.record_stream_processing(stream_id)
        beats += 1
        report(
            "beat",
            n=beats,
            ok=ok,
            streams=sorted(orchestrator_client.assigned_streams),
            local_mode=health["local_mode_active"],
            breaker=orchestrator_client.circuit_breaker.get_stats()["state"],
        )
        await asyncio.sleep(BEAT_EVERY_S)


def main() -> int:
    for step in (start, run_forever):
        try:
            asyncio.run(step())
        except Exception as exc:  # the seed's methods must never get here
            report("raised", step=step.__name__, error=repr(exc))
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
