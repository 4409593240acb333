"""Ingest's listing as compact Arrow columns, never one Python object per input in one process.

A listing task (one per part of a source: class folder, source shard, Parquet file) lists its part
as :class:`~stages.data.sources.SourceItem` s, screens them (:func:`screen_items`) and sends back
the kept ones as a :class:`ListingChunk`: an Arrow IPC stream of the columns below plus the skip
records. The coordinator joins the chunks into a :class:`Listing` — copied into batches (at least
16 MB, and a sixteenth of what is joined) as they come, so the chunks do not pile up; each batch
saved to the stage folder as it is made (:mod:`stages.data.saved_listing`) and, given a spill
folder on local disk, moved out of the heap into a memory-mapped file (:func:`spill`) — and plans
shards from its columns (``stages.ingest.plan_shards``). Items are made again only in the task that writes a
shard (and in tests). Skip records are held as columns too (:class:`~stages.data.skips.SkipLog`).

Columns: ``key`` (string), ``split`` (dictionary, int8 indices), ``label`` (dictionary, int32
indices), ``size`` (int64, null when unknown), and the source's own locator columns
(:meth:`Source.locator_columns`): for an ImageFolder an extension code and a path that is null
unless it differs from key + extension, so a folder input costs its key and ~18 bytes
(``bench/ingest_scale.py``: ~51 B an input as columns, ~88 at the peak from listing to plan held in
the heap, against ~630 B as Python objects; spilled, the heap holds the plan's row numbers and
scratch, and the columns are file pages the kernel can drop and read back).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import VitpipeError
from stages.data.images import IMAGE_EXTENSIONS
from stages.data.skips import SkipLog

if TYPE_CHECKING:
    from stages.data.sources import Source, SourceItem

log = logging.getLogger(__name__)

__all__ = ["ListingChunk", "ListingBatch", "ListingRows", "Listing", "ListingBuilder", "encode_chunk", "screen_items",
           "skip_record", "small_dictionary", "spill", "filesystem_type", "unique_key_order", "row_numbers", "BASE_COLUMNS"]

BASE_COLUMNS = ("key", "split", "label", "size")
_SMALL = pa.dictionary(pa.int8(), pa.string())  # splits, extensions: a handful of values
_MAX_SPLITS = 100
# Chunks are copied out of their transport buffers in batches of at least this size, and of a
# sixteenth of what is joined so far: ~80 batches at 300M inputs (a shard's rows are taken from
# every batch they fall in, a call each), while unjoined chunks stay within ~6% of the listing.
_COMBINE_BYTES = 16 << 20
_COMBINE_FRACTION = 16
_DUPLICATE_WINDOW = 1 << 16  # keys compared this many at a time (a window's keys are copied)


def skip_record(item: SourceItem, kind: str, reason: str) -> dict[str, str]:
    """A skip record: ``kind`` is what the manifest counts by, ``reason`` the detail."""
    return {"origin": item.origin, "kind": kind, "reason": reason}


def screen_items(items: Iterable[SourceItem]) -> tuple[list[SourceItem], list[dict[str, str]]]:
    """Drop items that cannot be ingested before reading them: refused entries, missing labels,
    non-image files, duplicate keys (the first in source order is kept). Returns (kept,
    skipped-with-reasons). A listing task screens its part; keys repeated across parts are found
    by :func:`unique_key_order`."""
    kept, skipped, seen = [], [], {}
    for item in items:
        ext = posixpath.splitext(item.filename)[1].lower() if item.filename else ""
        if item.refused is not None:
            skipped.append(skip_record(item, "refused", item.refused))
        elif item.label is None:
            skipped.append(skip_record(item, "missing label", "missing label"))
        elif ext and ext[1:] not in IMAGE_EXTENSIONS:
            skipped.append(skip_record(item, "unsupported file type", f"unsupported file type {ext}"))
        elif item.key in seen:
            skipped.append(duplicate_record(item, seen[item.key]))
        else:
            seen[item.key] = item.origin
            kept.append(item)
    return kept, skipped


def duplicate_record(item: SourceItem, kept_origin: str) -> dict[str, str]:
    return skip_record(item, "duplicate key", f"duplicate key {item.key!r} (kept {kept_origin})")


def small_dictionary(values: list[str | None]) -> pa.Array:
    """A dictionary column with int8 indices (a few distinct values: 1 byte per row)."""
    return pa.array(values, pa.string()).dictionary_encode().cast(_SMALL)


@dataclass(frozen=True)
class ListingChunk:
    """What a listing task sends back: its kept items' columns as an Arrow IPC stream (a plain
    ``bytes`` object: Ray copies it into the coordinator, so nothing stays pinned in the object
    store), the skip records of its part and how many inputs the part had; for a byte range of a
    list file, the bytes its records span (:meth:`Source.list_part`)."""

    data: bytes
    skipped: list[dict[str, str]]
    inputs: int
    span: tuple[int, int] | None = None

    def table(self) -> pa.Table:
        return _read_ipc(self.data)


def encode_chunk(source: Source, items: list[SourceItem], span: tuple[int, int] | None = None) -> ListingChunk:
    """Screen one part's items and keep the rest as columns (in a listing task)."""
    kept, skipped = screen_items(items)
    splits = {item.split for item in kept}
    if len(splits) > _MAX_SPLITS:
        raise VitpipeError(f"{len(splits)} different split names (at most {_MAX_SPLITS}): check the source's split column")
    table = pa.table({
        "key": pa.array([item.key for item in kept], pa.string()),
        "split": small_dictionary([item.split for item in kept]),
        "label": pa.array([item.label for item in kept], pa.string()).dictionary_encode(),
        "size": pa.array([item.size for item in kept], pa.int64()),
        **source.locator_columns(kept),
    })
    return ListingChunk(_ipc_bytes(table), skipped, len(items), span)


def _read_ipc(data: bytes | pa.MemoryMappedFile) -> pa.Table:
    source = pa.py_buffer(data) if isinstance(data, bytes) else data
    return pa.ipc.open_stream(source).read_all()  # zero-copy over ``data``


def _write_ipc(table: pa.Table, sink: Any) -> None:
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _ipc_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    _write_ipc(table, sink)
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class ListingRows:
    """Some rows of a listing as an Arrow IPC stream, dictionaries decoded (a shard's 1000 labels,
    not the corpus's 21k names): what a shard-writing task gets, to make its items itself."""

    data: bytes

    def items(self, source: Source) -> list[SourceItem]:
        table = _read_ipc(self.data)
        return Listing(source, table, SkipLog(), table.num_rows).items(np.arange(table.num_rows))


class Listing:
    """Every kept input of a source as columns, in listing order (row numbers address them)."""

    def __init__(self, source: Source, table: pa.Table, skipped: SkipLog, inputs: int,
                 spilled_to: str | None = None) -> None:
        self.source = source
        self.table = table
        self.skipped = skipped  # screened out in the listing tasks
        self.inputs = inputs  # kept + skipped
        self.spilled_to = spilled_to  # the folder whose (unlinked) files hold the columns, if not the heap
        lengths = [len(chunk) for chunk in table.column(0).chunks]  # every column is chunked alike
        self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

    def take(self, column: str, rows: np.ndarray | list[int]) -> pa.Array:
        """``column`` at ``rows``, taken chunk by chunk: Arrow's take on a chunked string column
        first joins every chunk (a copy of the whole column for each call)."""
        rows = np.asarray(rows, dtype=np.int64)
        values = self.table.column(column)
        if not len(rows):
            return pa.array([], values.type)
        chunk_of = np.searchsorted(self._offsets, rows, side="right") - 1
        by_chunk = np.argsort(chunk_of, kind="stable")
        grouped_rows, grouped_chunks = rows[by_chunk], chunk_of[by_chunk]
        starts = np.flatnonzero(np.diff(grouped_chunks, prepend=-1))  # where each chunk's rows begin
        pieces = []
        for a, b in zip(starts, [*starts[1:], len(rows)], strict=True):
            chunk = int(grouped_chunks[a])
            pieces.append(values.chunk(chunk).take(pa.array(grouped_rows[a:b] - self._offsets[chunk])))
        grouped = pa.concat_arrays(pieces)  # = rows[by_chunk]: put back in the order asked
        return grouped.take(pa.array(np.argsort(by_chunk)))

    def __len__(self) -> int:
        return self.table.num_rows

    @classmethod
    def of_items(cls, source: Source, items: list[SourceItem]) -> Listing:
        builder = ListingBuilder(source)
        builder.add(encode_chunk(source, items))
        return builder.finish()

    def values(self, column: str) -> list[str]:
        """A dictionary column's values (one dictionary for every chunk), in code order."""
        chunks = self.table.column(column).chunks
        return chunks[0].dictionary.to_pylist() if chunks else []

    def codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        """A dictionary column as (code per row, values)."""
        chunks = self.table.column(column).chunks
        if not chunks:
            return np.zeros(0, np.int32), []
        return np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in chunks]), self.values(column)

    def digest(self, rows: np.ndarray, class_of_label: np.ndarray, settings: tuple) -> str:
        """What a shard's bytes depend on besides the source files — the rows' keys, locator
        columns and class indices (``class_of_label``: by label code), and ``settings`` — hashed
        from the columns, no item made (300M inputs: minutes, not an hour)."""
        digest = hashlib.sha256(json.dumps(list(settings)).encode())
        for name in self.table.column_names:
            if name == "label":
                labels = self.take("label", rows)
                digest.update(class_of_label[labels.indices.to_numpy(zero_copy_only=False)].astype("<i8").tobytes())
            elif name not in BASE_COLUMNS or name == "key":
                digest.update(name.encode())
                _hash_values(digest, self.take(name, rows))
        return digest.hexdigest()[:24]

    def sizes(self, rows: np.ndarray) -> np.ndarray:
        """Known sizes of ``rows`` (0 where unknown)."""
        return pc.fill_null(self.take("size", rows), 0).to_numpy()

    def rows(self, rows: np.ndarray) -> ListingRows:
        """``rows`` as a :class:`ListingRows`: a shard to send, without making its items here."""
        columns = {}
        for name in self.table.column_names:
            values = self.take(name, rows)
            columns[name] = values.dictionary_decode() if pa.types.is_dictionary(values.type) else values
        return ListingRows(_ipc_bytes(pa.table(columns)))

    def items(self, rows: np.ndarray | list[int]) -> list[SourceItem]:
        """The items at ``rows``, in that order (a shard's worth at a time: they are Python objects)."""
        part = {name: self.take(name, rows).to_pylist() for name in self.table.column_names}
        located = [name for name in part if name not in BASE_COLUMNS]
        columns = [part[name] for name in located]
        make = self.source.item_from
        return [make(key, split, label, size, dict(zip(located, loc, strict=True)))
                for key, split, label, size, *loc in zip(part["key"], part["split"], part["label"], part["size"],
                                                        *columns, strict=True)]


@dataclass(frozen=True)
class ListingBatch:
    """Joined listing columns of the parts ``first_part .. end_part - 1`` (in part order), with
    their skip records and input count: what the coordinator holds, and what it saves to the
    stage folder (:mod:`stages.data.saved_listing`) so that a resumed ingest lists no part twice.
    ``record_end``: where the last part's records end, for a list file's byte ranges."""

    first_part: int
    end_part: int
    table: pa.Table
    skipped: list[dict[str, str]]
    inputs: int
    record_end: int | None = None


def spill(table: pa.Table, folder: str) -> pa.Table:
    """``table`` written to a file in ``folder`` (an Arrow IPC stream, as chunks travel) and read
    back memory-mapped (no copy):
    its columns leave the heap and become file pages, which the kernel drops under memory pressure
    and reads back when touched, instead of the coordinator being killed for memory. The file is
    unlinked before it is written — written and mapped through its descriptor, it lives until the
    table is freed — so nothing is left behind, whatever ends the process, even mid-write (where
    the process has no ``/proc/self/fd``, it is unlinked once mapped). ``folder`` should be a
    local disk (not NFS): the plan reads the columns at random (the key sort)."""
    fd, path = tempfile.mkstemp(prefix="vitpipe-listing-", suffix=".arrow", dir=folder)
    by_fd = f"/proc/self/fd/{fd}"
    try:
        if os.path.exists(by_fd):
            os.unlink(path)
            path = by_fd
        with open(fd, "wb", closefd=False) as sink:
            _write_ipc(table, sink)
        return _read_ipc(pa.memory_map(path, "r"))
    finally:
        os.close(fd)
        if path != by_fd and os.path.exists(path):
            os.unlink(path)


# File systems whose files are memory: spilling to them moves the columns from the heap to
# shared memory, which the kernel cannot drop (only swap).
_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs"})


def filesystem_type(path: str, mounts: str) -> str:
    """The type of the file system ``path`` is on, from ``mounts`` (``/proc/mounts``'s text): the
    longest mount point that contains it (pure)."""
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def memory_backed(folder: str) -> str | None:
    """The memory file system ``folder`` is on (a tmpfs ``/tmp``), or None (also off Linux)."""
    try:
        with open("/proc/mounts") as mounts:
            kind = filesystem_type(os.path.realpath(folder), mounts.read())
    except OSError:  # not Linux: nothing to tell
        return None
    return kind if kind in _MEMORY_FILESYSTEMS else None


def warn_if_memory_backed(folder: str) -> None:
    """A warning when ``folder`` is on a memory file system (a tmpfs ``/tmp``): spilled there, the
    listing saves no memory."""
    kind = memory_backed(folder)
    if kind is not None:
        log.warning("%s is on %s (memory): the listing spilled there stays in memory; set TMPDIR to a local "
                    "disk on the ingest coordinator's node", folder, kind)


class ListingBuilder:
    """Joins chunks, one per part in part order, as they arrive, copying them into batches (their
    transport buffers freed); ``on_batch`` hears of each batch as it is made. With ``spill_dir``
    each batch is then moved out of the heap (:func:`spill`): at 300M inputs the columns are ~15 GB
    of file pages rather than heap the coordinator must hold."""

    def __init__(self, source: Source, on_batch: Callable[[ListingBatch], None] | None = None,
                 spill_dir: str | None = None) -> None:
        self.source = source
        self._on_batch = on_batch
        self._spill_dir = spill_dir
        if spill_dir is not None:
            warn_if_memory_backed(spill_dir)
        self._batches: list[pa.Table] = []
        self._pending: list[ListingChunk] = []
        self._pending_bytes = 0
        self.skipped = SkipLog()
        self.inputs = 0
        self.parts = 0  # parts joined so far (pending ones included)
        self.record_end: int | None = None  # where the last part's records end (a list file's byte range)
        self.nbytes = 0  # what the joined columns hold so far

    @property
    def pending_bytes(self) -> int:
        """What the chunks not yet joined hold in the heap."""
        return self._pending_bytes

    def add(self, chunk: ListingChunk) -> None:
        self.nbytes += len(chunk.data)
        self.parts += 1
        self.record_end = chunk.span and chunk.span[1]
        self._pending.append(chunk)
        self._pending_bytes += len(chunk.data)
        if self._pending_bytes >= max(_COMBINE_BYTES, self.nbytes // _COMBINE_FRACTION):
            self.flush()

    def add_batch(self, batch: ListingBatch) -> None:
        """A batch joined before (a saved one, read back): it must continue the parts joined so far."""
        if self._pending or batch.first_part != self.parts:
            raise ValueError(f"batch of parts {batch.first_part}..{batch.end_part - 1} after {self.parts} parts")
        self.nbytes += batch.table.nbytes
        self.parts = batch.end_part
        self.record_end = batch.record_end
        self._keep(self._spilled(batch))

    def flush(self) -> None:
        """Join the pending chunks into a batch now (also when listing fails: what is joined is saved)."""
        if self._pending:
            chunks, self._pending, self._pending_bytes = self._pending, [], 0
            # One dictionary per batch, then one contiguous copy: the chunks' bytes are let go.
            table = pa.concat_tables([chunk.table() for chunk in chunks]).unify_dictionaries().combine_chunks()
            batch = self._spilled(ListingBatch(self.parts - len(chunks), self.parts, table,
                                               [record for chunk in chunks for record in chunk.skipped],
                                               sum(chunk.inputs for chunk in chunks),
                                               chunks[-1].span and chunks[-1].span[1]))
            del table, chunks  # spilled: the heap copy goes now, not when the saving thread is done
            self._keep(batch)
            if self._on_batch is not None:
                self._on_batch(batch)

    def _spilled(self, batch: ListingBatch) -> ListingBatch:
        if self._spill_dir is None:
            return batch
        return replace(batch, table=spill(batch.table, self._spill_dir))

    def _keep(self, batch: ListingBatch) -> None:
        self._batches.append(batch.table)
        self.skipped.extend(batch.skipped)
        self.inputs += batch.inputs

    def finish(self) -> Listing:
        self.flush()
        if not self._batches:
            raise VitpipeError("the listing has no parts")
        # One dictionary per column: each batch's codes are rebuilt against it, in the heap even when
        # spilled (label codes, 4 bytes an input: ~1.2 GB at 300M, within the bench's heap peak).
        table = pa.concat_tables(self._batches).unify_dictionaries()
        self._batches = []
        return Listing(self.source, table, self.skipped, self.inputs, self._spill_dir)


def _hash_values(digest: Any, values: pa.Array) -> None:
    """Feed ``values`` to ``digest`` canonically: which are null, then the values (strings as
    their lengths and bytes), whatever the array's offset or buffers' padding."""
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    digest.update(np.asarray(values.is_null().to_numpy(zero_copy_only=False), dtype=np.uint8).tobytes())
    if pa.types.is_string(values.type):
        offsets = np.frombuffer(values.buffers()[1], np.int32)[values.offset:values.offset + len(values) + 1]
        digest.update(np.diff(offsets).astype("<i4").tobytes())
        digest.update(memoryview(values.buffers()[2])[offsets[0]:offsets[-1]] if len(values) else b"")
    else:
        digest.update(pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype("<i8").tobytes())


def unique_key_order(listing: Listing) -> tuple[np.ndarray, SkipLog]:
    """Rows in key order, the first in listing order of each key kept (the sort is stable), and a
    skip record for each later row with a key already taken. Keys are compared a window at a time,
    so no second copy of the key column is made."""
    order = row_numbers(pc.sort_indices(listing.table.column("key")).to_numpy())
    pa.default_memory_pool().release_unused()  # the sort's buffers: else kept by the allocator, not reused by numpy
    keep = np.ones(len(order), dtype=bool)
    for start in range(0, max(len(order) - 1, 0), _DUPLICATE_WINDOW):
        window = listing.take("key", order[start:start + _DUPLICATE_WINDOW + 1])
        same = pc.equal(window.slice(1), window.slice(0, len(window) - 1))
        keep[start + 1:start + len(window)] &= ~np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool)
    dropped, kept_positions = np.flatnonzero(~keep), np.flatnonzero(keep)
    # The kept row of each dropped one: the last kept position at or before it (sorted keys).
    firsts = kept_positions[np.searchsorted(kept_positions, dropped, side="right") - 1]
    skipped = SkipLog()  # millions of duplicates at 300M: records as columns, items a window at a time
    for start in range(0, len(dropped), _DUPLICATE_WINDOW):
        window = slice(start, start + _DUPLICATE_WINDOW)
        items = listing.items(np.concatenate([order[dropped[window]], order[firsts[window]]]))  # a take per column
        half = len(items) // 2
        skipped.extend(duplicate_record(duplicate, kept.origin)
                       for duplicate, kept in zip(items[:half], items[half:], strict=True))
    return order[keep], skipped


def row_numbers(rows: np.ndarray) -> np.ndarray:
    """Row numbers in 4 bytes each where they fit (300M rows do), else 8."""
    return rows.astype(np.uint32 if len(rows) < 2**32 else np.int64)
