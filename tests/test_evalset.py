"""The evaluation reader: every sample exactly once, short last batch, damaged data recorded."""

from __future__ import annotations

import pytest

from pipeline.storage import LocalStorage
from stages.data.evalset import iter_eval_batches, split_shards
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
    assert batches[0]["image"].shape == (4, 3, 8, 8)
    assert batches[0]["label"].tolist() == [(0 + i) % 5 for i in range(4)]


def test_corrupt_samples_are_skipped_with_a_reason(store):
    shards = make_shards(store, [6], corrupt={"s00-002"})
    skipped: list[dict[str, str]] = []
    keys = [k for b in iter_eval_batches(store, shards, 4, 8, skipped=skipped) for k in b["key"]]
    assert "s00-002" not in keys and len(keys) == 5
    assert skipped[0]["key"] == "s00-002" and "image" in skipped[0]["reason"]


def test_a_truncated_shard_is_recorded(store):
    shards = make_shards(store, [6])
    path = store.local_path(shards[0].path)
    path.write_bytes(path.read_bytes()[:1500])  # cut inside the samples
    skipped: list[dict[str, str]] = []
    keys = [k for b in iter_eval_batches(store, shards, 4, 8, skipped=skipped) for k in b["key"]]
    assert len(keys) < 6 and skipped, "a cut shard must be reported, not silently shortened"
    assert any("truncated" in s["reason"] or "missing" in s["reason"] for s in skipped)


def test_split_shards_is_a_partition():
    shards = [ShardInfo(f"s{i}", 1) for i in range(7)]
    parts = [split_shards(shards, r, 3) for r in range(3)]
    assert sorted(s.path for p in parts for s in p) == sorted(s.path for s in shards)
    assert [len(p) for p in parts] == [3, 2, 2]
