"""The evaluation reader: every sample exactly once, short last batch, damaged data recorded."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.storage import LocalStorage
from stages.data.evalset import ShardSlice, iter_eval_batches, split_samples
from stages.data.loader import ShardInfo
from tests.test_loader import make_shards


@pytest.fixture
def store(tmp_path):
    return LocalStorage(tmp_path / "data")


def test_every_sample_once_in_order_with_a_short_last_batch(store):
    shards = make_shards(store, [7, 5, 9])
    batches = list(iter_eval_batches(store, shards, batch_size=4, image_size=8))
    keys = [k for b in batches for k in b["key"]]
    expected = [f"s{s:02d}-{i:03d}" for s, n in enumerate([7, 5, 9]) for i in range(n)]
    assert keys == expected
    assert [len(b["key"]) for b in batches] == [4, 4, 4, 4, 4, 1]
    assert batches[0]["image"].shape == (4, 8, 8, 3) and batches[0]["image"].dtype == torch.uint8
    assert batches[0]["label"].tolist() == [(0 + i) % 5 for i in range(4)]


def test_corrupt_samples_are_skipped_with_a_reason(store):
    shards = make_shards(store, [6], corrupt={"s00-002"})
    skipped: list[dict[str, str]] = []
    keys = [k for b in iter_eval_batches(store, shards, 4, 8, skipped=skipped) for k in b["key"]]
    assert "s00-002" not in keys and len(keys) == 5
    assert skipped[0]["key"] == "s00-002" and "image" in skipped[0]["reason"]


def _missing(skipped: list[dict[str, str]]) -> int:
    """Samples the skip records account for (one record may stand for several)."""
    total = 0
    for s in skipped:
        m = re.match(r"(\d+) samples (missing|unreadable)", s["reason"])
        total += int(m.group(1)) if m else 1
    return total


def test_a_truncated_shard_is_recorded(store):
    shards = make_shards(store, [6])
    path = store.local_path(shards[0].path)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"s00-004") + 700])  # cut inside sample 4's image
    skipped: list[dict[str, str]] = []
    keys = [k for b in iter_eval_batches(store, shards, 4, 8, skipped=skipped) for k in b["key"]]
    assert keys == [f"s00-{i:03d}" for i in range(4)]
    assert _missing(skipped) == 6 - len(keys), skipped  # every lost sample is accounted for, none twice


def test_split_samples_gives_equal_contiguous_shares():
    shards = [ShardInfo(f"s{i}", n) for i, n in enumerate([7, 5, 9])]
    parts = [split_samples(shards, r, 4) for r in range(4)]
    assert [sum(p.stop - p.start for p in part) for part in parts] == [5, 5, 5, 6]
    assert parts[0] == [ShardSlice(shards[0], 0, 5)]
    assert parts[1] == [ShardSlice(shards[0], 5, 7), ShardSlice(shards[1], 0, 3)]
    # More parts than samples: some are empty, every sample is still in exactly one.
    tiny = [ShardInfo("a", 2)]
    assert [split_samples(tiny, r, 3) for r in range(3)] == [[], [ShardSlice(tiny[0], 0, 1)], [ShardSlice(tiny[0], 1, 2)]]
    with pytest.raises(ValueError, match="out of range"):
        split_samples(shards, 4, 4)


def test_ranks_read_every_sample_exactly_once(store):
    sizes = [7, 5, 9]
    shards = make_shards(store, sizes)
    everything = [k for b in iter_eval_batches(store, shards, 4, 8) for k in b["key"]]
    per_rank = [[k for b in iter_eval_batches(store, split_samples(shards, r, 4), 4, 8) for k in b["key"]]
                for r in range(4)]
    assert [len(keys) for keys in per_rank] == [5, 5, 5, 6]
    assert [k for keys in per_rank for k in keys] == everything


def test_a_truncated_shard_is_reported_once_across_ranks(store):
    shards = make_shards(store, [6, 6])
    path = store.local_path(shards[0].path)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"s00-002") + 700])  # samples 0 and 1 survive
    results = []
    for r in range(3):  # shares: shard 0 [0, 4), shard 0 [4, 6) + shard 1 [0, 2), shard 1 [2, 6)
        skipped: list[dict[str, str]] = []
        keys = [k for b in iter_eval_batches(store, split_samples(shards, r, 3), 4, 8, skipped=skipped)
                for k in b["key"]]
        results.append((keys, skipped))
    read = sum(len(keys) for keys, _ in results)
    assert [keys for keys, _ in results][:2] == [["s00-000", "s00-001"], ["s01-000", "s01-001"]]
    assert _missing([s for _, skipped in results for s in skipped]) == 12 - read
    assert len(results[2][0]) == 4 and not results[2][1]  # the intact shard's share is untouched
