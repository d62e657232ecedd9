"""A small fake orchestrator for the worker client's tests, over ``httpx.MockTransport``.

It speaks the v1 worker calls of the contract with just enough state (owners, tokens,
epochs, sessions, idempotency keys) to check the client's side of each rule. Faults are
queued per request, so no test sleeps or races.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from shared.models import StreamStatus

CLUSTER_TOKEN = "cluster-secret-token"
ORCH_URL = "http://orchestrator.test"
LOSE_RESPONSE = "lose-response"  # a fault: process the call, then drop the answer


@dataclass
class FakeStream:
    id: int
    owner: str | None = None
    token: int = 0
    status: StreamStatus = StreamStatus.ACTIVE


@dataclass
class FakeWorker:
    worker_id: str
    capacity: int
    epoch: int = 0
    session: str = ""
    left: bool = False
    registrations: list[dict[str, Any]] = field(default_factory=list)


def error(status: int, code: str, message: str = "", **headers: str) -> httpx.Response:
    body = {"error": {"code": code, "message": message or code.lower(), "details": {}}}
    return httpx.Response(status, json=body, headers=headers)


class FakeOrchestrator:
    """The orchestrator's worker calls as an ``httpx.MockTransport`` handler."""

    def __init__(self, *, streams: int = 10, heartbeat_interval_s: float = 5.0) -> None:
        self.streams = {i: FakeStream(i) for i in range(1, streams + 1)}
        self.workers: dict[str, FakeWorker] = {}
        self.heartbeat_interval_s = heartbeat_interval_s
        self.requests: list[httpx.Request] = []
        self.down = False
        # Consumed one per request before it is served: an exception to raise, a response
        # to answer with, or LOSE_RESPONSE.
        self.faults: list[Exception | httpx.Response | str] = []
        self.revokes: set[int] = set()
        self.failures: Counter[int] = Counter()
        self.quarantine_after = 3
        self.heartbeat_gate: asyncio.Event | None = None
        self.beat_hint: float | None = None  # sent as next_heartbeat_in_s when set
        self._replays: dict[tuple[str, str], httpx.Response] = {}
        self._next_token = 100

    # --- what a test does ------------------------------------------------------------

    def owned_by(self, worker_id: str) -> dict[int, int]:
        return {s.id: s.token for s in self.streams.values() if s.owner == worker_id}

    def reassign(self, stream_id: int, to: str | None) -> None:
        stream = self.streams[stream_id]
        stream.owner = to
        if to is not None:
            stream.token = self._token()

    def end_session(self, worker_id: str) -> None:
        """The lease ran out: the next call with the old session is STALE_EPOCH."""
        self.workers[worker_id].epoch += 1

    def calls(self, suffix: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.endswith(suffix)]

    # --- the transport ---------------------------------------------------------------

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        lose = False
        if self.faults:
            fault = self.faults.pop(0)
            if isinstance(fault, Exception):
                raise fault
            if isinstance(fault, httpx.Response):
                return fault
            lose = fault == LOSE_RESPONSE
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        response = self._serve(request)
        if self.heartbeat_gate is not None and request.url.path.endswith("/heartbeat"):
            # The answer is settled; its delivery waits, as on a slow network.
            await self.heartbeat_gate.wait()
        if lose:
            raise httpx.ReadError("connection reset while reading the answer", request=request)
        return response

    def _serve(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if path == "/api/v1/workers/register":
            if bearer != CLUSTER_TOKEN:
                return error(401, "UNAUTHORIZED")
            return self._register(body)
        match = re.fullmatch(r"/api/v1/workers/([^/]+)(/.*)?", path)
        if match is None:
            return error(404, "NOT_FOUND")
        worker = self.workers.get(match.group(1))
        if worker is None or worker.left:
            return error(404, "NOT_FOUND")
        if bearer != worker.session:
            return error(409, "STALE_EPOCH")
        if "epoch" in body and body["epoch"] != worker.epoch:
            return error(409, "STALE_EPOCH")
        key = request.headers.get("Idempotency-Key")
        if key is not None and (worker.worker_id, key) in self._replays:
            return self._replays[(worker.worker_id, key)]
        rest = match.group(2) or ""
        if rest == "/heartbeat":
            response = self._heartbeat(worker, body)
        elif rest == "/streams/request":
            response = self._request(worker, body["count"])
        elif rest == "/streams/release":
            response = self._release(worker, body["stream_ids"])
        elif rest == "/reconcile":
            response = self._reconcile(worker, body)
        elif failure := re.fullmatch(r"/streams/(\d+)/failures", rest):
            response = self._failure(worker, int(failure.group(1)), body)
        elif rest == "" and request.method == "DELETE":
            response = json_response({"released": self._release(worker, None, raw=True)})
            worker.left = True
        else:
            return error(404, "NOT_FOUND")
        if key is not None:
            self._replays[(worker.worker_id, key)] = response
        return response

    def _register(self, body: dict[str, Any]) -> httpx.Response:
        wid = body["worker_id"]
        worker = self.workers.setdefault(wid, FakeWorker(wid, body["capacity"]))
        worker.capacity = body["capacity"]
        worker.left = False
        worker.epoch += 1
        worker.session = f"session-{wid}-{worker.epoch}"
        worker.registrations.append(body)
        dropped = self._take_back(worker, body.get("held", []))
        return json_response(
            {
                "worker_id": wid,
                "epoch": worker.epoch,
                "session_token": worker.session,
                "heartbeat_interval_s": self.heartbeat_interval_s,
                "lease_ttl_s": 3 * self.heartbeat_interval_s,
                "assignments": self._assignments(wid),
                "dropped": dropped,
            }
        )

    def _take_back(self, worker: FakeWorker, held: list[dict[str, int]]) -> list[dict[str, Any]]:
        """Reconcile rules: the current owner wins, unowned active streams come back."""
        dropped = []
        for h in held:
            stream = self.streams.get(h["stream_id"])
            if stream is None or stream.owner == worker.worker_id:
                continue
            if stream.owner is None and stream.status is StreamStatus.ACTIVE and self._room(worker):
                stream.owner = worker.worker_id
                stream.token = self._token()
            else:
                reason = "reassigned" if stream.owner else "not_owned"
                dropped.append({"stream_id": stream.id, "reason": reason, "owner": stream.owner})
        return dropped

    def _heartbeat(self, worker: FakeWorker, body: dict[str, Any]) -> httpx.Response:
        wid = worker.worker_id
        dropped = [
            {"stream_id": h["stream_id"], "reason": "reassigned", "owner": s.owner}
            for h in body["held"]
            if (s := self.streams[h["stream_id"]]).owner != wid
        ]
        expires = datetime.now(UTC) + timedelta(seconds=15)
        return json_response(
            {
                "lease_expires_at": expires.isoformat(),
                # As the real orchestrator does: a stream being revoked is only in `revoke`.
                "assignments": [
                    a for a in self._assignments(wid) if a["stream_id"] not in self.revokes
                ],
                "revoke": sorted(sid for sid in self.revokes if self.streams[sid].owner == wid),
                "dropped": dropped,
                **({"next_heartbeat_in_s": self.beat_hint} if self.beat_hint is not None else {}),
            }
        )

    def _request(self, worker: FakeWorker, count: int) -> httpx.Response:
        assigned: list[dict[str, Any]] = []
        for stream in self.streams.values():
            if len(assigned) >= count or not self._room(worker):
                break
            if stream.owner is None and stream.status is StreamStatus.ACTIVE:
                stream.owner = worker.worker_id
                stream.token = self._token()
                assigned.append(self._assignment(stream))
        return json_response({"assigned": assigned})

    def _release(self, worker: FakeWorker, ids: list[int] | None, raw: bool = False) -> Any:
        released = []
        for stream in self.streams.values():
            if stream.owner == worker.worker_id and (ids is None or stream.id in ids):
                stream.owner = None
                released.append(stream.id)
        self.revokes -= set(released)
        return released if raw else json_response({"released": released})

    def _reconcile(self, worker: FakeWorker, body: dict[str, Any]) -> httpx.Response:
        wid = worker.worker_id
        held_ids = {h["stream_id"] for h in body["held"]}
        kept = self.owned_by(wid).keys() & held_ids
        drop = self._take_back(worker, body["held"])
        owned = self._assignments(wid)
        return json_response(
            {
                "keep": [a for a in owned if a["stream_id"] in kept],
                "drop": drop,
                "assign": [a for a in owned if a["stream_id"] not in kept],
            }
        )

    def _failure(self, worker: FakeWorker, sid: int, body: dict[str, Any]) -> httpx.Response:
        stream = self.streams.get(sid)
        if stream is None:
            return error(404, "NOT_FOUND")
        if stream.owner != worker.worker_id or stream.token != body["token"]:
            return error(409, "CONFLICT")
        self.failures[sid] += 1
        quarantined = self.failures[sid] >= self.quarantine_after
        if quarantined:
            stream.status = StreamStatus.QUARANTINED
            stream.owner = None
        return json_response({"failures": self.failures[sid], "quarantined": quarantined})

    def _room(self, worker: FakeWorker) -> bool:
        return len(self.owned_by(worker.worker_id)) < worker.capacity

    def _token(self) -> int:
        self._next_token += 1
        return self._next_token

    def _assignments(self, worker_id: str) -> list[dict[str, Any]]:
        return [self._assignment(s) for s in self.streams.values() if s.owner == worker_id]

    @staticmethod
    def _assignment(stream: FakeStream) -> dict[str, Any]:
        return {
            "stream_id": stream.id,
            "token": stream.token,
            "name": f"stream-{stream.id}",
            "url": f"http://radio.example/{stream.id}",
            "metadata": {"genre": "news"},
            "assigned_at": "2024-01-01T12:00:00+00:00",
        }


def json_response(doc: Any) -> httpx.Response:
    return httpx.Response(200, json=doc)


def body_of(request: httpx.Request) -> Any:
    return json.loads(request.content)
