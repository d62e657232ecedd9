"""``stream_specs``, the bulk validation of ``POST /streams``: it accepts exactly what
``CreateStreamsRequest`` accepts, with the same values, and refuses with its very errors."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared import limits
from shared import models as m

FIELDS = ("id", "name", "url", "metadata", "requires", "prefers")


def by_model(body: Any) -> list[dict[str, Any]]:
    """The model's verdict: its streams with every field, or its line errors."""
    try:
        return [s.model_dump() for s in m.CreateStreamsRequest.model_validate(body).streams]
    except ValidationError as exc:
        return [{"errors": exc.errors(include_url=False, include_context=False)}]


def by_bulk(body: Any) -> list[dict[str, Any]]:
    try:
        specs = m.stream_specs(body)
    except ValidationError as exc:
        return [{"errors": exc.errors(include_url=False, include_context=False)}]
    # A field left out stands for its default.
    defaults: dict[str, Any] = {
        "id": None,
        "url": None,
        "metadata": {},
        "requires": {},
        "prefers": {},
    }
    return [{k: dict(s).get(k, defaults.get(k)) for k in FIELDS} for s in specs]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


TRICKY: list[Any] = [
    {"streams": [{"name": "a"}]},
    {"streams": [{"name": "a", "id": 5, "url": None, "metadata": {"k": [1, {"x": None}]}}]},
    {"streams": [{"name": "ünïcode ☃", "url": "http://r/ü"}]},
    {"streams": [{"name": "a\x00"}]},
    {"streams": [{"name": "ok"}, {"name": "lone \ud800"}]},
    {"streams": [{"name": "ok", "url": "bad \udfff"}]},
    {"streams": [{"name": "a", "requires": {"zone": "eu\x00"}}]},
    {"streams": [{"name": "a", "requires": {"\ud800": "x"}}]},
    {"streams": [{"name": "a", "metadata": {"k\x00": 1}}]},
    {"streams": [{"name": "a", "metadata": {"deep": _nested(limits.MAX_JSON_DEPTH + 1)}}]},
    {"streams": [{"name": "a", "metadata": {"big": 2**64}}]},
    {"streams": [{"name": "a", "metadata": {"s": "x" * (limits.MAX_METADATA_BYTES + 1)}}]},
    {
        "streams": [
            {"name": "a", "metadata": {str(i): i for i in range(limits.MAX_METADATA_KEYS + 1)}}
        ]
    },
    {"streams": [{"name": "a", "prefers": {"k": "v" * (limits.MAX_RULE_BYTES + 1)}}]},
    {"streams": [{"name": "a", "requires": {"": "x"}}]},
    {"streams": [{"name": "a", "requires": {"k": 1}}]},
    {"streams": [{"name": ""}]},
    {"streams": [{"name": "x" * (limits.MAX_NAME_LEN + 1)}]},
    {"streams": [{"name": "a", "id": 0}]},
    {"streams": [{"name": "a", "id": "7"}]},
    {"streams": [{"name": "a", "id": True}]},
    {"streams": [{"name": "a", "id": 1.5}]},
    {"streams": [{"name": "a", "extra": 1}]},
    {"streams": [{"nam": "a"}]},
    {"streams": []},
    {"streams": [{"name": "a"}] * (limits.MAX_STREAMS_PER_CREATE + 1)},
    {"streams": "nope"},
    {"streams": [{"name": "a"}], "more": 1},
    {},
    [],
    "text",
    None,
]


@pytest.mark.parametrize("body", TRICKY, ids=range(len(TRICKY)))
def test_same_verdict_as_the_model(body: Any) -> None:
    """Accepted with the same values, or refused with the same line errors."""
    assert by_bulk(body) == by_model(body)


def test_a_bad_item_at_the_end_of_a_full_batch_is_found_where_the_model_finds_it() -> None:
    """Item 9,999's NUL is reported at its own location, as the model reports it."""
    body: dict[str, Any] = {"streams": [{"name": f"s{i}"} for i in range(10_000)]}
    body["streams"][-1] = {"name": "bad\x00"}
    with pytest.raises(ValidationError) as exc:
        m.stream_specs(body)
    assert [e["loc"] for e in exc.value.errors()] == [("streams", 9_999, "name")]


def test_a_json_line_is_validated_as_a_stream_spec() -> None:
    """An import's line: the same values as ``StreamSpec``, or its error."""
    line = json.dumps({"name": "a", "requires": {"zone": "eu"}}).encode()
    assert dict(m.stream_spec_json(line)) == {"name": "a", "requires": {"zone": "eu"}}
    with pytest.raises(ValidationError) as exc:
        m.stream_spec_json(b'{"name": "a\\u0000"}')
    assert exc.value.errors()[0]["loc"] == ("name",)


texts = st.text(max_size=6)
labels = st.dictionaries(texts, texts, max_size=3)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda c: st.lists(c, max_size=3),
    max_leaves=5,
)
specs = st.fixed_dictionaries(
    {"name": texts},
    optional={
        "id": st.none() | st.integers(min_value=-2, max_value=5) | texts,
        "url": st.none() | texts | st.integers(),
        "metadata": st.dictionaries(texts, json_values, max_size=3) | st.integers(),
        "requires": labels,
        "prefers": labels | st.dictionaries(texts, st.integers(), max_size=2),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.lists(specs, min_size=0, max_size=4))
def test_same_verdict_on_generated_bodies(streams: list[dict[str, Any]]) -> None:
    """Any body of small generated streams: the bulk path agrees with the model."""
    body = {"streams": streams}
    assert by_bulk(body) == by_model(body)
