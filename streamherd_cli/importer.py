"""Bringing a list of streams into the catalogue, safely twice: what exists is matched and
left alone (or patched), what is new is created in batches, what is bad is reported.

Matching: a row with an ``id`` is that stream. A row without one is matched on its ``url``
(``--match url``, the default; a row without a url falls back to its name) or its
``name`` (``--match name``) against the catalogue as it is when the import starts, and
against the rows before it. With ``vanish_source`` (``--sync``), streams carrying that
source's name (``rows.SOURCE_KEY`` in their metadata) whose row is gone are disabled, and
disabled ones whose row is back are enabled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from shared import limits
from streamherd_cli.client import Client
from streamherd_cli.errors import Refused
from streamherd_cli.rows import SOURCE_KEY, Row

MatchRule = Literal["url", "name"]
DEFAULT_BATCH_SIZE: Final = limits.MAX_STREAMS_PER_CREATE
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Refusal:
    where: str
    id: int | None
    name: str | None
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"where": self.where, "id": self.id, "name": self.name, "reason": self.reason}


@dataclass
class Report:
    created: list[int] = field(default_factory=list)
    existing: list[int] = field(default_factory=list)
    differing: list[int] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)
    disabled: list[int] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "existing": self.existing,
            "differing": self.differing,
            "updated": self.updated,
            "disabled": self.disabled,
            "refused": [r.as_json() for r in self.refused],
        }

    def summary(self) -> str:
        differ = f" ({len(self.differing)} differ: --update applies them)" if self.differing else ""
        return (
            f"created {len(self.created)}, existing {len(self.existing)}{differ}, "
            f"updated {len(self.updated)}, disabled {len(self.disabled)}, "
            f"refused {len(self.refused)}"
        )

    def pass_summary(self) -> str:
        return (
            f"added {len(self.created)}, updated {len(self.updated)}, "
            f"disabled {len(self.disabled)}, unchanged {len(self.existing)}, "
            f"refused {len(self.refused)}"
        )


class Catalogue:
    """The orchestrator's streams, indexed the ways an import matches rows."""

    def __init__(self, streams: Sequence[dict[str, Any]]) -> None:
        self.streams = list(streams)
        self.by_id: dict[int, dict[str, Any]] = {}
        self.by_url: dict[str, dict[str, Any]] = {}
        self.by_name: dict[str, dict[str, Any]] = {}
        for stream in self.streams:
            self.by_id[int(stream["id"])] = stream
            if stream.get("url"):
                self.by_url.setdefault(str(stream["url"]), stream)
            self.by_name.setdefault(str(stream["name"]), stream)

    @classmethod
    def load(cls, client: Client) -> Catalogue:
        return cls(list(client.iter_streams()))

    def match(self, spec: dict[str, Any], rule: MatchRule) -> dict[str, Any] | None:
        if "id" in spec:
            return self.by_id.get(int(spec["id"]))
        if rule == "url" and spec.get("url"):
            return self.by_url.get(str(spec["url"]))
        return self.by_name.get(str(spec["name"]))


def row_key(spec: dict[str, Any], rule: MatchRule) -> tuple[str, Any]:
    if "id" in spec:
        return ("id", int(spec["id"]))
    if rule == "url" and spec.get("url"):
        return ("url", spec["url"])
    return ("name", spec["name"])


def changes(stream: dict[str, Any], row: Row) -> dict[str, Any]:
    """The PATCH that makes ``stream`` what ``row`` says (only the fields the input has)."""
    patch: dict[str, Any] = {}
    if stream.get("name") != row.spec["name"]:
        patch["name"] = row.spec["name"]
    if "url" in row.fields and stream.get("url") != row.spec.get("url"):
        patch["url"] = row.spec.get("url")
    if "metadata" in row.fields and (stream.get("metadata") or {}) != row.spec["metadata"]:
        patch["metadata"] = row.spec["metadata"]
    for rule in ("requires", "prefers"):
        if rule in row.fields and (stream.get(rule) or {}) != row.spec[rule]:
            patch[rule] = row.spec[rule]
    return patch


def run_import(
    client: Client,
    rows: Sequence[Row],
    *,
    match: MatchRule = "url",
    update: bool = False,
    vanish_source: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], Progress] | None = None,
) -> Report:
    """One pass. ``progress(total)`` is called once and returns the advance callback."""
    batch_size = max(1, min(batch_size, limits.MAX_STREAMS_PER_CREATE))
    report = Report()
    catalogue = Catalogue.load(client)
    seen: dict[tuple[str, Any], str] = {}
    to_create: list[Row] = []
    to_patch: list[tuple[int, dict[str, Any]]] = []
    matched: set[int] = set()
    for row in rows:
        if row.refused is not None:
            report.refused.append(_refusal(row, row.refused))
            continue
        key = row_key(row.spec, match)
        if key in seen:
            report.refused.append(_refusal(row, f"same {key[0]} as {seen[key]} in the input"))
            continue
        seen[key] = row.where
        stream = catalogue.match(row.spec, match)
        if stream is None:
            to_create.append(row)
            continue
        stream_id = int(stream["id"])
        matched.add(stream_id)
        patch = changes(stream, row)
        if vanish_source is not None and stream.get("status") == "disabled":
            patch["status"] = "active"
        if patch and update:
            to_patch.append((stream_id, patch))
        else:
            report.existing.append(stream_id)
            if patch:
                report.differing.append(stream_id)
    to_disable: list[int] = []
    if vanish_source is not None:
        to_disable = [
            int(s["id"])
            for s in catalogue.streams
            if (s.get("metadata") or {}).get(SOURCE_KEY) == vanish_source
            and int(s["id"]) not in matched
            and s.get("status") == "active"
        ]
    advance = (
        progress(len(to_create) + len(to_patch) + len(to_disable)) if progress else lambda n: None
    )
    # Rows with ids go first: a row without one takes the next free id, which must not be
    # an id a later row of the same input asks for.
    to_create.sort(key=lambda row: row.id is None)
    for start in range(0, len(to_create), batch_size):
        batch = to_create[start : start + batch_size]
        _create(client, batch, report)
        advance(len(batch))
    for stream_id, patch in to_patch:
        _patch(client, stream_id, patch, report.updated, report)
        advance(1)
    for stream_id in to_disable:
        _patch(client, stream_id, {"status": "disabled"}, report.disabled, report)
        advance(1)
    return report


def _refusal(row: Row, reason: str) -> Refusal:
    name = row.spec.get("name")
    return Refusal(row.where, row.id, str(name) if name else None, reason)


# Refusals of a whole batch that one row can cause: find the row, send the others.
_ROW_CODES: Final = frozenset({"VALIDATION_ERROR", "CONFLICT"})


def _create(client: Client, batch: list[Row], report: Report) -> None:
    pending = list(batch)
    while pending:
        try:
            created = client.create_streams([row.spec for row in pending])
        except Refused as exc:
            if exc.code not in _ROW_CODES:
                raise
            taken = {int(i) for i in exc.details.get("ids", []) if isinstance(i, int)}
            if exc.code == "CONFLICT" and taken:
                # Created since we read the catalogue: existing if it is this row's stream.
                for row in pending:
                    if row.id in taken:
                        _taken(client, row, report)
                pending = [row for row in pending if row.id not in taken]
                continue
            if len(pending) == 1:
                report.refused.append(_refusal(pending[0], f"{exc.code}: {exc.message}"))
                return
            for row in pending:
                _create(client, [row], report)
            return
        report.created.extend(int(stream["id"]) for stream in created)
        return


def _taken(client: Client, row: Row, report: Report) -> None:
    assert row.id is not None
    stream = client.stream(row.id)
    if stream.get("name") == row.spec["name"] and stream.get("url") == row.spec.get("url"):
        report.existing.append(row.id)
    else:
        report.refused.append(_refusal(row, f"id {row.id} belongs to another stream"))


def _patch(
    client: Client, stream_id: int, patch: dict[str, Any], done: list[int], report: Report
) -> None:
    try:
        client.patch_stream(stream_id, patch)
    except Refused as exc:
        if exc.code not in ("VALIDATION_ERROR", "NOT_FOUND", "CONFLICT"):
            raise
        report.refused.append(Refusal(f"stream {stream_id}", stream_id, None, str(exc)))
        return
    done.append(stream_id)
