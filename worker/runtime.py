"""The worker's supervisor: converge the running stream tasks to what the orchestrator says.

Shaped after arq's worker: settings are constructor arguments, one small loop body
(``tick``: heartbeat, reap, converge, hand back revoked streams, ask for more), a bounded
set of per-stream tasks reaped every pass, and a two-phase shutdown (ask every processor
to stop and wait with a deadline, cancel the rest) ending in one ``worker.stopped`` line.
Over 500 lines, and one concept: supervising the stream tasks, start to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from shared.clock import SYSTEM_CLOCK, Clock
from shared.limits import MAX_ERROR_LEN
from shared.models import Assignment, FailureAnswer
from worker.errors import RequestRejected, Superseded
from worker.host import HostFigures
from worker.metrics import WorkerMetrics
from worker.processors import Processor, StreamContext, stream_logger
from worker.retry import backoff_delay

logger = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
DEFAULT_RESTART_BASE_S = 1.0
DEFAULT_RESTART_MAX_S = 60.0
# Extra beats asked for by heartbeat answers are spread over this much (see ``run``).
HINT_SPREAD_S = 0.2
# How long cancelled tasks get to unwind before the worker leaves without them.
CANCEL_GRACE_S = 2.0
# In local mode no orchestrator can quarantine a failing stream: after this many failures
# in a row the worker gives it up itself (the orchestrator's default quarantine count).
DEFAULT_LOCAL_GIVE_UP_AFTER = 5

Outcome = Literal["stopped", "quarantined", "given_up"]
Phase = Literal["created", "starting", "running", "stopping", "stopped"]


class WorkerClient(Protocol):
    """What the runtime needs of ``worker.client.ResilientWorkerClient``."""

    @property
    def is_registered(self) -> bool: ...
    @property
    def local_mode_active(self) -> bool: ...
    @property
    def heartbeat_interval_s(self) -> float: ...
    @property
    def metrics(self) -> WorkerMetrics: ...
    @property
    def registration_refused(self) -> RequestRejected | None: ...
    @property
    def superseded(self) -> Superseded | None: ...

    async def load_state(self) -> None: ...
    async def register(self) -> bool: ...
    async def send_heartbeat(self) -> bool: ...
    def take_beat_hint(self) -> float | None: ...
    async def request_streams(self, count: int | None = None) -> list[int]: ...
    async def release_streams(self, stream_ids: list[int]) -> bool: ...
    async def report_failure(self, stream_id: int, error: str) -> FailureAnswer | None: ...
    async def give_up(self, stream_ids: list[int], *, reason: str) -> bool: ...
    async def health_check(self) -> dict[str, Any]: ...
    async def leave(self) -> list[int]: ...
    async def shutdown(self, *, leave: bool = True) -> None: ...
    def assignments(self) -> Mapping[int, Assignment]: ...
    def revoked(self) -> AbstractSet[int]: ...
    def record_stream_processing(self, stream_id: int) -> None: ...


class RegistrationRefused(Exception):
    """The orchestrator refused our credentials at start-up (401/403): the cluster token is
    wrong or missing, and no retry will change that."""

    def __init__(self, refusal: RequestRejected) -> None:
        super().__init__(f"{refusal.status} {refusal.code}: {refusal}")
        self.refusal = refusal


class WorkerSuperseded(Exception):
    """Another live process registered our worker id and the orchestrator fenced us: the
    streams were stopped, and this process must end (two hosts share one WORKER_ID)."""

    def __init__(self, worker_id: str, refusal: Superseded) -> None:
        super().__init__(refusal.line(worker_id))
        self.refusal = refusal


@dataclass(eq=False)
class _Held:
    """A stream with a running supervisor task."""

    assignment: Assignment
    ctx: StreamContext
    task: asyncio.Task[Outcome]
    started_at: float
    stop_requested_at: float | None = None
    stop_reason: str | None = None
    cancelled: bool = False

    @property
    def stream_id(self) -> int:
        return self.assignment.stream_id

    @property
    def token(self) -> int:
        return self.assignment.token


@dataclass
class RunCounts:
    """What one run of the worker did; printed once in ``worker.stopped``."""

    streams_started: int = 0
    streams_stopped: int = 0
    processor_restarts: int = 0
    processor_failures: int = 0
    streams_quarantined: int = 0
    streams_given_up: int = 0
    stops_cancelled: int = 0
    streams_released: int = 0


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:MAX_ERROR_LEN]


class Runtime:
    """Runs one supervised task per held stream and keeps that set equal to the client's
    ``assignments()`` (minus revoked), never more than ``capacity`` at once.

    ``shutdown_timeout`` bounds both the graceful stop and each single stream's stop
    (revoke, drop) before its task is cancelled; ``restart_base``/``restart_max`` bound a
    processor's restart backoff; ``local_give_up_after`` failures in a row while in local
    mode make the worker give the stream up (recorded, handed back on reconnect).
    ``clock`` (time, sleep, jitter) is injected for tests.
    """

    def __init__(
        self,
        client: WorkerClient,
        processor: Processor,
        *,
        worker_id: str,
        capacity: int,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
        restart_base: float = DEFAULT_RESTART_BASE_S,
        restart_max: float = DEFAULT_RESTART_MAX_S,
        cancel_grace: float = CANCEL_GRACE_S,
        local_give_up_after: int = DEFAULT_LOCAL_GIVE_UP_AFTER,
        clock: Clock = SYSTEM_CLOCK,
        host: HostFigures | None = None,
    ) -> None:
        self.client = client
        self.processor = processor
        self.worker_id = worker_id
        self.capacity = capacity
        self.shutdown_timeout = shutdown_timeout
        self.restart_base = restart_base
        self.restart_max = max(restart_max, restart_base)
        self.cancel_grace = cancel_grace
        self.local_give_up_after = local_give_up_after
        # Measures the host for the heartbeat's stats while ``run`` runs (None: nothing).
        self.host = host
        # Beats, uptimes and run lengths are durations: the monotonic clock.
        self._clock = clock.monotonic
        self._sleep = clock.sleep
        self._rand = clock.rand
        self._held: dict[int, _Held] = {}
        # Streams whose processor got them quarantined, by token: not restarted until the
        # orchestrator's answer catches up (drops them or hands them out with a new token).
        self._benched: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._phase: Phase = "created"
        self._accepting = True
        self._started_at = self._clock()
        self._over_capacity_logged = False
        self.counts = RunCounts()

    # --- views for the health server --------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def running_streams(self) -> list[int]:
        return sorted(self._held)

    def readiness(self) -> tuple[bool, str]:
        """Ready: the loop runs and the worker is registered, or holds streams in local mode."""
        if self._phase != "running":
            return False, self._phase
        if self.client.local_mode_active:
            return (True, "local mode") if self._held else (False, "local mode without streams")
        if self.client.is_registered:
            return True, "registered"
        return False, "not registered"

    async def health(self) -> dict[str, Any]:
        doc = dict(await self.client.health_check())
        doc.update(
            worker_id=self.worker_id,
            state=self._phase,
            capacity=self.capacity,
            running_streams=len(self._held),
            processor=self.processor.kind,
            processor_restarts=self.counts.processor_restarts,
            processor_failures=self.counts.processor_failures,
            uptime_s=round(self._clock() - self._started_at, 3),
        )
        return doc

    def render_metrics(self) -> bytes:
        return self.client.metrics.render()

    # --- the loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> RunCounts:
        """Start, converge every beat until ``stop`` is set, then shut down gracefully."""
        self._started_at = self._clock()
        self._phase = "starting"
        sampler = self._start_host_figures(stop)
        try:
            await self._unless_stopped(stop, self.start())
            self._check_superseded()
            next_beat = self._clock() + self.client.heartbeat_interval_s
            extra_beat = float("inf")  # one asked for by the orchestrator (a hint)
            if not stop.is_set():
                self._phase = "running"
            while not stop.is_set():
                now = self._clock()
                beat = now >= min(next_beat, extra_beat)
                if beat:
                    extra_beat = float("inf")
                    if now >= next_beat:
                        next_beat = now + self.client.heartbeat_interval_s
                await self._unless_stopped(stop, self._pass(beat=beat))
                self._check_superseded()
                if beat:
                    # The pass may have (re-)registered and learned a shorter interval
                    # than the one the next beat was planned with: the lease it was just
                    # given would run out before that beat.
                    next_beat = min(next_beat, now + self.client.heartbeat_interval_s)
                # Any pass: a beat made inside another call (``start``'s registration and
                # first request for streams) leaves its answer's hint too, and a new worker's
                # first streams are often a hand-off waiting for it to say it runs them.
                hint = self.client.take_beat_hint()
                if hint is not None:
                    # A failover is about to free streams: hear of them at once. An extra
                    # beat, spread a little so a fleet told at once does not beat at once;
                    # the regular ones keep their own phase.
                    extra_beat = self._clock() + hint + self._rand.random() * HINT_SPREAD_S
                until = min(next_beat, extra_beat, self._next_stop_deadline())
                await self._idle(stop, until=until)
        finally:
            if sampler is not None:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            await self.shutdown()
        return self.counts

    def _check_superseded(self) -> None:
        """Fenced: stop asking for anything and end the run (its shutdown stops the
        processors; the client, fenced, neither leaves nor writes its state)."""
        refusal = self.client.superseded
        if refusal is None:
            return
        self._accepting = False
        raise WorkerSuperseded(self.worker_id, refusal)

    def _start_host_figures(self, stop: asyncio.Event) -> asyncio.Task[None] | None:
        """Measure the host beside the loop, once per heartbeat interval: the client puts
        the latest figures into each heartbeat's stats (``WorkerMetrics.host``)."""
        if self.host is None:
            return None
        metrics = self.client.metrics

        def publish(figures: dict[str, float]) -> None:
            metrics.host = figures

        return asyncio.create_task(
            self.host.run(stop, interval=lambda: self.client.heartbeat_interval_s, publish=publish),
            name="worker.host-figures",
        )

    async def start(self) -> None:
        """Resume what the state file holds, register presenting it, fill capacity.

        Raises ``RegistrationRefused`` when this first registration is refused for our
        credentials; a refusal after that is logged and the worker carries on.
        """
        await self.client.load_state()
        resumed = len(self.client.assignments())
        if self.client.local_mode_active:
            # We went down in local mode: processing must not wait for a registration that
            # may spend seconds retrying an orchestrator that is still away.
            self._converge()
        registered = await self.client.register()
        refusal = self.client.registration_refused
        if not registered and refusal is not None:
            raise RegistrationRefused(refusal)
        logger.info(
            "worker.started",
            extra={
                "worker_id": self.worker_id,
                "capacity": self.capacity,
                "processor": self.processor.kind,
                "registered": registered,
                "local_mode": self.client.local_mode_active,
                "resumed_streams": resumed,
            },
        )
        self._converge()
        await self._fill()

    async def tick(self) -> None:
        """One full pass: heartbeat, reap, converge, hand back, ask for more."""
        await self._pass(beat=True)

    async def _pass(self, *, beat: bool) -> None:
        try:
            if beat:
                await self.client.send_heartbeat()
            self._reap()
            self._converge()
            await self._hand_back()
            if beat:
                await self._fill()
        except Exception:
            # A bug in one pass must not take every stream down; the next pass retries.
            logger.exception("worker.loop_error", extra={"worker_id": self.worker_id})
        finally:
            self._set_gauge()

    async def _unless_stopped(self, stop: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work``, abandoning it if ``stop`` is set first (a slow call must not hold
        shutdown hostage; the client keeps its state consistent across cancellation)."""
        task = asyncio.create_task(work)
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _idle(self, stop: asyncio.Event, *, until: float) -> None:
        """Wait for the next beat, a stop deadline, a stream task ending, or ``stop``."""
        timeout = max(0.0, until - self._clock())
        waiters = {asyncio.create_task(stop.wait()), asyncio.create_task(self._wake.wait())}
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            self._wake.clear()

    def _next_stop_deadline(self) -> float:
        deadlines = [
            held.stop_requested_at + self.shutdown_timeout
            for held in self._held.values()
            if held.stop_requested_at is not None and not held.cancelled
        ]
        return min(deadlines, default=float("inf"))

    # --- converging -------------------------------------------------------------------

    def _converge(self) -> None:
        desired = self.client.assignments()
        revoked = self.client.revoked()
        for stream_id, token in list(self._benched.items()):
            current = desired.get(stream_id)
            if current is None or current.token != token:
                del self._benched[stream_id]

        for held in list(self._held.values()):
            if held.stop_requested_at is not None:
                continue
            wanted = desired.get(held.stream_id)
            if held.stream_id in revoked:
                self._request_stop(held, "revoked")
            elif wanted is None:
                self._request_stop(held, "dropped")
            elif wanted.token != held.token:
                # A new grant (e.g. handed back after reconcile): restart under the new token.
                self._request_stop(held, "token_changed")

        for stream_id in sorted(desired):
            if stream_id in self._held or stream_id in revoked or stream_id in self._benched:
                continue
            if not self._accepting:
                break
            if len(self._held) >= self.capacity:
                if not self._over_capacity_logged:
                    logger.warning(
                        "worker.over_capacity",
                        extra={"worker_id": self.worker_id, "capacity": self.capacity},
                    )
                    self._over_capacity_logged = True
                break
            self._start_stream(desired[stream_id])

        now = self._clock()
        for held in self._held.values():
            if (
                held.stop_requested_at is not None
                and not held.cancelled
                and now - held.stop_requested_at >= self.shutdown_timeout
            ):
                logger.warning("worker.stream_stop_overdue", extra=self._fields(held))
                held.cancelled = True
                held.task.cancel()
                self.counts.stops_cancelled += 1

    def _start_stream(self, assignment: Assignment) -> None:
        ctx = StreamContext(
            stream_id=assignment.stream_id,
            token=assignment.token,
            name=assignment.name,
            url=assignment.url,
            metadata=dict(assignment.metadata),
            worker_id=self.worker_id,
            logger=stream_logger(self.worker_id, assignment.stream_id, assignment.token),
            on_progress=self._record_progress,
        )
        task = asyncio.create_task(self._supervise(ctx), name=f"stream-{assignment.stream_id}")
        task.add_done_callback(lambda _task: self._wake.set())
        held = _Held(assignment=assignment, ctx=ctx, task=task, started_at=self._clock())
        self._held[assignment.stream_id] = held
        self.counts.streams_started += 1
        logger.info(
            "worker.stream_started", extra={**self._fields(held), "stream_name": assignment.name}
        )

    def _request_stop(self, held: _Held, reason: str) -> None:
        held.stop_requested_at = self._clock()
        held.stop_reason = reason
        held.ctx.stopping.set()
        logger.info("worker.stream_stopping", extra={**self._fields(held), "reason": reason})

    def _reap(self) -> None:
        for stream_id, held in list(self._held.items()):
            if not held.task.done():
                continue
            del self._held[stream_id]
            outcome: str
            if held.task.cancelled():
                outcome = "cancelled"
            elif (exc := held.task.exception()) is not None:
                # The supervisor catches processor errors; this is our bug. Bench the stream
                # rather than restart it on every pass.
                outcome = "crashed"
                self._benched[stream_id] = held.token
                logger.error(
                    "worker.supervisor_crashed",
                    extra={**self._fields(held), "error": describe(exc)},
                    exc_info=exc,
                )
            else:
                outcome = held.task.result()
                if outcome == "quarantined":
                    self._benched[stream_id] = held.token
                    self.counts.streams_quarantined += 1
                elif outcome == "given_up":
                    self.counts.streams_given_up += 1
            self.counts.streams_stopped += 1
            logger.info(
                "worker.stream_stopped",
                extra={
                    **self._fields(held),
                    "reason": held.stop_reason or outcome,
                    "outcome": outcome,
                    "ran_s": round(self._clock() - held.started_at, 3),
                },
            )

    async def _hand_back(self) -> None:
        """Release revoked streams once their processors have stopped."""
        ids = sorted(sid for sid in self.client.revoked() if sid not in self._held)
        if not ids:
            return
        if await self.client.release_streams(ids):
            self.counts.streams_released += len(ids)
            logger.info(
                "worker.streams_released",
                extra={"worker_id": self.worker_id, "stream_ids": ids, "count": len(ids)},
            )

    async def _fill(self) -> None:
        """Ask for streams while below capacity (once per beat, not per pass)."""
        if not self._accepting or not self.client.is_registered or self.client.local_mode_active:
            return
        wanted = set(self.client.assignments()) | set(self._held)
        free = self.capacity - len(wanted)
        if free <= 0:
            return
        got = await self.client.request_streams(free)
        if self.client.local_mode_active:
            # Lost the orchestrator on the way: the client answers with the streams it
            # already holds (as seed 001 did). Nothing was assigned; they carry on locally.
            if got:
                logger.info(
                    "worker.streams_kept_locally",
                    extra={
                        "worker_id": self.worker_id,
                        "stream_ids": sorted(got),
                        "count": len(got),
                    },
                )
            return
        new = sorted(set(got) - wanted)
        if new:
            logger.info(
                "worker.streams_assigned",
                extra={"worker_id": self.worker_id, "stream_ids": new, "count": len(new)},
            )
        if got:
            self._converge()

    # --- one stream -------------------------------------------------------------------

    async def _supervise(self, ctx: StreamContext) -> Outcome:
        """Run the processor until the stream is taken away; restart it with backoff."""
        failures = 0
        while True:
            began = self._clock()
            error: str | None = None
            try:
                await self.processor.run(ctx)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = describe(exc)
            if ctx.stopping.is_set():
                return "stopped"
            if self._clock() - began >= self.restart_max:
                failures = 0  # a long healthy run forgets the failures before it
            if error is None:
                delay = self.restart_base
                ctx.logger.info("worker.processor_returned")
            else:
                failures += 1
                self.counts.processor_failures += 1
                self.client.metrics.processor_failures_total.inc()
                ctx.logger.warning(
                    "worker.processor_failed", extra={"error": error, "failures": failures}
                )
                if await self._report_failure(ctx, error):
                    return "quarantined"
                if await self._give_up_locally(ctx, failures):
                    return "given_up"
                delay = self.backoff(failures)
            self.counts.processor_restarts += 1
            self.client.metrics.processor_restarts_total.inc()
            ctx.logger.info("worker.processor_restarting", extra={"delay_s": round(delay, 3)})
            if await self._sleep_unless_stopping(ctx, delay):
                return "stopped"

    def backoff(self, failures: int) -> float:
        """Capped exponential delay with equal jitter, so failing streams restart apart."""
        return backoff_delay(
            failures - 1,
            base=self.restart_base,
            maximum=self.restart_max,
            rand=self._rand,
            jitter="equal",
        )

    async def _report_failure(self, ctx: StreamContext, error: str) -> bool:
        """Tell the orchestrator; True when it quarantined the stream."""
        try:
            answer = await self.client.report_failure(ctx.stream_id, error)
        except Exception as exc:  # the client promises not to raise; belt and braces
            ctx.logger.warning("worker.failure_report_failed", extra={"error": describe(exc)})
            return False
        if answer is not None and answer.quarantined:
            ctx.logger.warning("worker.stream_quarantined", extra={"failures": answer.failures})
            return True
        return False

    async def _give_up_locally(self, ctx: StreamContext, failures: int) -> bool:
        """In local mode, after ``local_give_up_after`` failures in a row: give it up."""
        if not self.client.local_mode_active or failures < self.local_give_up_after:
            return False
        ctx.logger.warning("worker.stream_given_up_locally", extra={"failures": failures})
        await self.client.give_up([ctx.stream_id], reason="failing")
        return True

    async def _sleep_unless_stopping(self, ctx: StreamContext, delay: float) -> bool:
        sleeper = asyncio.ensure_future(self._sleep(delay))
        stopper = asyncio.ensure_future(ctx.stopping.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()
        return ctx.stopping.is_set()

    def _record_progress(self, stream_id: int) -> None:
        try:
            self.client.record_stream_processing(stream_id)
        except Exception:  # progress accounting must never fail the processor
            logger.debug("worker.progress_not_recorded", extra={"stream_id": stream_id})

    # --- shutdown ---------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop taking streams, stop processors (deadline, then cancel), leave; log once."""
        if self._phase == "stopped":
            return
        self._phase = "stopping"
        self._accepting = False
        held_at_stop = len(self._held)
        logger.info(
            "worker.stopping", extra={"worker_id": self.worker_id, "running_streams": held_at_stop}
        )
        for held in self._held.values():
            if held.stop_requested_at is None:
                self._request_stop(held, "shutdown")
        tasks = {held.task for held in self._held.values()}
        pending: set[asyncio.Task[Outcome]] = set()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
        for task in pending:
            task.cancel()
        self.counts.stops_cancelled += len(pending)
        if pending:
            _done, pending = await asyncio.wait(pending, timeout=self.cancel_grace)
        if pending:
            # A processor that swallows cancellation: at least its programs do not outlive us.
            logger.error(
                "worker.streams_unresponsive",
                extra={"worker_id": self.worker_id, "count": len(pending)},
            )
            self.processor.abort()
        self._reap()
        self._set_gauge()
        # Leave first, so the orchestrator hands our streams to others now rather than
        # after the lease; shutdown() then persists and closes, without a second leave.
        released_on_leave: list[int] = []
        try:
            released_on_leave = await self.client.leave()
        except Exception:
            logger.exception("worker.leave_failed", extra={"worker_id": self.worker_id})
        try:
            await self.client.shutdown(leave=False)
        except Exception:
            logger.exception("worker.shutdown_failed", extra={"worker_id": self.worker_id})
        self._phase = "stopped"
        c = self.counts
        logger.info(
            "worker.stopped",
            extra={
                "worker_id": self.worker_id,
                "held_at_stop": held_at_stop,
                "streams_started": c.streams_started,
                "streams_stopped": c.streams_stopped,
                "processor_restarts": c.processor_restarts,
                "processor_failures": c.processor_failures,
                "streams_quarantined": c.streams_quarantined,
                "streams_given_up": c.streams_given_up,
                "streams_released": c.streams_released,
                "released_on_leave": len(released_on_leave),
                "stops_cancelled": c.stops_cancelled,
                "local_mode": self.client.local_mode_active,
                "uptime_s": round(self._clock() - self._started_at, 3),
            },
        )

    def abort(self) -> None:
        """Second signal: no more waiting; kill the processors' programs synchronously."""
        self.processor.abort()

    # --- helpers ----------------------------------------------------------------------

    def _fields(self, held: _Held) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "stream_id": held.stream_id,
            "fencing_token": held.token,
        }

    def _set_gauge(self) -> None:
        self.client.metrics.streams_running.set(len(self._held))
