"""Pydantic models of every request and answer in the v1 wire contract.

Requests refuse unknown fields (a typo is an error, not a silent no-op); answers ignore
them, so an older client keeps working against a newer orchestrator.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, NotRequired, cast
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializerFunctionWrapHandler,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_serializer,
    with_config,
)
from typing_extensions import TypedDict  # pydantic needs it for TypedDict on 3.11

from shared import limits

WorkerId = Annotated[str, StringConstraints(pattern=limits.WORKER_ID_PATTERN)]
InstanceId = Annotated[str, StringConstraints(pattern=limits.INSTANCE_ID_PATTERN)]
StreamId = Annotated[int, Field(ge=1, le=limits.MAX_STREAM_ID)]
Token = Annotated[int, Field(ge=0, le=limits.MAX_STREAM_ID)]
Epoch = Annotated[int, Field(ge=1, le=limits.MAX_STREAM_ID)]


def storable_text(value: str) -> str:
    """Text every store and every answer can hold: valid UTF-8 (no lone surrogates), no NUL."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid Unicode (no lone surrogates)") from exc
    return value


def _check_tree(value: Any, depth: int) -> None:
    if depth > limits.MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {limits.MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        storable_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            storable_text(str(key))
            _check_tree(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_tree(item, depth + 1)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63 - 1:
        raise ValueError("integers must fit in 64 bits")


def _check_bounded_json(value: dict[str, Any], max_keys: int, max_bytes: int) -> dict[str, Any]:
    if len(value) > max_keys:
        raise ValueError(f"at most {max_keys} keys")
    _check_tree(value, 1)
    if len(json.dumps(value, default=str)) > max_bytes:
        raise ValueError(f"at most {max_bytes} bytes when encoded as JSON")
    return value


def _bounded_json(max_keys: int, max_bytes: int) -> AfterValidator:
    return AfterValidator(lambda value: _check_bounded_json(value, max_keys, max_bytes))


def _wire_time(value: datetime) -> datetime:
    """A timestamp we can store as Unix seconds: naive means UTC, 1970 to 9999."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    if value.year < 1970:
        raise ValueError("must not be before 1970")
    return value


def web_url(value: str) -> str:
    """An absolute ``http://`` or ``https://`` URL (one a dashboard may link to)."""
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValueError("must be an http:// or https:// URL") from exc
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return value


Text = Annotated[str, AfterValidator(storable_text)]
WireTime = Annotated[datetime, AfterValidator(_wire_time)]
WebUrl = Annotated[
    Text, StringConstraints(min_length=1, max_length=limits.MAX_URL_LEN), AfterValidator(web_url)
]


Metadata = Annotated[
    dict[str, Any], _bounded_json(limits.MAX_METADATA_KEYS, limits.MAX_METADATA_BYTES)
]
Stats = Annotated[dict[str, Any], _bounded_json(limits.MAX_STATS_KEYS, limits.MAX_STATS_BYTES)]
LabelKey = Annotated[Text, StringConstraints(min_length=1, max_length=limits.MAX_LABEL_KEY_LEN)]
LabelValue = Annotated[Text, StringConstraints(max_length=limits.MAX_LABEL_VALUE_LEN)]
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=limits.MAX_LABELS)]


def canonical_labels(value: dict[str, str]) -> str:
    """One spelling of a label set: sorted keys, ASCII-escaped, no spaces ("" when empty)."""
    if not value:
        return ""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _bounded_rule(value: dict[str, str]) -> dict[str, str]:
    if len(canonical_labels(value)) > limits.MAX_RULE_BYTES:
        raise ValueError(f"at most {limits.MAX_RULE_BYTES} bytes when encoded as JSON")
    return value


# A stream's placement rule (``requires``, ``prefers``): labels as a worker carries them.
RuleLabels = Annotated[
    dict[LabelKey, LabelValue],
    Field(max_length=limits.MAX_RULE_LABELS),
    AfterValidator(_bounded_rule),
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_timestamp(seconds: float | None) -> datetime | None:
    """Our stores keep Unix seconds; the wire speaks RFC 3339 UTC."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def rfc3339(value: float | datetime) -> str:
    """Unix seconds (or an aware ``datetime``) as RFC 3339 UTC, as pydantic writes one."""
    stamp = value if isinstance(value, datetime) else datetime.fromtimestamp(value, UTC)
    return stamp.astimezone(UTC).isoformat().replace("+00:00", "Z")


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Answer(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamStatus(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"
    QUARANTINED = "quarantined"


class WorkerState(StrEnum):
    ACTIVE = "active"
    SUSPECT = "suspect"
    DRAINING = "draining"
    LOST = "lost"
    LEFT = "left"


class DropReason(StrEnum):
    REASSIGNED = "reassigned"
    REMOVED = "removed"
    DISABLED = "disabled"
    QUARANTINED = "quarantined"
    CAPACITY = "capacity"
    NOT_OWNED = "not_owned"


# --- pieces -------------------------------------------------------------------------


class Held(Answer):
    """A stream the worker runs, with the fencing token it was granted."""

    stream_id: StreamId
    token: Token


class HistoryEntry(Answer):
    """What a worker did with one stream while it could not reach the orchestrator."""

    stream_id: StreamId
    first_processed_at: WireTime
    last_processed_at: WireTime
    count: Annotated[int, Field(ge=0, le=limits.MAX_STREAM_ID)]


class Assignment(Answer):
    stream_id: StreamId
    token: Token
    name: str
    url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    assigned_at: datetime


class Drop(Answer):
    stream_id: StreamId
    reason: DropReason
    owner: str | None = None


HeldList = Annotated[list[Held], Field(max_length=limits.MAX_HELD)]
HistoryList = Annotated[list[HistoryEntry], Field(max_length=limits.MAX_HISTORY)]


# --- worker calls -------------------------------------------------------------------


class RegisterRequest(Request):
    worker_id: WorkerId
    capacity: Annotated[int, Field(ge=0, le=limits.MAX_CAPACITY)]
    labels: Labels = Field(default_factory=dict)
    held: HeldList = Field(default_factory=list)
    local_mode_since: WireTime | None = None
    history: HistoryList = Field(default_factory=list)
    # Extra to the contract: where this worker's health endpoint answers, for operators
    # (the dashboard links to it). Sent only when set, so an orchestrator that does not
    # know the field still takes a registration without it.
    health_url: WebUrl | None = None
    # v1.1: random per process start; a later registration by another instance supersedes
    # this one (its calls get STALE_EPOCH reason "superseded"). None: a v1.0 client.
    instance_id: InstanceId | None = None

    @model_serializer(mode="wrap")
    def _without_unset_extras(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for optional in ("health_url", "instance_id"):
            if data.get(optional) is None:
                data.pop(optional, None)
        return data


class RegisterAnswer(Answer):
    worker_id: str
    epoch: int
    session_token: str
    heartbeat_interval_s: float
    lease_ttl_s: float
    assignments: list[Assignment] = Field(default_factory=list)
    dropped: list[Drop] = Field(default_factory=list)


class HeartbeatRequest(Request):
    epoch: Epoch
    held: HeldList = Field(default_factory=list)
    stats: Stats | None = None


class HeartbeatAnswer(Answer):
    lease_expires_at: datetime
    assignments: list[Assignment] = Field(default_factory=list)
    revoke: list[int] = Field(default_factory=list)
    dropped: list[Drop] = Field(default_factory=list)
    # Beyond the contract: a silent worker's lease ends before this worker's next regular
    # beat; beating again after this many seconds hears at once of the streams it frees.
    next_heartbeat_in_s: float | None = None


class StreamsRequest(Request):
    count: Annotated[int, Field(ge=1, le=limits.MAX_REQUEST_COUNT)]


class StreamsRequestAnswer(Answer):
    assigned: list[Assignment] = Field(default_factory=list)


class ReleaseRequest(Request):
    stream_ids: Annotated[list[StreamId], Field(max_length=limits.MAX_STREAM_IDS_PER_CALL)]


class ReleaseAnswer(Answer):
    released: list[int] = Field(default_factory=list)


class ReconcileRequest(Request):
    epoch: Epoch
    held: HeldList = Field(default_factory=list)
    local_mode_since: WireTime | None = None
    history: HistoryList = Field(default_factory=list)


class ReconcileAnswer(Answer):
    keep: list[Assignment] = Field(default_factory=list)
    drop: list[Drop] = Field(default_factory=list)
    assign: list[Assignment] = Field(default_factory=list)


class FailureReport(Request):
    token: Token
    error: Annotated[Text, StringConstraints(max_length=limits.MAX_ERROR_LEN)]


class FailureAnswer(Answer):
    failures: int
    quarantined: bool


class LeaveAnswer(Answer):
    released: list[int] = Field(default_factory=list)


# --- admin calls --------------------------------------------------------------------

Name = Annotated[Text, StringConstraints(min_length=1, max_length=limits.MAX_NAME_LEN)]
Url = Annotated[Text, StringConstraints(max_length=limits.MAX_URL_LEN)]


class StreamSpec(Request):
    id: StreamId | None = None
    name: Name
    url: Url | None = None
    metadata: Metadata = Field(default_factory=dict)
    requires: RuleLabels = Field(default_factory=dict)
    prefers: RuleLabels = Field(default_factory=dict)


class CreateStreamsRequest(Request):
    streams: Annotated[
        list[StreamSpec], Field(min_length=1, max_length=limits.MAX_STREAMS_PER_CREATE)
    ]


# --- creation in bulk: the same contract, validated without a model per stream ----------

# ``RuleLabels`` without its Python validators.
_RawRule = Annotated[
    dict[
        Annotated[str, StringConstraints(min_length=1, max_length=limits.MAX_LABEL_KEY_LEN)],
        Annotated[str, StringConstraints(max_length=limits.MAX_LABEL_VALUE_LEN)],
    ],
    Field(max_length=limits.MAX_RULE_LABELS),
]


@with_config(ConfigDict(extra="forbid"))
class StreamSpecFields(TypedDict):
    """``StreamSpec`` as a plain dict with the constraints pydantic checks natively; the
    ones written in Python (``storable_text``, the JSON and rule bounds) are left to
    ``stream_specs``, which runs them over the whole batch at once."""

    id: NotRequired[StreamId | None]
    name: Annotated[str, StringConstraints(min_length=1, max_length=limits.MAX_NAME_LEN)]
    url: NotRequired[Annotated[str, StringConstraints(max_length=limits.MAX_URL_LEN)] | None]
    metadata: NotRequired[dict[str, Any]]
    requires: NotRequired[_RawRule]
    prefers: NotRequired[_RawRule]


@with_config(ConfigDict(extra="forbid"))
class _CreateStreamsFields(TypedDict):
    streams: Annotated[
        list[StreamSpecFields],
        Field(min_length=1, max_length=limits.MAX_STREAMS_PER_CREATE),
    ]


_CREATE_FIELDS = TypeAdapter(_CreateStreamsFields)
_SPEC_FIELDS = TypeAdapter(StreamSpecFields)


def _passes_python_checks(specs: list[StreamSpecFields]) -> bool:
    """What ``StreamSpec``'s Python validators would say of a batch that passed the native
    ones: the text of all names, urls and rule labels checked as one string (NUL, lone
    surrogates), and metadata and rules bounded where there are any."""
    texts = [s["name"] for s in specs]
    texts += [url for s in specs if (url := s.get("url"))]
    try:
        for spec in [s for s in specs if "metadata" in s or "requires" in s or "prefers" in s]:
            if spec.get("metadata"):
                _check_bounded_json(
                    spec["metadata"], limits.MAX_METADATA_KEYS, limits.MAX_METADATA_BYTES
                )
            for rule in (spec.get("requires"), spec.get("prefers")):
                if rule:
                    _bounded_rule(rule)
                    texts += rule.keys()
                    texts += rule.values()
        storable_text("".join(texts))
    except ValueError:
        return False
    return True


def stream_specs(value: Any) -> list[StreamSpecFields]:
    """A ``CreateStreamsRequest`` body's streams as dicts (a field left out: its default).

    Valid or not exactly as ``CreateStreamsRequest`` would say: a batch the fast checks
    doubt is validated by the model itself, which raises the error it always has (the
    line errors, their locations and messages). A model instance per stream was most of
    a 10,000-stream create's validation.
    """
    try:
        specs = _CREATE_FIELDS.validate_python(value)["streams"]
    except ValidationError:
        specs = None
    if specs is None or not _passes_python_checks(specs):
        checked = CreateStreamsRequest.model_validate(value)
        return [cast(StreamSpecFields, s.model_dump()) for s in checked.streams]
    return specs


def stream_spec_json(line: bytes) -> StreamSpecFields:
    """One stream of an import (a JSON line), valid exactly as ``StreamSpec`` would say
    (its ``ValidationError`` when not), as ``stream_specs`` gives them."""
    try:
        spec: StreamSpecFields | None = _SPEC_FIELDS.validate_json(line)
    except ValidationError:
        spec = None
    if spec is None or not _passes_python_checks([spec]):
        return cast(StreamSpecFields, StreamSpec.model_validate_json(line).model_dump())
    return spec


# The body of ``POST /streams``: validated by ``stream_specs``, documented (OpenAPI) as
# ``CreateStreamsRequest``.
CreateStreamsBody = Annotated[
    list[StreamSpecFields],
    PlainValidator(stream_specs, json_schema_input_type=CreateStreamsRequest),
]


class Stream(Answer):
    id: int
    name: str
    url: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    status: StreamStatus
    owner: str | None = None
    token: int
    failures: int = 0
    # v1.1: placement rules, and whether any live worker may take the stream now.
    requires: dict[str, str] = Field(default_factory=dict)
    prefers: dict[str, str] = Field(default_factory=dict)
    placeable: bool = True


class CreateStreamsAnswer(Answer):
    created: list[Stream]


class ImportAnswer(Answer):
    """``POST /streams/import``: how many streams were created, in how many batches (each
    its own transaction), and the ids of the first and last."""

    created: int
    batches: int
    first_id: int | None = None
    last_id: int | None = None


class StreamPage(Answer):
    items: list[Stream]
    next_cursor: str | None = None


class StreamPatch(Request):
    status: StreamStatus | None = None
    name: Name | None = None
    url: Url | None = None
    metadata: Metadata | None = None
    requires: RuleLabels | None = None
    prefers: RuleLabels | None = None


class Worker(Answer):
    worker_id: str
    state: WorkerState
    capacity: int
    held: int
    epoch: int
    last_heartbeat_at: datetime | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)
    lease_expires_at: datetime | None = None
    local_mode_since: datetime | None = None
    health_url: str | None = None  # extra: where its health endpoint answers, if it said
    # Extra: the process instance holding the worker id, and where it registered from.
    instance_id: str | None = None
    instance_address: str | None = None


class WorkerList(Answer):
    items: list[Worker]


class Move(Answer):
    stream_id: int
    from_: str | None = Field(alias="from")
    to: str | None = None


MAX_SHARES_SHOWN = 100


class WorkerShare(Answer):
    """A worker against its capacity-weighted fair share (extra to the contract)."""

    worker_id: str
    capacity: int
    held: int  # what it keeps as things stand (streams already being revoked not counted)
    target: int  # its fair share (0 while draining)
    after: int  # what it holds once this rebalance's grants and moves have settled


class Imbalance(Answer):
    """How far the fleet is from its fair shares, in streams (extra to the contract)."""

    before: int  # the largest distance of one worker from its share, now
    after: int  # the same once the rebalance has settled
    unassigned: int  # active streams nobody owns, before the rebalance
    off_target: int = 0  # workers whose share differs from what they hold now
    # Those workers, furthest first (at most ``MAX_SHARES_SHOWN``).
    workers: list[WorkerShare] = Field(default_factory=list)


class RebalanceAnswer(Answer):
    moves: list[Move] = Field(default_factory=list)
    # Extra to the contract: whether this was a preview (``dry_run=true``: nothing
    # changed), how many unowned streams it hands out (or would), and the imbalance.
    dry_run: bool = False
    grants: int = 0
    imbalance: Imbalance | None = None


class ClusterAnswer(Answer):
    workers: dict[str, int]
    streams: dict[str, int]
    assigned: int
    unassigned: int
    capacity: int = 0
    # v1.1: active unowned streams no live worker may take (their ``requires``).
    unplaceable: int = 0


class Event(Answer):
    id: int
    type: str
    at: datetime
    worker_id: str | None = None
    stream_id: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class EventPage(Answer):
    items: list[Event]
    next_after: int


class ErrorDetail(Answer):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(Answer):
    error: ErrorDetail


class Health(Answer):
    status: str


# --- per-worker register tokens (admin) -------------------------------------------------


class WorkerToken(Answer):
    """A per-worker register token as listed: never its secret."""

    token_id: int
    worker_id: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None = None
    revoked_by: str | None = None


class IssuedWorkerToken(WorkerToken):
    """The answer to issuing one: the only time ``token`` (the secret) is shown."""

    token: str


class WorkerTokenList(Answer):
    items: list[WorkerToken]
