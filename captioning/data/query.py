"""A tiny query language that names a reproducible slice of a dataset.

Grammar (no spaces inside a query; spaces around one are ignored):

    query  := name [ "[" split { "+" split } "]" ] [ "-" size [ "s" seed ] ]
    name   := lower-case letter, then lower-case letters, digits or "_"
    split  := same form as name
    size   := positive integer: sample this many records
    seed   := non-negative integer (default DEFAULT_SEED)

Examples: `flickr8k[test]`, `flickr8k[train+val]-5000s7`, `mscoco[train]-1000s42`.
A bare name (`flickr8k`) means every split of the dataset. A seed only matters
when sampling, so it is only accepted after a size.

A selection joins queries with `+` outside brackets (inside them `+` joins splits):

    selection := query { "+" query }

e.g. `flickr8k[train]-1000s42+feedback[train]`. Each query is sampled on its own;
the records come part by part, a record that two parts both select only once.
An image id is unique only within its dataset, so every selected record carries
the name of its dataset (`SelectedRecord.dataset`): that, not the id alone,
says which image (and which feature store) it is.

Sampling is the same on every machine: records are sorted by image id, then
`random.Random(seed).sample` picks them (never Python's `hash()`, which is
salted per process). The selection keeps that sorted order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

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


@dataclass(frozen=True)
class SelectedRecord(Record):
    """A record as `select` returns it: with the name of the dataset it came from.

    An image id is unique only within its dataset, so `key` (dataset, image id)
    is what tells two records of a union apart.
    """

    dataset: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.dataset, self.image_id)


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
    """Reads one query, text[start:end], left to right; errors point into the whole text."""

    def __init__(self, text: str, start: int = 0, end: int | None = None):
        self.text = text
        self.pos = start
        self.end = len(text) if end is None else end

    def error(self, reason: str, position: int) -> QueryError:
        return QueryError(f"bad query {self.text!r}: {reason}", self.text, position)

    def fail(self, expected: str, position: int | None = None) -> QueryError:
        position = self.pos if position is None else position
        if position >= len(self.text):
            found = "end of query"
        else:
            found = repr(self.text[position])
        return self.error(f"expected {expected}, found {found}", position)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < self.end else ""

    def take(self, pattern: re.Pattern, expected: str) -> tuple[str, int]:
        match = pattern.match(self.text, self.pos, self.end)
        if not match:
            raise self.fail(expected)
        start, self.pos = self.pos, match.end()
        return match.group(), start


def parse_query(text: str) -> Query:
    """Parse `name[split+split]-N sSEED` (see the module doc) into a Query."""
    text = _clean(text)
    return _parse_part(text, 0, len(text))


def parse_selection(text: str) -> list[Query]:
    """Parse one query or several joined by `+` outside brackets: `flickr8k[train]+feedback`.

    Errors point into the whole text (an empty part, `a++b`, a trailing `+`, or any
    error inside a part). Each Query keeps the whole text, so later checks
    (`check_query`, `select`) point into it as well.
    """
    text = _clean(text)
    queries = []
    parts = _split_parts(text)
    for number, (start, end) in enumerate(parts):
        first, last = start, end
        while first < last and text[first].isspace():
            first += 1
        while last > first and text[last - 1].isspace():
            last -= 1
        if first == last:
            where = "before" if number == 0 else "after"
            found = "end of query" if end >= len(text) else repr(text[end])
            raise QueryError(f"bad query {text!r}: empty part: expected a query {where} '+', found {found}",
                             text, end)
        queries.append(_parse_part(text, first, last, union=True))
    return queries


def format_selection(queries: Sequence[Query]) -> str:
    """The canonical text of a selection; `parse_selection(format_selection(qs)) == qs`."""
    return "+".join(format_query(query) for query in queries)


def _clean(text: str) -> str:
    if not isinstance(text, str):
        raise QueryError(f"a query is text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise QueryError("empty query: expected a dataset name such as flickr8k[test]")
    return text


def _split_parts(text: str) -> list[tuple[int, int]]:
    """(start, end) of each part: `+` separates parts only outside brackets."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(0, depth - 1)
        elif char == "+" and depth == 0:
            parts.append((start, index))
            start = index + 1
    parts.append((start, len(text)))
    return parts


def _parse_part(text: str, start: int, end: int, union: bool = False) -> Query:
    """The query in text[start:end]; the Query keeps the whole text and positions into it.

    `union`: the part belongs to a selection, where a `+` may follow it.
    """
    scan = _Scanner(text, start, end)
    spans: dict = {}
    dataset, spans["dataset"] = scan.take(_NAME, "a dataset name (lower-case letters, digits, '_')")

    splits: list[str] = []
    if scan.peek() == "[":
        scan.pos += 1
        while True:
            name, at = scan.take(_NAME, "a split name such as train, val or test")
            if name in splits:
                raise scan.error(f"split {name!r} is listed twice", at)
            splits.append(name)
            spans.setdefault("splits", {})[name] = at
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
            raise scan.error("the sample size must be at least 1", spans["size"])
        if scan.peek() == "s":
            scan.pos += 1
            digits, spans["seed"] = scan.take(_DIGITS, "a seed (a non-negative integer) after 's'")
            seed = int(digits)

    if scan.pos != end:
        options = ["'[' (splits)"] if size is None and not splits else []
        if size is None:
            options.append("'-' (sample size)")
        elif "seed" not in spans:
            options.append("'s' (seed)")
        if union:
            options.append("'+' (another query)")
        expected = ", ".join(options) + " or the end of the query" if options else "the end of the query"
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
        position = query.spans.get("dataset", 0) if query.text else 0
        raise _point(query, f"unknown dataset {query.dataset!r} (known: {names})", position)
    splits = known[query.dataset]
    for split in query.splits:
        if split not in splits:
            reason = f"{query.dataset} has no split {split!r} (its splits: {', '.join(splits)})"
            raise _point(query, reason, _split_position(query, split))
    return query.splits or splits


def _size_position(query: Query) -> int | None:
    if query.text:
        return query.spans.get("size")
    return format_query(query).rfind("-") + 1


def as_queries(selection: Query | str | Sequence[Query]) -> list[Query]:
    """A selection as its list of queries: text is parsed, a Query is a selection of one."""
    if isinstance(selection, Query):
        return [selection]
    if isinstance(selection, str):
        return parse_selection(selection)
    queries = list(selection)
    if not queries or not all(isinstance(query, Query) for query in queries):
        raise QueryError("a selection is query text, a Query or a non-empty list of them")
    return queries


def select(selection: Query | str | Sequence[Query],
           loader: Callable[[str], Dataset] | None = None) -> list[SelectedRecord]:
    """The records a query (or a `+` union of queries) names.

    Per query: image-id order, sampled deterministically when it has a size; a union
    lists its parts in order, a record two parts both select once. `loader(name) -> Dataset`
    defaults to `load_dataset`. Every part is checked before any dataset is read; a size
    larger than the selected splits hold is an error, not a silent shortfall.
    """
    queries = as_queries(selection)
    splits = [check_query(query) for query in queries]
    if loader is None:
        from captioning.data.datasets import load_dataset as loader
    loaded: dict[str, Dataset] = {}
    result: list[SelectedRecord] = []
    seen: set[tuple[str, str, str]] = set()
    for query, names in zip(queries, splits):
        if query.dataset not in loaded:
            loaded[query.dataset] = loader(query.dataset)
        for record in _select_one(query, names, loaded[query.dataset]):
            key = (query.dataset, record.image_id, record.split)
            if key not in seen:
                seen.add(key)
                result.append(record)
    return result


def select_by_dataset(selection: Query | str | Sequence[Query],
                      loader: Callable[[str], Dataset] | None = None) -> dict[str, list[SelectedRecord]]:
    """`select`, grouped by dataset (in order of first appearance): one feature store each."""
    groups: dict[str, list[SelectedRecord]] = {}
    for record in select(selection, loader):
        groups.setdefault(record.dataset, []).append(record)
    return groups


def _select_one(query: Query, splits: tuple[str, ...], dataset: Dataset) -> list[SelectedRecord]:
    records = sorted(
        (record for record in dataset.records if record.split in splits),
        key=lambda record: (record.image_id, record.split),
    )
    if query.size is not None:
        if query.size > len(records):
            reason = (
                f"sample size {query.size} is larger than the {len(records)} records in "
                f"{query.dataset}[{'+'.join(splits)}]"
            )
            raise _point(query, reason, _size_position(query))
        chosen = sorted(random.Random(query.seed).sample(range(len(records)), query.size))
        records = [records[index] for index in chosen]
    return [SelectedRecord(record.image_id, record.path, record.split, record.captions, query.dataset)
            for record in records]
