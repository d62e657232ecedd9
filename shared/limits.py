"""Bounds on every field and list of the wire contract, in one place.

The orchestrator enforces them on input; the worker keeps within them on output.
"""

import re
from typing import Final

WORKER_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
WORKER_ID_RE: Final = re.compile(WORKER_ID_PATTERN)
# A worker process's instance id (register's ``instance_id``): random per process start.
INSTANCE_ID_PATTERN: Final = r"^[A-Za-z0-9._-]{1,64}$"
MAX_CAPACITY: Final = 100_000
MAX_HELD: Final = MAX_CAPACITY
# Per session the orchestrator takes a tighter bound than MAX_HELD: see ``max_held_for``.
# Generous on purpose: a client testing the contract's `dropped` with a few hundred foreign
# ids must still get its answer; 1,000 entries cost the loop milliseconds, 100,000 a second.
HELD_SLACK: Final = 1_000
MAX_HISTORY: Final = MAX_CAPACITY
MAX_STREAM_IDS_PER_CALL: Final = 10_000
MAX_STREAMS_PER_CREATE: Final = 10_000
# POST /streams/import: one stream per line, any number of lines; a line is one StreamSpec
# (name, url, metadata and labels at their bounds fit well within this).
MAX_IMPORT_LINE_BYTES: Final = 256 * 1024
MAX_REQUEST_COUNT: Final = MAX_CAPACITY
MAX_LABELS: Final = 64
MAX_LABEL_KEY_LEN: Final = 128
MAX_LABEL_VALUE_LEN: Final = 1_024
# Placement rules of a stream (``requires``, ``prefers``): each at most this many labels,
# each label within the worker-label bounds, and each at most this long as canonical JSON
# (ASCII-escaped, sorted keys): the two together form an indexed column (``placement_key``).
MAX_RULE_LABELS: Final = 16
MAX_RULE_BYTES: Final = 1_000
MAX_NAME_LEN: Final = 512
# GET /streams?q=: a substring of a name or url; longer than any name is no search.
MAX_STREAM_SEARCH_LEN: Final = MAX_NAME_LEN
MAX_URL_LEN: Final = 4_096
MAX_ERROR_LEN: Final = 4_096
MAX_METADATA_KEYS: Final = 128
MAX_METADATA_BYTES: Final = 16_384
MAX_STATS_KEYS: Final = 128
MAX_STATS_BYTES: Final = 16_384
MAX_STREAM_ID: Final = 2**63 - 1
# Deeper JSON than this in metadata or stats is refused: answers must be able to echo it.
MAX_JSON_DEPTH: Final = 32
MAX_PAGE_LIMIT: Final = 1_000
DEFAULT_PAGE_LIMIT: Final = 100
MAX_IDEMPOTENCY_KEY_LEN: Final = 200
DEFAULT_MAX_BODY_BYTES: Final = 4 * 1024 * 1024


def max_held_for(capacity: int) -> int:
    """The longest ``held`` a session of a worker with ``capacity`` may send (heartbeat,
    reconcile).

    A worker lists what it runs: what it owns (at most ``capacity``, semantic 2) and
    streams moved away that it still runs until their new owner holds them (planned moves
    are make-before-break, semantic 9: at most what it owned before, another
    ``capacity``). Twice the capacity is therefore the most an honest worker can list;
    the slack absorbs small capacities mid-move and clients that list streams they do not
    own to be told ``dropped`` (the contract's own check). Anything longer is abuse or a
    bug, and would cost the orchestrator per entry.
    """
    return min(MAX_HELD, 2 * capacity + HELD_SLACK)
