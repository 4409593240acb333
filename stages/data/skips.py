"""Ingest's skip records held as Arrow columns, not one Python dict per skipped input.

A web-scraped corpus can skip tens of millions of inputs — sidecar ``.json``/``.txt`` files in
class folders, broken downloads — and the ingest coordinator holds every record until it writes
``skipped.jsonl``. As columns — origin; kind and reason as dictionary codes, each distinct value
once per batch of records — a record costs about the length of its origin: 128 bytes against 347
as a dict (``python bench/ingest_scale.py --skips 3000000``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator

import pyarrow as pa

__all__ = ["SkipLog"]

_FIELDS = ("origin", "kind", "reason")
_BATCH = 1 << 16  # records gathered as dicts before they become columns


class SkipLog:
    """Skip records (``{"origin", "kind", "reason"}``), in the order they were added."""

    def __init__(self, records: Iterable[dict[str, str]] = ()) -> None:
        self._tables: list[pa.Table] = []
        self._pending: list[dict[str, str]] = []
        self.extend(records)

    def extend(self, records: Iterable[dict[str, str]]) -> None:
        for record in records:
            self._pending.append(record)
            if len(self._pending) >= _BATCH:
                self._seal()

    def add(self, other: SkipLog) -> None:
        """``other``'s records after these, its columns taken as they are."""
        self._seal()
        self._tables.extend(other._tables)
        self._pending = list(other._pending)

    def _seal(self) -> None:
        if self._pending:
            columns = {name: pa.array([record[name] for record in self._pending], pa.string()) for name in _FIELDS}
            # A handful of kinds; reasons mostly repeat ("unsupported file type .json"), some are
            # unique (a duplicate names its key): each distinct one is kept once per batch.
            columns["kind"] = columns["kind"].dictionary_encode()
            columns["reason"] = columns["reason"].dictionary_encode()
            self._tables.append(pa.table(columns))
            self._pending = []

    def __len__(self) -> int:
        return sum(t.num_rows for t in self._tables) + len(self._pending)

    def records(self) -> Iterator[dict[str, str]]:
        """Every record, in order (made a batch at a time)."""
        for table in self._tables:
            yield from table.to_pylist()
        yield from (dict(record) for record in self._pending)

    def first(self, n: int) -> list[dict[str, str]]:
        return list(itertools.islice(self.records(), n))

    def counts_by_kind(self) -> dict[str, int]:
        counts: Counter[str] = Counter(record["kind"] for record in self._pending)
        for table in self._tables:
            for kind, count in zip(*_value_counts(table.column("kind")), strict=True):
                counts[kind] += count
        return dict(sorted(counts.items()))


def _value_counts(column: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counts = column.combine_chunks().dictionary_decode().value_counts()
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()
