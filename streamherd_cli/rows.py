"""Streams to import, read from CSV, JSON lines or SQL records, each checked against the
wire contract (``shared.models.StreamSpec``) before anything is sent.

Columns: ``id`` (optional), ``name``, ``url``, ``metadata`` (a JSON object), ``labels`` (a
JSON object or ``k=v,k=v``; kept as ``metadata.labels``), ``requires`` and ``prefers``
(the stream's placement rules, written as ``labels`` is). Any other column is copied into
``metadata`` under its own name, except the read-only columns an export writes
(``status``, ``owner``, ``token``, ``failures``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final, Literal

from pydantic import ValidationError

from shared.models import StreamSpec
from streamherd_cli.errors import UsageError

# Streams brought in from a source that ``--sync`` keeps in step carry its name here, so a
# later pass knows which streams are its own (and may be disabled when their row goes).
SOURCE_KEY: Final = "streamherd_source"
READ_ONLY_COLUMNS: Final = frozenset({"status", "owner", "token", "failures", "placeable"})
# Placement rules: sent only when the input has the column (an orchestrator older than
# v1.1 refuses the fields).
RULE_COLUMNS: Final = ("requires", "prefers")
EXPORT_COLUMNS: Final = ("id", "name", "url", "metadata", "status", "owner", "token", "failures")

Format = Literal["csv", "jsonl"]


@dataclass(frozen=True)
class ColumnMap:
    """Which input column holds which field (``--id-column`` and friends)."""

    id: str = "id"
    name: str = "name"
    url: str = "url"
    metadata: str = "metadata"
    labels: str = "labels"

    @property
    def mapped(self) -> frozenset[str]:
        return frozenset((self.id, self.name, self.url, self.metadata, self.labels, *RULE_COLUMNS))


@dataclass(frozen=True)
class Row:
    """One input record: a valid wire ``spec``, or the reason it was ``refused``."""

    where: str
    spec: dict[str, Any] = field(default_factory=dict)
    fields: frozenset[str] = frozenset()
    refused: str | None = None

    @property
    def id(self) -> int | None:
        value = self.spec.get("id")
        return value if isinstance(value, int) else None


def json_safe(value: Any) -> Any:
    """A database value as JSON can carry it (dates as ISO text, decimals as text...)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return json.loads(json.dumps(value, default=str))


def _labels(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    text = str(value).strip()
    if text.startswith("{"):
        decoded = json.loads(text)
        if not isinstance(decoded, dict):
            raise ValueError("labels must be a JSON object or k=v,k=v")
        return {str(k): str(v) for k, v in decoded.items()}
    labels: dict[str, str] = {}
    for part in text.replace(";", ",").split(","):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"labels must be k=v pairs, not {part.strip()!r}")
        labels[key.strip()] = val.strip()
    return labels


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def to_row(
    record: dict[str, Any], where: str, columns: ColumnMap = ColumnMap(), source: str | None = None
) -> Row:
    """Check one record; never raises."""
    try:
        spec: dict[str, Any] = {}
        given = {"name"}
        raw_id = record.get(columns.id)
        if not _blank(raw_id):
            if isinstance(raw_id, bool) or not isinstance(raw_id, int | str):
                raise ValueError(f"id must be an integer, not {raw_id!r}")
            try:
                spec["id"] = int(raw_id)
            except ValueError:
                raise ValueError(f"id must be an integer, not {raw_id!r}") from None
        name = record.get(columns.name)
        spec["name"] = "" if name is None else str(name).strip()
        if columns.url in record:
            given.add("url")
            url = record[columns.url]
            spec["url"] = None if _blank(url) else str(url).strip()
        metadata: dict[str, Any] = {}
        raw_meta = record.get(columns.metadata)
        if columns.metadata in record:
            given.add("metadata")
        if not _blank(raw_meta):
            decoded = json.loads(raw_meta) if isinstance(raw_meta, str) else raw_meta
            if not isinstance(decoded, dict):
                raise ValueError("metadata must be a JSON object")
            metadata.update(decoded)
        raw_labels = record.get(columns.labels)
        if columns.labels in record:
            given.add("metadata")
        if not _blank(raw_labels):
            labels = _labels(raw_labels)
            if labels:
                metadata["labels"] = labels
        for rule in RULE_COLUMNS:
            if rule in record:
                given.add(rule)
                spec[rule] = {} if _blank(record[rule]) else _labels(record[rule])
        for key, value in record.items():
            if key in columns.mapped or key in READ_ONLY_COLUMNS or key is None or _blank(value):
                continue
            metadata[str(key)] = json_safe(value)
            given.add("metadata")
        if source is not None:
            metadata[SOURCE_KEY] = source
            given.add("metadata")
        spec["metadata"] = metadata
        model = StreamSpec.model_validate(spec)
    except ValidationError as exc:
        return Row(where=where, spec=_partial(record, columns), refused=_one_line(exc))
    except (ValueError, TypeError) as exc:
        return Row(where=where, spec=_partial(record, columns), refused=str(exc))
    wire = model.model_dump(mode="json", exclude_none=True)
    for rule in RULE_COLUMNS:
        if rule not in given:
            wire.pop(rule, None)
    return Row(where=where, spec=wire, fields=frozenset(given))


def _partial(record: dict[str, Any], columns: ColumnMap) -> dict[str, Any]:
    """What a refusal report can show of a bad record."""
    shown: dict[str, Any] = {}
    try:
        shown["id"] = int(record[columns.id])
    except (KeyError, TypeError, ValueError):
        pass
    if not _blank(record.get(columns.name)):
        shown["name"] = str(record[columns.name])[:80]
    return shown


def _one_line(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in error["loc"]) or "stream"
        parts.append(f"{loc}: {str(error['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


# --- files ------------------------------------------------------------------------------


def detect_format(path: str, head: str) -> Format:
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    return "jsonl" if head.lstrip().startswith("{") else "csv"


def read_text(path: str) -> str:
    try:
        if path == "-":
            import sys

            return sys.stdin.read()
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from exc


def records(text: str, fmt: Format) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
    """(where, record, None) per input record, or (where, None, why it is not one)."""
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None:
            return
        for record in reader:
            yield f"line {reader.line_num}", dict(record), None
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            decoded = json.loads(line)
        except ValueError as exc:
            yield f"line {number}", None, f"not JSON: {exc}"
            continue
        if not isinstance(decoded, dict):
            yield f"line {number}", None, "not a JSON object"
            continue
        yield f"line {number}", decoded, None


def file_rows(
    path: str, fmt: Format | None, columns: ColumnMap, source: str | None = None
) -> list[Row]:
    text = read_text(path)
    chosen = fmt or detect_format(path, text[:64])
    rows = []
    for where, record, problem in records(text, chosen):
        if record is None:
            rows.append(Row(where=where, refused=problem))
        else:
            rows.append(to_row(record, where, columns, source))
    return rows


# --- export -----------------------------------------------------------------------------


def write_export(streams: Iterable[dict[str, Any]], out: IO[str], fmt: Format) -> int:
    """Streams as ``import`` reads them back; returns how many were written."""
    count = 0
    if fmt == "jsonl":
        for stream in streams:
            line = {key: stream.get(key) for key in EXPORT_COLUMNS}
            out.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n")
            count += 1
        return count
    writer = csv.DictWriter(out, fieldnames=list(EXPORT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for stream in streams:
        line = {key: stream.get(key) for key in EXPORT_COLUMNS}
        line["metadata"] = json.dumps(stream.get("metadata") or {}, ensure_ascii=False)
        line["url"] = stream.get("url") or ""
        line["owner"] = stream.get("owner") or ""
        writer.writerow(line)
        count += 1
    return count
