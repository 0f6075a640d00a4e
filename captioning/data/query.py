"""A tiny query language that names a reproducible slice of a dataset.

Grammar (no spaces inside a query; surrounding spaces are ignored):

    query  := name [ "[" split { "+" split } "]" ] [ "-" size [ "s" seed ] ]
    name   := lower-case letter, then lower-case letters, digits or "_"
    split  := same form as name
    size   := positive integer: sample this many records
    seed   := non-negative integer (default DEFAULT_SEED)

Examples: `flickr8k[test]`, `flickr8k[train+val]-5000s7`, `mscoco[train]-1000s42`.
A bare name (`flickr8k`) means every split of the dataset. A seed only matters
when sampling, so it is only accepted after a size.

Sampling is the same on every machine: records are sorted by image id, then
`random.Random(seed).sample` picks them (never Python's `hash()`, which is
salted per process). The selection keeps that sorted order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

from captioning.data.records import Dataset, Record

DEFAULT_SEED = 0

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_DIGITS = re.compile(r"[0-9]+")


class QueryError(ValueError):
    """A query that cannot be parsed or selected; the message shows where and why.

    `reason` is the one-line explanation, `query` the text and `position` the
    index of the offending character (the caret in the message).
    """

    def __init__(self, reason: str, query: str = "", position: int | None = None):
        self.reason = reason
        self.query = query
        self.position = position
        super().__init__(self._render())

    def _render(self) -> str:
        if self.position is None:
            return self.reason
        return (
            f"{self.reason} (at position {self.position})\n"
            f"  {self.query}\n"
            f"  {' ' * self.position}^"
        )


@dataclass(frozen=True)
class Query:
    """A parsed query. `splits` is empty for a bare dataset name (every split)."""

    dataset: str
    splits: tuple[str, ...] = ()
    size: int | None = None
    seed: int = DEFAULT_SEED
    # Where each part sits in the original text, so later checks can point at it.
    text: str = field(default="", compare=False, repr=False)
    spans: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __str__(self) -> str:
        return format_query(self)


def format_query(query: Query) -> str:
    """The canonical text of a query; `parse_query(format_query(q)) == q`."""
    text = query.dataset
    if query.splits:
        text += "[" + "+".join(query.splits) + "]"
    if query.size is not None:
        text += f"-{query.size}"
        if query.seed != DEFAULT_SEED:
            text += f"s{query.seed}"
    return text


class _Scanner:
    """Reads a query left to right and raises QueryError at the current position."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, expected: str, position: int | None = None) -> QueryError:
        position = self.pos if position is None else position
        if position >= len(self.text):
            found = "end of query"
        else:
            found = repr(self.text[position])
        return QueryError(f"bad query {self.text!r}: expected {expected}, found {found}", self.text, position)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self, pattern: re.Pattern, expected: str) -> tuple[str, int]:
        match = pattern.match(self.text, self.pos)
        if not match:
            raise self.fail(expected)
        start, self.pos = self.pos, match.end()
        return match.group(), start


def parse_query(text: str) -> Query:
    """Parse `name[split+split]-N sSEED` (see the module doc) into a Query."""
    if not isinstance(text, str):
        raise QueryError(f"a query is text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise QueryError("empty query: expected a dataset name such as flickr8k[test]")
    scan = _Scanner(text)
    spans: dict = {}
    dataset, spans["dataset"] = scan.take(_NAME, "a dataset name (lower-case letters, digits, '_')")

    splits: list[str] = []
    if scan.peek() == "[":
        scan.pos += 1
        while True:
            name, start = scan.take(_NAME, "a split name such as train, val or test")
            if name in splits:
                raise QueryError(f"bad query {text!r}: split {name!r} is listed twice", text, start)
            splits.append(name)
            spans.setdefault("splits", {})[name] = start
            if scan.peek() == "+":
                scan.pos += 1
                continue
            if scan.peek() == "]":
                scan.pos += 1
                break
            raise scan.fail("'+' or ']' after a split name")

    size = None
    seed = DEFAULT_SEED
    if scan.peek() == "-":
        scan.pos += 1
        digits, spans["size"] = scan.take(_DIGITS, "a sample size (a positive integer) after '-'")
        size = int(digits)
        if size < 1:
            raise QueryError(f"bad query {text!r}: the sample size must be at least 1", text, spans["size"])
        if scan.peek() == "s":
            scan.pos += 1
            digits, spans["seed"] = scan.take(_DIGITS, "a seed (a non-negative integer) after 's'")
            seed = int(digits)

    if scan.pos != len(text):
        if size is None and not splits:
            expected = "'[' (splits), '-' (sample size) or the end of the query"
        elif size is None:
            expected = "'-' (sample size) or the end of the query"
        elif "seed" not in spans:
            expected = "'s' (seed) or the end of the query"
        else:
            expected = "the end of the query"
        raise scan.fail(expected)
    return Query(dataset, tuple(splits), size, seed, text=text, spans=spans)


def _known_splits() -> dict[str, tuple[str, ...]]:
    """Dataset name -> split names, from the dataset registry."""
    from captioning.data.datasets import DATASETS

    result = {}
    for name, spec in DATASETS.items():
        splits = spec["splits"] if isinstance(spec, dict) else getattr(spec, "splits")
        result[name] = tuple(splits)
    return result


def _point(query: Query, reason: str, position: int | None) -> QueryError:
    text = query.text or format_query(query)
    return QueryError(f"bad query {text!r}: {reason}", text, position)


def _split_position(query: Query, split: str) -> int | None:
    if query.text:
        return query.spans.get("splits", {}).get(split)
    text = format_query(query)
    return text.find(split, len(query.dataset))


def check_query(query: Query) -> tuple[str, ...]:
    """Check the dataset and split names against the registry; returns the splits to read."""
    known = _known_splits()
    if query.dataset not in known:
        names = ", ".join(sorted(known))
        raise _point(query, f"unknown dataset {query.dataset!r} (known: {names})", 0)
    splits = known[query.dataset]
    for split in query.splits:
        if split not in splits:
            reason = f"{query.dataset} has no split {split!r} (its splits: {', '.join(splits)})"
            raise _point(query, reason, _split_position(query, split))
    return query.splits or splits


def select(query: Query | str, loader: Callable[[str], Dataset] | None = None) -> list[Record]:
    """The records a query names, in image-id order; sampled deterministically when it has a size.

    `loader(name) -> Dataset` defaults to `load_dataset`. A size larger than the
    selected splits hold is an error, not a silent shortfall.
    """
    if isinstance(query, str):
        query = parse_query(query)
    splits = check_query(query)
    if loader is None:
        from captioning.data.datasets import load_dataset as loader
    dataset = loader(query.dataset)
    records = sorted(
        (record for record in dataset.records if record.split in splits),
        key=lambda record: (record.image_id, record.split),
    )
    if query.size is None:
        return records
    if query.size > len(records):
        text = query.text or format_query(query)
        position = query.spans.get("size") if query.text else text.rfind("-") + 1
        reason = (
            f"sample size {query.size} is larger than the {len(records)} records in "
            f"{query.dataset}[{'+'.join(splits)}]"
        )
        raise _point(query, reason, position)
    chosen = sorted(random.Random(query.seed).sample(range(len(records)), query.size))
    return [records[index] for index in chosen]
