"""The global sample order of a training run: pure functions of (seed, epoch, shard sizes).

The order is defined once for the run, independently of how many ranks and loader workers read
it, so a run can continue on another number of workers and still see every sample exactly as
often as an uninterrupted one (mosaicml streaming's "canonical nodes", over plain tar shards):

1. **Pieces.** Each epoch the shards are permuted with ``(seed, epoch)`` (``resampled``: drawn
   with replacement until the epoch has as many samples as the shards, the last draw cut there),
   their samples laid end to end and cut into ``streams`` contiguous ranges of
   equal size (±1). A stream's range is a list of pieces ``(shard, start, stop)``; a shard is only
   split where a range boundary falls, so with fewer shards than streams (CIFAR's 20 shards on
   128 GPUs) several streams read parts of one shard.
2. **A stream** reads ``open_shards`` of its pieces at a time, one sample from each in turn (a
   finished piece is replaced by the next), through a seeded shuffle buffer of ``shuffle_buffer``
   samples: a sample leaves the buffer at a random slot as the next one arrives. Reading several
   shards at once is what mixes batches even when every shard holds one class (an ImageFolder
   listed by key); the buffer shuffles within that window. Memory per stream: ``open_shards``
   open readers and ``shuffle_buffer`` samples (encoded bytes, ~100 KB each for ImageNet JPEGs).
3. **Global positions.** Position ``p`` of the epoch is index ``p // streams`` of stream
   ``p % streams``. Global step ``t`` is positions ``[t G, (t+1) G)`` for the global batch ``G``:
   ``G / streams`` consecutive samples of every stream. Rank ``r`` of ``R`` takes the positions
   ``p ≡ r (mod R)``, i.e. whole streams (those ``c ≡ r (mod R)``), so each stream is read by one
   process and the samples of a step do not depend on ``R``; loader worker ``w`` of ``W`` takes
   the rank's streams with ``(c // R) ≡ w (mod W)``. ``R`` must divide ``streams`` and ``streams``
   must divide ``G``.
4. **Epoch length.** ``steps_per_epoch`` full global steps; the few samples past them (at most
   ``G - 1`` plus the streams' ±1) wait for a later epoch, where the permutation is different.

Everything here works on sample *slots* (shard index, sample index, draw) known from the shard
sizes alone, so the order can be computed, tested and skipped ahead without reading any data.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

__all__ = ["OrderSpec", "Piece", "Slot", "Layout", "epoch_pieces", "read_order", "ShuffleBuffer", "stream_order",
           "steps_per_epoch", "order_rng", "derived_seed"]


def derived_seed(*parts: object) -> int:
    """A 64-bit seed from ``parts`` alone (stable across processes and Python versions): every
    seed of a run — the sample order, each sample's augmentation, each micro-batch's masks — is
    one of these, never the state of a generator that depends on who computes it."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def order_rng(*parts: object) -> random.Random:
    """A generator seeded from ``parts`` alone (:func:`derived_seed`)."""
    return random.Random(derived_seed(*parts))


@dataclass(frozen=True)
class OrderSpec:
    """What defines the order (all of it enters a stage's fingerprint)."""

    seed: int
    streams: int = 8
    open_shards: int = 4
    shuffle_buffer: int = 512
    resampled: bool = False

    def __post_init__(self) -> None:
        for name in ("streams", "open_shards", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class Piece:
    shard: int  # index into the run's shard list
    start: int  # first sample (by position in the tar)
    stop: int  # one past the last
    draw: int  # which draw of the epoch this is (resampled mode: a shard can be drawn twice)

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class Slot:
    """One sample's place: the ``index``-th sample of ``shard``, in the ``draw``-th draw of the epoch."""

    shard: int
    index: int
    draw: int


def epoch_pieces(counts: Sequence[int], spec: OrderSpec, epoch: int) -> list[list[Piece]]:
    """Per stream, its pieces in reading order (step 1 of the module docstring)."""
    n = len(counts)
    if n == 0:
        raise ValueError("no shards")
    rng = order_rng("shards", spec.seed, epoch)
    total = sum(counts)
    if spec.resampled:
        # Draws with replacement until the epoch holds as many samples as the shards do, the last
        # draw cut there: every epoch has the same length whatever the shards' sizes.
        shards, lengths, drawn = [], [], 0
        while drawn < total:
            shard = rng.randrange(n)
            shards.append(shard)
            lengths.append(min(counts[shard], total - drawn))
            drawn += lengths[-1]
    else:
        shards = list(range(n))
        rng.shuffle(shards)
        lengths = [counts[s] for s in shards]
    bounds = [total * c // spec.streams for c in range(spec.streams + 1)]
    pieces: list[list[Piece]] = [[] for _ in range(spec.streams)]
    offset, stream = 0, 0
    for draw, (shard, length) in enumerate(zip(shards, lengths)):
        start, end = offset, offset + length
        while start < end:
            while bounds[stream + 1] <= start:  # skip streams whose range ends here (empty ones too)
                stream += 1
            stop = min(end, bounds[stream + 1])
            pieces[stream].append(Piece(shard, start - offset, stop - offset, draw))
            start = stop
        offset = end
    return pieces


def read_order(pieces: Sequence[Piece], open_shards: int) -> Iterator[Slot]:
    """The order a stream reads its samples in: ``open_shards`` pieces in turn, one sample each;
    a finished piece's turn goes to the next unopened piece."""
    active = [[p, p.start] for p in pieces[:open_shards]]
    upcoming = iter(pieces[open_shards:])
    while active:
        for slot in list(active):
            piece, position = slot
            yield Slot(piece.shard, position, piece.draw)
            slot[1] = position + 1
            if slot[1] == piece.stop:
                replacement = next(upcoming, None)
                if replacement is None:
                    active.remove(slot)
                else:
                    slot[0], slot[1] = replacement, replacement.start


class ShuffleBuffer:
    """A seeded shuffle buffer: once full, each arriving item replaces (and releases) a random one;
    at the end the rest leave in random order. The release order is a pure function of the arrival
    order and the seed, whatever the items are — which lets a reader replay it on slots."""

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.rng = rng
        self.items: list = []

    def push(self, item: object) -> object | None:
        """Add ``item``; returns the item released, or None while the buffer fills."""
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        j = self.rng.randrange(self.size)
        released, self.items[j] = self.items[j], item
        return released

    def drain(self) -> Iterator[object]:
        while self.items:
            j = self.rng.randrange(len(self.items))
            self.items[j], self.items[-1] = self.items[-1], self.items[j]
            yield self.items.pop()


def stream_order(pieces: Sequence[Piece], spec: OrderSpec, epoch: int, stream: int) -> Iterator[Slot]:
    """The samples of one stream in the order it yields them (read order through the buffer)."""
    buffer = ShuffleBuffer(spec.shuffle_buffer, order_rng("buffer", spec.seed, epoch, stream))
    for slot in read_order(pieces, spec.open_shards):
        released = buffer.push(slot)
        if released is not None:
            yield released  # type: ignore[misc]
    yield from buffer.drain()  # type: ignore[misc]


def steps_per_epoch(counts: Sequence[int], spec: OrderSpec, global_batch: int) -> int:
    """Full global steps in an epoch: every stream has at least ``total // streams`` samples."""
    if global_batch % spec.streams:
        raise ValueError(f"global_batch {global_batch} is not divisible by streams {spec.streams}")
    return (sum(counts) // spec.streams) // (global_batch // spec.streams)


@dataclass(frozen=True)
class Layout:
    """Which positions, streams and worker each rank takes (step 3 of the module docstring)."""

    streams: int
    global_batch: int
    world_size: int
    workers: int = 1  # loader workers per rank (0 counts as 1: the rank reads itself)

    def __post_init__(self) -> None:
        if self.streams % self.world_size:
            raise ValueError(f"streams ({self.streams}) must be a multiple of the number of workers "
                             f"({self.world_size}): each worker reads whole streams")
        if self.global_batch % self.streams:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by streams {self.streams}")

    @property
    def per_stream(self) -> int:
        """Samples each stream contributes to every global step."""
        return self.global_batch // self.streams

    def rank_streams(self, rank: int) -> list[int]:
        return list(range(rank, self.streams, self.world_size))

    def worker_streams(self, rank: int, worker: int) -> list[int]:
        per_rank = max(1, self.workers)
        return [c for c in self.rank_streams(rank) if (c // self.world_size) % per_rank == worker]

    def rank_positions(self, rank: int) -> list[int]:
        """The positions (within a global step, ``0 <= j < G``) rank ``rank`` takes, in order."""
        return list(range(rank, self.global_batch, self.world_size))
