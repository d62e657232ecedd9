"""Placement rules: which workers may take a stream (``requires``) and which it would
rather have (``prefers``), as pure functions over labels.

A stream's two rules are stored as one canonical string, its *placement key* ("" for a
stream without rules); its *eligibility class* is the canonical ``requires`` alone ("" for
an unconstrained stream). A worker is eligible for a class when it is active, has
capacity, and carries every required label with the required value. How many streams of
each class each worker should hold is ``balancing.class_targets``'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from shared.models import canonical_labels

UNCONSTRAINED = ""


def placement_key(requires: Mapping[str, str], prefers: Mapping[str, str]) -> str:
    """The canonical string of a stream's rules; "" when it has none."""
    if not requires and not prefers:
        return UNCONSTRAINED
    return json.dumps(
        {"p": dict(prefers), "r": dict(requires)},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )


@dataclass(frozen=True)
class Rule:
    """A placement key read back."""

    requires: Mapping[str, str] = field(default_factory=dict)
    prefers: Mapping[str, str] = field(default_factory=dict)

    @property
    def class_key(self) -> str:
        """The eligibility class: canonical ``requires``."""
        return canonical_labels(dict(self.requires))


@lru_cache(maxsize=4096)
def parse_key(key: str) -> Rule:
    if not key:
        return Rule()
    data = json.loads(key)
    return Rule(requires=data.get("r", {}), prefers=data.get("p", {}))


@lru_cache(maxsize=4096)
def parse_class(class_key: str) -> Mapping[str, str]:
    """The ``requires`` labels of an eligibility class."""
    return {} if not class_key else dict(json.loads(class_key))


def satisfies(labels: Mapping[str, str], requires: Mapping[str, str]) -> bool:
    """The worker's labels carry every required key with the required value."""
    return all(labels.get(k) == v for k, v in requires.items())


def preference(labels: Mapping[str, str], prefers: Mapping[str, str]) -> int:
    """How many preferred labels the worker carries (more wins a tie)."""
    return sum(1 for k, v in prefers.items() if labels.get(k) == v)


@dataclass(frozen=True)
class Eligibility:
    """The labels of every worker that may be given streams now: answers, per class,
    whether any of them may take it (``placeable``)."""

    labels: tuple[Mapping[str, str], ...]
    _known: dict[str, bool] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, workers: Iterable[Mapping[str, str]]) -> Eligibility:
        return cls(tuple(workers))

    def placeable_class(self, class_key: str) -> bool:
        known = self._known.get(class_key)
        if known is None:
            requires = parse_class(class_key)
            known = any(satisfies(labels, requires) for labels in self.labels)
            self._known[class_key] = known
        return known

    def placeable(self, key: str) -> bool:
        """Whether a stream with placement key ``key`` has an eligible worker."""
        return self.placeable_class(parse_key(key).class_key)

    @property
    def anyone(self) -> bool:
        return bool(self.labels)
