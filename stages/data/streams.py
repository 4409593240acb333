"""Reading one canonical stream (:mod:`stages.data.order`) from tar shards, from any position.

A stream's pieces are read by :class:`PieceReader` objects that stream the tar as its bytes
arrive (local files, or S3 bodies that survive faults: ``pipeline.storage``); on remote storage
each runs in a thread filling a small queue, and ``read_ahead`` pieces are started before they
are needed, so the first byte of the next shard is rarely waited for. :class:`StreamReader`
takes samples from them in the stream's read order and releases them through the stream's
shuffle buffer: the same samples, in the same order, as
:func:`~stages.data.order.stream_order` computes from the shard sizes alone.

Resuming at stream index ``i`` replays the shuffle on sample *slots* (no data read) to find what
the buffer held and how far each open piece had been read; only those pieces are read again,
up to where they were, to refill the buffer. Damaged data is not an error here: a sample a
damaged or short shard lacks comes out as a record with the reason, in its place in the order.
Storage failures (after the storage's own retries) are raised.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pipeline.storage import Storage
from stages.data.order import OrderSpec, Piece, ShuffleBuffer, Slot, order_rng, read_order
from stages.data.tarshards import BadShard, ShardInfo, iter_tar_samples

__all__ = ["Sample", "PieceReader", "StreamReader"]

_END = object()


@dataclass(frozen=True)
class Sample:
    """A slot's content: the sample's key and members, or why there is none."""

    slot: Slot
    key: str
    files: dict[str, bytes] | None  # None: unreadable (``problem`` says why)
    problem: str | None = None


class PieceReader:
    """The samples ``piece.start .. piece.stop - 1`` of one shard.

    ``threaded``: a thread reads ahead into a small queue — for remote storage, where the first
    byte of a shard and every refill of the connection's buffer take a round trip. On a local
    disk the page cache answers at once, and a thread would only contend for the GIL with the
    decoding, so the samples are read as they are taken.
    """

    def __init__(self, storage: Storage, info: ShardInfo, piece: Piece, threaded: bool,
                 queue_size: int = 16) -> None:
        self.piece = piece
        self._storage = storage
        self._info = info
        self._samples = self._read()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        if threaded:
            self._queue = queue.Queue(maxsize=queue_size)
            threading.Thread(target=self._fill, name=f"read {info.path}", daemon=True).start()

    def _read(self) -> Iterator[Sample]:
        piece, info = self.piece, self._info
        position, problem = 0, None
        try:
            with self._storage.open_read(info.path) as f:
                for key, files in iter_tar_samples(f, name=info.path):
                    if position >= piece.stop:
                        break
                    if position >= piece.start:  # earlier samples belong to another piece: read, not decoded
                        yield Sample(Slot(piece.shard, position, piece.draw), key, files)
                    position += 1
        except BadShard as err:  # damaged data: its remaining samples are recorded, not read
            problem = str(err)
        for missing in range(max(position, piece.start), piece.stop):
            reason = problem or f"{info.path}: the shard ends after {position} samples, {info.samples} expected"
            yield Sample(Slot(piece.shard, missing, piece.draw), f"{info.path}#{missing}", None, reason)

    def _put(self, item: object) -> bool:
        assert self._queue is not None
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        last: object = _END
        try:
            for sample in self._samples:
                if not self._put(sample):
                    return
        except BaseException as err:  # noqa: BLE001 - a storage failure reaches the consumer, who raises it
            last = err
        finally:
            self._samples.close()  # the open object, now
        self._put(last)  # the consumer never waits on a thread that is gone

    def take(self) -> Sample:
        if self._queue is None:
            item: object = next(self._samples, _END)
        else:
            item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            raise RuntimeError(f"{self._info.path}: read past the end of piece {self.piece}")
        return item  # type: ignore[return-value]

    def close(self) -> None:
        self._stop.set()
        if self._queue is None:
            self._samples.close()


class StreamReader:
    """The samples of stream ``stream`` of epoch ``epoch``, from stream index ``start`` on."""

    def __init__(self, storage: Storage, shards: Sequence[ShardInfo], pieces: Sequence[Piece], spec: OrderSpec,
                 epoch: int, stream: int, start: int = 0, read_ahead: int = 2) -> None:
        self._storage = storage
        self._remote = storage.local_path() is None  # read ahead in threads only where reads wait
        self._shards = shards
        self._pieces = list(pieces)
        self._spec = spec
        self._read_ahead = read_ahead
        self._readers: dict[tuple[int, int], PieceReader] = {}
        self._next_piece = 0  # the first piece no reader was started for
        self._reads = read_order(self._pieces, spec.open_shards)
        self._buffer = ShuffleBuffer(spec.shuffle_buffer, order_rng("buffer", spec.seed, epoch, stream))
        self._drain: Iterator[object] | None = None
        self._index = start
        try:
            if start:
                self._resume(start)
            self._start_ahead()
        except BaseException:
            self.close()  # no reader thread outlives a failed start
            raise

    # -- readers ---------------------------------------------------------------------------------

    def _start_reader(self, piece: Piece) -> PieceReader:
        reader = PieceReader(self._storage, self._shards[piece.shard], piece, threaded=self._remote)
        self._readers[(piece.shard, piece.draw)] = reader
        return reader

    def _start_ahead(self) -> None:
        """Keep the next pieces' readers going: the ``open_shards`` being read and ``read_ahead`` more,
        so a piece's first bytes are on their way before its first sample is needed."""
        wanted = self._spec.open_shards + self._read_ahead
        while len(self._readers) < wanted and self._next_piece < len(self._pieces):
            piece = self._pieces[self._next_piece]
            self._next_piece += 1
            if (piece.shard, piece.draw) not in self._readers:
                self._start_reader(piece)

    def _fetch(self, slot: Slot) -> Sample:
        key = (slot.shard, slot.draw)
        reader = self._readers[key]  # pieces are read in list order, and started ahead of that
        sample = reader.take()
        assert sample.slot == slot, (sample.slot, slot)
        if slot.index == reader.piece.stop - 1:
            reader.close()
            del self._readers[key]
            self._start_ahead()
        return sample

    # -- resuming --------------------------------------------------------------------------------

    def _resume(self, start: int) -> None:
        """Replay ``start`` releases on slots, then refill the buffer with the samples it held."""
        cursors: dict[tuple[int, int], int] = {}  # piece -> samples read so far
        released = 0
        while released < start:
            if self._drain is None:
                slot = next(self._reads, None)
                if slot is None:
                    self._drain = self._buffer.drain()
                    continue
                cursors[(slot.shard, slot.draw)] = slot.index + 1
                if self._buffer.push(slot) is not None:
                    released += 1
            else:
                if next(self._drain, _END) is _END:
                    raise ValueError(f"stream position {start} is past the stream's end ({released} samples)")
                released += 1
        held: dict[tuple[int, int], set[int]] = {}
        for slot in self._buffer.items:
            held.setdefault((slot.shard, slot.draw), set()).add(slot.index)
        found: dict[Slot, Sample] = {}
        refill: list[tuple[PieceReader, int, set[int], bool]] = []
        for index, piece in enumerate(self._pieces):
            key = (piece.shard, piece.draw)
            if key not in cursors:
                break  # this piece and the ones after it were never started
            self._next_piece = index + 1
            cursor, wanted = cursors[key], held.get(key, set())
            if cursor == piece.stop and not wanted:
                continue  # read and released entirely
            # Every piece to read again is started before any is consumed: on S3 they load together.
            finished = cursor == piece.stop
            refill.append((self._start_reader(piece), max(wanted) + 1 if finished else cursor, wanted, finished))
        for reader, until, wanted, finished in refill:
            for _ in range(reader.piece.start, until):
                sample = reader.take()
                if sample.slot.index in wanted:
                    found[sample.slot] = sample
            if finished:
                reader.close()
                del self._readers[(reader.piece.shard, reader.piece.draw)]
        self._buffer.items[:] = [found[slot] for slot in self._buffer.items]

    # -- iteration -------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, Sample]]:
        """(stream index, sample), to the end of the stream."""
        try:
            while True:
                if self._drain is None:
                    slot = next(self._reads, None)
                    if slot is None:
                        self._drain = self._buffer.drain()
                        continue
                    released = self._buffer.push(self._fetch(slot))
                    if released is None:
                        continue
                else:
                    released = next(self._drain, _END)
                    if released is _END:
                        return
                yield self._index, released  # type: ignore[misc]
                self._index += 1
        finally:
            self.close()

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
