"""The lease book stays bounded with worker churn: the newest renewal of a worker whose
lease ended long ago is forgotten, never one still waiting to be written, never a live one."""

from __future__ import annotations

from devkit.clock import FakeClock
from devkit.harness import running
from orchestrator.heartbeats import DEFAULT_FORGET_AFTER_S, PRUNE_EVERY_S, LeaseBook

TTL = 10.0


def test_a_worker_gone_for_good_is_forgotten_on_a_later_renewal() -> None:
    """Its lease ended more than the delay ago and was written: gone; the live one stays."""
    book = LeaseBook(forget_after_s=60.0)
    book.renew("gone", 1, 0.0, TTL, None)
    book._pending.clear()  # written by a flush
    book.renew("live", 1, TTL + 60.0 + PRUNE_EVERY_S, TTL, None)
    assert book.latest_expiry("gone", 1) is None
    assert book.latest_expiry("live", 1) == TTL + 60.0 + PRUNE_EVERY_S + TTL
    assert book.remembered == 1


def test_an_ended_lease_is_kept_for_the_delay() -> None:
    """Ended, but not ``forget_after_s`` ago yet: still remembered."""
    book = LeaseBook(forget_after_s=60.0)
    book.renew("w", 1, 0.0, TTL, None)
    book._pending.clear()
    assert book.prune(TTL + 59.0) == 0
    assert book.latest_expiry("w", 1) == TTL
    assert book.prune(TTL + 61.0) == 1


def test_a_renewal_not_yet_written_is_never_forgotten() -> None:
    """Pending (no flush got through): kept however old, so the flush can retry it."""
    book = LeaseBook(forget_after_s=60.0)
    book.renew("w", 1, 0.0, TTL, None)
    assert book.prune(10_000.0) == 0
    assert book.latest_expiry("w", 1) == TTL and len(book) == 1


def test_worker_churn_leaves_the_book_bounded() -> None:
    """10,000 worker ids, each beating for a while and gone: the book holds only the
    recent ones, not every id ever seen."""
    book = LeaseBook()
    now = 0.0
    for i in range(10_000):
        now += 1.0
        book.renew(f"w-{i}", 1, now, TTL, None)
        book._pending.clear()
    # Those whose lease ended within the delay, and the pass's own lag.
    assert book.remembered <= TTL + DEFAULT_FORGET_AFTER_S + PRUNE_EVERY_S + 1


async def test_the_apps_book_forgets_workers_that_stopped_beating(
    db_url: str, clock: FakeClock
) -> None:
    """Through the API: five workers beat once and stop, one keeps beating; once their
    leases are long over only the one beating is remembered, and it is still served."""
    async with running(db_url, clock) as h:
        book: LeaseBook = h.app.state.book
        stay = await h.register("stay")
        for i in range(5):
            gone = await h.register(f"gone-{i}")
            assert (await h.heartbeat(gone)).status_code == 200
        assert (await h.heartbeat(stay)).status_code == 200
        assert book.remembered == 6
        ttl = h.settings.lease_ttl_s
        waited = 0.0
        while waited < ttl + DEFAULT_FORGET_AFTER_S + PRUNE_EVERY_S + 1:
            clock.advance(ttl / 3)
            waited += ttl / 3
            assert (await h.heartbeat(stay)).status_code == 200
            await book.flush(h.app.state.db)
        assert book.remembered == 1
        assert book.latest_expiry("stay", stay.epoch) == clock.wall() + ttl
