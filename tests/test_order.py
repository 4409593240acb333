"""The global sample order as pure functions: pieces, read order, shuffle buffer, layout."""

from __future__ import annotations

import collections
import random

import pytest

from stages.data.order import (
    Layout,
    OrderSpec,
    Piece,
    ShuffleBuffer,
    Slot,
    epoch_pieces,
    read_order,
    steps_per_epoch,
    stream_order,
)

COUNTS = [7, 5, 9, 6, 8, 4, 7, 10]


@pytest.mark.parametrize("streams", [1, 3, 4, 8, 20, 80])
def test_pieces_cover_every_sample_once_in_equal_streams(streams):
    spec = OrderSpec(seed=1, streams=streams)
    pieces = epoch_pieces(COUNTS, spec, epoch=0)
    slots = [(p.shard, i) for stream in pieces for p in stream for i in range(p.start, p.stop)]
    assert sorted(slots) == [(s, i) for s, n in enumerate(COUNTS) for i in range(n)]
    sizes = [sum(p.samples for p in stream) for stream in pieces]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 56
    # A shard is split only where a stream's range ends: at most streams - 1 cuts in all.
    assert sum(len(stream) for stream in pieces) <= len(COUNTS) + streams - 1


def test_the_shard_order_changes_with_the_epoch_and_seed_only():
    spec = OrderSpec(seed=1, streams=4)
    assert epoch_pieces(COUNTS, spec, 0) == epoch_pieces(COUNTS, spec, 0)
    assert epoch_pieces(COUNTS, spec, 0) != epoch_pieces(COUNTS, spec, 1)
    assert epoch_pieces(COUNTS, spec, 0) != epoch_pieces(COUNTS, OrderSpec(seed=2, streams=4), 0)


def test_resampled_draws_with_replacement_and_numbers_the_draws():
    spec = OrderSpec(seed=5, streams=2, resampled=True)
    draws = {(p.draw, p.shard) for stream in epoch_pieces(COUNTS, spec, 0) for p in stream}
    shards = [shard for _, shard in sorted(draws)]
    assert len(shards) == 8 and len(set(shards)) < 8  # some shard drawn twice (seed 5, epoch 0)
    assert sorted({draw for draw, _ in draws}) == list(range(8))


def test_read_order_interleaves_the_open_pieces():
    pieces = [Piece(0, 0, 3, 0), Piece(1, 2, 4, 1), Piece(2, 0, 1, 2)]
    order = [(s.shard, s.index) for s in read_order(pieces, open_shards=2)]
    # Pieces 0 and 1 in turn; piece 1 ends after two, piece 2 takes its turn.
    assert order == [(0, 0), (1, 2), (0, 1), (1, 3), (0, 2), (2, 0)]
    assert [(s.shard, s.index) for s in read_order(pieces, open_shards=1)] == \
        [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3), (2, 0)]


def test_the_shuffle_buffer_releases_a_seeded_permutation():
    def run(seed: int) -> list[int]:
        buffer = ShuffleBuffer(4, random.Random(seed))
        out = [x for x in (buffer.push(i) for i in range(20)) if x is not None]
        return out + list(buffer.drain())

    assert sorted(run(0)) == list(range(20)) and run(0) == run(0) and run(0) != run(1)
    assert run(0) != list(range(20))


def test_a_stream_yields_its_pieces_samples_once():
    spec = OrderSpec(seed=2, streams=3, open_shards=2, shuffle_buffer=5)
    pieces = epoch_pieces(COUNTS, spec, 0)
    for c, stream in enumerate(pieces):
        out = list(stream_order(stream, spec, 0, c))
        assert sorted((s.shard, s.index) for s in out) == sorted((p.shard, i) for p in stream
                                                               for i in range(p.start, p.stop))
        assert all(isinstance(s, Slot) for s in out)


def test_steps_per_epoch_and_the_layout_mapping():
    spec = OrderSpec(seed=0, streams=8)
    assert steps_per_epoch(COUNTS, spec, 16) == 3  # 56 // 8 = 7 per stream, 2 per step
    layout = Layout(streams=8, global_batch=16, world_size=2, workers=2)
    assert layout.per_stream == 2
    assert layout.rank_streams(1) == [1, 3, 5, 7]
    assert layout.worker_streams(1, 0) == [1, 5] and layout.worker_streams(1, 1) == [3, 7]
    assert layout.rank_positions(1) == list(range(1, 16, 2))
    # Position j of a step belongs to stream j % 8, hence to rank j % 2: positions and streams agree.
    owners = collections.Counter(j % 8 % 2 for j in layout.rank_positions(1))
    assert owners == {1: 8}
    with pytest.raises(ValueError, match=r"streams \(8\) must be a multiple of the number of workers \(3\)"):
        Layout(streams=8, global_batch=24, world_size=3)
    with pytest.raises(ValueError, match="global_batch 12 is not divisible by streams 8"):
        Layout(streams=8, global_batch=12, world_size=2)


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (4, 2)])
def test_the_ranks_and_workers_of_any_world_size_split_each_step_the_same_way(world, workers):
    """Pure: the slots of every global step, taken worker by worker, rank by rank, are one partition
    of the same multiset for every world size and worker count (global batch 16, 8 streams)."""
    spec = OrderSpec(seed=4, streams=8, open_shards=2, shuffle_buffer=6)
    pieces = epoch_pieces(COUNTS, spec, 0)
    streams = [list(stream_order(pieces[c], spec, 0, c)) for c in range(8)]
    steps = steps_per_epoch(COUNTS, spec, 16)

    def step_slots(t: int, cs: list[int]) -> list[Slot]:
        return [s for c in cs for s in streams[c][t * 2:(t + 1) * 2]]

    layout = Layout(streams=8, global_batch=16, world_size=world, workers=workers)
    for t in range(steps):
        reference = collections.Counter(step_slots(t, list(range(8))))
        parts = [step_slots(t, layout.worker_streams(r, w)) for r in range(world) for w in range(workers)]
        assert sum(map(collections.Counter, parts), collections.Counter()) == reference
        assert sum(len(p) for p in parts) == 16


def test_a_resampled_epoch_has_as_many_samples_as_the_shards_whatever_is_drawn():
    counts = [100] * 9 + [7]
    for epoch in range(50):
        pieces = epoch_pieces(counts, OrderSpec(seed=1, streams=4, resampled=True), epoch)
        sizes = [sum(p.samples for p in stream) for stream in pieces]
        assert sum(sizes) == 907 and max(sizes) - min(sizes) <= 1, (epoch, sizes)
