"""Ingest's listing saved to the stage folder as Parquet while it is made, so that a resumed ingest
lists no part twice.

Listing a paper-scale corpus is hours of work: 300k class folders' LIST requests, or every byte
of every source shard for a ``webdataset`` source in ``mode: copy``. A coordinator that dies after
that (its node lost, the driver stopped) would otherwise start the listing again. Each batch the
coordinator joins (:class:`~stages.data.listing.ListingBatch`: the columns of a run of parts, in
part order) is written here as it is made, by a background thread; a resumed ingest reads the
batches back, in order from the first part, and lists only the parts after them.

Layout (under ``listing/`` in the stage folder)::

    parts.json                                   what the batches are parts of: count and digest
    parts-0000000-0000153.skipped.jsonl          the skip records of parts 0..152 (written first)
    parts-0000000-0000153.parquet                their kept inputs' columns; with the record
                                                 count and inputs in its metadata, so it marks
                                                 the batch whole (each file appears atomically)

A batch is used only if its parts list digest matches the source's parts now (a class folder or
shard added or removed: listed again) and both files are whole. The files are the stage's own
working files, not outputs: a fresh (not resumed) ingest starts from an empty stage folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StorageError
from pipeline.storage import Storage
from stages.data.listing import ListingBatch
from stages.data.sources import ListingPart, Source

__all__ = ["LISTING_DIR", "SavedListing", "parts_digest"]

log = logging.getLogger(__name__)

LISTING_DIR = "listing"
_PARTS_FILE = "parts.json"
_BATCH = re.compile(r"parts-(\d+)-(\d+)\.parquet$")
# Bump when the columns a source lists change meaning: older saved listings are then listed again.
_FORMAT = 1


def parts_digest(source: Source, parts: list[ListingPart]) -> str:
    """What a saved batch must have been listed from: the source's kind, its class list and every
    part, in order (pure)."""
    digest = hashlib.sha256(json.dumps([_FORMAT, type(source).__name__, source.class_names()]).encode())
    for part in parts:
        digest.update(json.dumps(asdict(part), sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _names(batch_first: int, batch_end: int) -> tuple[str, str]:
    stem = f"parts-{batch_first:07d}-{batch_end:07d}"
    return f"{stem}.parquet", f"{stem}.skipped.jsonl"


class SavedListing:
    """The saved batches of one listing in ``folder``: :meth:`start` reads back those usable, and
    :meth:`save` writes each new batch in a background thread (the coordinator keeps sending
    listing tasks meanwhile); :meth:`close` waits for the writes and raises the first failure."""

    def __init__(self, folder: Storage, source: Source, parts: list[ListingPart]) -> None:
        self.folder = folder
        self.parts = len(parts)
        self.digest = parts_digest(source, parts)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="save-listing")
        self._writes: list[Future[None]] = []

    def start(self, resume: bool) -> Iterator[ListingBatch]:
        """The saved batches, in part order from part 0, that this listing can use (none unless
        ``resume``), each read when asked for: the coordinator spills one before the next is
        read, so a resume does not hold the whole listing in its heap. Anything else in the
        folder (another parts list, a batch after a gap, one unreadable and those after it) is
        removed — now, or when the reading reaches it — so that no stale batch joins a later chain."""
        saved = self._read_parts_file() if resume else None
        if saved != {"parts": self.parts, "digest": self.digest}:
            if saved is not None:
                log.warning("%s: the source's parts changed since the listing was saved; listing again",
                            self.folder.uri)
            self.folder.delete_prefix("")
            self.folder.write_text(_PARTS_FILE, json.dumps({"parts": self.parts, "digest": self.digest}) + "\n")
            return iter(())
        files = {o.path.rsplit("/", 1)[-1] for o in self.folder.list()}
        spans = sorted((int(m.group(1)), int(m.group(2))) for m in map(_BATCH.match, files) if m)
        chain: list[tuple[int, int]] = []
        for first, end in spans:
            if first == (chain[-1][1] if chain else 0) and first < end <= self.parts:
                chain.append((first, end))
            else:  # not in the chain: would be listed again, and saved again
                self._delete(first, end)
        return self._read_chain(chain)

    def _read_chain(self, chain: list[tuple[int, int]]) -> Iterator[ListingBatch]:
        reached = 0
        for n, (first, end) in enumerate(chain):
            batch = self._read(first, end)
            if batch is None:  # listed again from here: this batch and the rest of the chain go
                for span in chain[n:]:
                    self._delete(*span)
                break
            reached = end
            yield batch
        if reached:
            log.info("%s: %d of %d parts read back from the saved listing", self.folder.uri, reached, self.parts)

    def _delete(self, first: int, end: int) -> None:
        for name in _names(first, end):
            self.folder.delete(name)

    def _read_parts_file(self) -> dict | None:
        if not self.folder.exists(_PARTS_FILE):
            return None
        try:
            return json.loads(self.folder.read_text(_PARTS_FILE))
        except ValueError:
            return {}

    def _read(self, first: int, end: int) -> ListingBatch | None:
        table_name, skipped_name = _names(first, end)
        try:
            table = pq.read_table(pa.BufferReader(self.folder.read_bytes(table_name)))
            meta = {k.decode(): int(v) for k, v in (table.schema.metadata or {}).items() if k.startswith(b"vitpipe.")}
            lines = self.folder.read_text(skipped_name).splitlines()
            skipped = [json.loads(line) for line in lines]
        except (OSError, ValueError, pa.ArrowException, StorageError) as err:
            log.warning("%s: saved batch of parts %d..%d unreadable (%s); listing from there",
                        self.folder.uri, first, end - 1, err)
            return None
        if meta.get("vitpipe.skipped") != len(skipped) or "vitpipe.inputs" not in meta:
            log.warning("%s: saved batch of parts %d..%d incomplete; listing from there", self.folder.uri, first, end - 1)
            return None
        # One chunk, as the batch was joined: Parquet reads back in pieces of 128k rows, and
        # Listing.take costs a call per chunk a shard's rows fall in (300M inputs: ~2300, not ~80).
        return ListingBatch(first, end, table.replace_schema_metadata(None).combine_chunks(), skipped,
                            meta["vitpipe.inputs"], meta.get("vitpipe.record_end"))

    def save(self, batch: ListingBatch) -> None:
        self._raise_failed()
        self._writes.append(self._writer.submit(self._write, batch))

    def _write(self, batch: ListingBatch) -> None:
        table_name, skipped_name = _names(batch.first_part, batch.end_part)
        # The skip records first: the Parquet file, written second, is what marks the batch whole.
        self.folder.write_text(skipped_name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in batch.skipped))
        meta = {b"vitpipe.inputs": str(batch.inputs).encode(), b"vitpipe.skipped": str(len(batch.skipped)).encode(),
                **({b"vitpipe.record_end": str(batch.record_end).encode()} if batch.record_end is not None else {})}
        with self.folder.open_write(table_name) as f:
            pq.write_table(batch.table.replace_schema_metadata(meta), f, compression="zstd")

    def _raise_failed(self) -> None:
        for write in [w for w in self._writes if w.done()]:
            self._writes.remove(write)
            write.result()  # raises the write's failure

    def close(self) -> None:
        """Wait for every write; raise the first failure."""
        try:
            for write in self._writes:
                write.result()
        finally:
            self._writes = []
            self._writer.shutdown(wait=True)
