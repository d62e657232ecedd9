"""The orchestrator's tables (SQLAlchemy 2 declarative). Times are Unix seconds (floats).

Floats keep lease arithmetic cheap and identical on SQLite and PostgreSQL; the API turns
them into RFC 3339 strings at the edge. ORM classes are never API schemas (see shared/).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shared.models import StreamStatus, WorkerState

# States whose holder still has a lease; only ACTIVE workers receive new streams.
# (``suspect`` is derived when a worker is shown, never stored.)
LEASED_STATES: tuple[WorkerState, ...] = (WorkerState.ACTIVE, WorkerState.DRAINING)

# SQLite only auto-numbers an INTEGER PRIMARY KEY; PostgreSQL wants 64 bits for ids.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class WorkerRow(Base):
    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    capacity: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(BigInteger)
    session_hash: Mapped[str] = mapped_column(String(64))
    lease_expires_at: Mapped[float] = mapped_column(Float)
    last_heartbeat_at: Mapped[float | None] = mapped_column(Float)
    registered_at: Mapped[float] = mapped_column(Float)
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    local_mode_since: Mapped[float | None] = mapped_column(Float)
    # Where the worker's health endpoint answers, as it advertised at register (or None).
    health_url: Mapped[str | None] = mapped_column(Text)
    # The process instance holding the current epoch, and where it registered from (None:
    # none yet, or only clients that send no instance id; ``identity.py``).
    instance_id: Mapped[str | None] = mapped_column(String(64))
    instance_address: Mapped[str | None] = mapped_column(String(255))
    # The epoch at which another instance last took this worker id over: any session of an
    # earlier epoch belongs to a superseded instance.
    takeover_epoch: Mapped[int | None] = mapped_column(BigInteger)
    # The last few instances taken over (``identity.MAX_SUPERSEDED``), newest last:
    # {"instance", "address", "by", "by_address", "epoch", "at", "reported"}.
    superseded: Mapped[list[Any] | None] = mapped_column(JSON)

    __table_args__ = (Index("ix_workers_state_lease", "state", "lease_expires_at"),)


class WorkerSessionRow(Base):
    """Every session token ever issued, hashed: tells a stale session from a forged one."""

    __tablename__ = "worker_sessions"

    session_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    worker_id: Mapped[str] = mapped_column(String(63), index=True)
    epoch: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[float] = mapped_column(Float)


class WorkerCredentialRow(Base):
    """A per-worker register token, hashed: it registers ``worker_id`` only, until revoked."""

    __tablename__ = "worker_credentials"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    worker_id: Mapped[str] = mapped_column(String(63), index=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(200))
    revoked_at: Mapped[float | None] = mapped_column(Float)
    revoked_by: Mapped[str | None] = mapped_column(String(200))


class StreamRow(Base):
    __tablename__ = "streams"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(512))
    url: Mapped[str | None] = mapped_column(String(4096))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=StreamStatus.ACTIVE)
    owner_id: Mapped[str | None] = mapped_column(
        String(63), ForeignKey("workers.worker_id"), index=True
    )
    token: Mapped[int] = mapped_column(BigInteger, default=0)
    assigned_at: Mapped[float | None] = mapped_column(Float)
    # A pending revoke: the owner was asked to hand the stream back (to revoke_to, if set).
    revoke_at: Mapped[float | None] = mapped_column(Float)
    revoke_to: Mapped[str | None] = mapped_column(String(63))
    # A pending make-before-break hand-off (``handoff``): the previous owner may still run
    # the stream; it is told to stop at ``handoff_stop_at`` (None: not yet).
    handoff_from: Mapped[str | None] = mapped_column(String(63))
    handoff_at: Mapped[float | None] = mapped_column(Float)
    handoff_stop_at: Mapped[float | None] = mapped_column(Float)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # Placement rules (``placement.py``): labels a worker must carry, labels it would rather.
    requires: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, server_default=text("'{}'")
    )
    prefers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default=text("'{}'"))
    # Both rules in one canonical string ("" for a stream without any): what the balancer
    # groups streams by, found through a partial index that holds only ruled streams.
    placement_key: Mapped[str] = mapped_column(String(2048), default="", server_default=text("''"))

    __table_args__ = (
        Index("ix_streams_status_owner", "status", "owner_id"),
        Index(
            "ix_streams_placement",
            "placement_key",
            "status",
            "owner_id",
            sqlite_where=text("placement_key <> ''"),
            postgresql_where=text("placement_key <> ''"),
        ),
        # The few streams being revoked, which every reaper pass looks up: without it each
        # pass scans the whole table (tens of ms at 100,000 streams).
        Index(
            "ix_streams_revoking",
            "revoke_at",
            sqlite_where=text("revoke_at IS NOT NULL"),
            postgresql_where=text("revoke_at IS NOT NULL"),
        ),
        # The few pending hand-offs, looked up by previous owner (its view) and by the
        # reaper's timeouts.
        Index(
            "ix_streams_handoff",
            "handoff_from",
            sqlite_where=text("handoff_from IS NOT NULL"),
            postgresql_where=text("handoff_from IS NOT NULL"),
        ),
    )


class StreamTokenFloorRow(Base):
    """The token a deleted stream id had reached: a stream created again under that id
    starts there, so fencing tokens of an id never go down (written by the delete, kept
    as the larger of old and new when the id is deleted again)."""

    __tablename__ = "stream_token_floors"

    stream_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    token: Mapped[int] = mapped_column(BigInteger)
    deleted_at: Mapped[float] = mapped_column(Float)


# The condition of ``ix_streams_placement``, spelled as its WHERE is: a query must carry
# it literally (not as a bound parameter) for SQLite and PostgreSQL to use that index.
RULED = text("streams.placement_key <> ''")


class UnplaceableClassRow(Base):
    """Eligibility classes (canonical ``requires``) that no live worker may take, as the
    last balancing pass found them: what tells it a class has just become (un)placeable."""

    __tablename__ = "unplaceable_classes"

    requires_key: Mapped[str] = mapped_column(String(1024), primary_key=True)
    since: Mapped[float] = mapped_column(Float)


class StreamFailureRow(Base):
    __tablename__ = "stream_failures"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    stream_id: Mapped[int] = mapped_column(BigInteger, index=True)
    worker_id: Mapped[str] = mapped_column(String(63))
    token: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Float)


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(32))
    at: Mapped[float] = mapped_column(Float)
    worker_id: Mapped[str | None] = mapped_column(String(63))
    stream_id: Mapped[int | None] = mapped_column(BigInteger)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class IdempotencyRow(Base):
    """First answer to a call made with an Idempotency-Key, replayed for its repeats."""

    __tablename__ = "idempotency_keys"

    worker_id: Mapped[str] = mapped_column(String(63), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(300))
    status_code: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, index=True)


class LocalHistoryRow(Base):
    """What a worker reported it did while in local mode; kept for diagnostics."""

    __tablename__ = "local_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    worker_id: Mapped[str] = mapped_column(String(63), index=True)
    stream_id: Mapped[int] = mapped_column(BigInteger)
    first_processed_at: Mapped[float] = mapped_column(Float)
    last_processed_at: Mapped[float] = mapped_column(Float)
    count: Mapped[int] = mapped_column(BigInteger)
    reported_at: Mapped[float] = mapped_column(Float)


class ClusterRow(Base):
    """One row: which replica runs the reaper, and when a reaper last ran anywhere."""

    __tablename__ = "cluster_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    leader: Mapped[str | None] = mapped_column(String(128))
    leader_until: Mapped[float] = mapped_column(Float, default=0.0)
    last_reaper_at: Mapped[float | None] = mapped_column(Float)


class ViewChangeRow(Base):
    """Which workers' cached views a committed write changed ("*": any), for other replicas.

    Written in the changing transaction with ids drawn in commit order (``events.py``'s
    lock), so a replica tailing it by id misses none. Only PostgreSQL replicas use it.
    """

    __tablename__ = "view_changes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    workers: Mapped[str] = mapped_column(Text)
