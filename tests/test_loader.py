"""The streaming loader: exact resume, even splits, corrupt data, S3 streaming."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import VitpipeError
from pipeline.storage import LocalStorage, S3Storage
from stages.data.loader import ShardInfo, ShardLoader, plan_epoch
from stages.data.tarshards import ShardTarWriter


def png(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def make_shards(storage, sizes: list[int], corrupt: set[str] = frozenset()) -> list[ShardInfo]:
    shards = []
    for s, n in enumerate(sizes):
        path = f"shards/train-{s:06d}.tar"
        with storage.open_write(path) as f, ShardTarWriter(f) as tar:
            for i in range(n):
                key = f"s{s:02d}-{i:03d}"
                image = b"\xff\xd8 not a jpeg at all" if key in corrupt else png(s * 1000 + i)
                tar.write(key, {"png": image, "cls": str((s + i) % 5).encode()})
        shards.append(ShardInfo(path, n))
    return shards


UNEVEN = [7, 5, 9, 6, 8, 4, 7]


@pytest.fixture
def store(tmp_path):
    return LocalStorage(tmp_path / "data")


def _loader(store, shards, **kw):
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", 8)
    kw.setdefault("seed", 3)
    return ShardLoader(store, shards, **kw)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_batches_are_uint8_images_for_the_device_to_normalise(store):
    shards = make_shards(store, UNEVEN)
    batch = next(iter(_loader(store, shards)))
    assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == torch.uint8  # 1 byte per pixel
    assert batch["label"].dtype == torch.int64 and len(batch["key"]) == 4


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("stop_after", [3, "epoch_end", "epoch_end+2"])
def test_resume_yields_exactly_the_uninterrupted_stream(store, workers, stop_after):
    shards = make_shards(store, UNEVEN)
    reference = _loader(store, shards, num_workers=workers)
    per_epoch = len(reference)
    ref_images = []
    expected = []
    for _ in range(2):  # two epochs, each one `for` over the loader
        for batch in reference:
            expected.append(batch["key"])
            ref_images.append(batch["image"])
    stop = {3: 3, "epoch_end": per_epoch, "epoch_end+2": per_epoch + 2}[stop_after]

    first = _loader(store, shards, num_workers=workers)
    got = []
    it = iter(first)
    while len(got) < stop:
        try:
            got.append(next(it)["key"])
        except StopIteration:  # epoch boundary: the next `for` starts the next epoch
            it = iter(first)
    state = first.state_dict()

    resumed = _loader(store, shards, num_workers=workers)
    resumed.load_state_dict(state)
    images = []
    for _ in range(3):  # at most the rest of this epoch and the next
        if len(got) >= len(expected):
            break
        for batch in resumed:
            got.append(batch["key"])
            images.append(batch["image"])
    assert got == expected
    # Same crops too: augmentation depends only on (seed, epoch, key).
    for a, b in zip(images, ref_images[stop:]):
        assert np.array_equal(a.numpy(), b.numpy())


def test_epochs_differ_and_no_sample_repeats_within_an_epoch(store):
    shards = make_shards(store, UNEVEN)
    loader = _loader(store, shards, num_workers=2)
    e0, e1 = _keys(loader), _keys(loader)
    assert len(e0) == len(set(e0)) == len(loader) * 4
    assert e0 != e1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_even_split_across_ranks_with_uneven_shards(store, world):
    shards = make_shards(store, UNEVEN)
    loaders = [_loader(store, shards, rank=r, world_size=world, num_workers=2 if world < 3 else 1)
               for r in range(world)]
    lengths = {len(loader) for loader in loaders}
    assert len(lengths) == 1 and lengths.pop() > 0
    per_rank = [_keys(loader) for loader in loaders]
    assert all(len(k) == len(per_rank[0]) for k in per_rank)
    everything = list(itertools.chain.from_iterable(per_rank))
    assert len(everything) == len(set(everything)), "ranks overlapped"


def test_too_few_shards_fails_at_start(store):
    shards = make_shards(store, [5, 5, 5])
    with pytest.raises(VitpipeError, match="3 shards cannot feed 2 rank\\(s\\) x 2 loader worker\\(s\\)"):
        _loader(store, shards, world_size=2, num_workers=2)
    with pytest.raises(VitpipeError, match="batch size 64 is larger"):
        _loader(store, shards, batch_size=64)


def test_corrupt_samples_are_skipped_counted_and_never_partial(store):
    shards = make_shards(store, [6, 6], corrupt={"s00-002", "s01-004"})
    loader = _loader(store, shards, batch_size=2)
    keys = _keys(loader)
    assert "s00-002" not in keys and "s01-004" not in keys
    # 10 good samples cannot fill 6 batches of 2: the worker wraps around (skipping again).
    assert len(keys) == len(loader) * 2 and loader.stats["skipped"] >= 2
    assert {s["key"] for s in loader.skipped_examples} == {"s00-002", "s01-004"}
    assert all(s["reason"] == "undecodable image (unrecognised format)" for s in loader.skipped_examples)


def test_truncated_shard_is_reported_and_its_remaining_samples_skipped(store, tmp_path):
    shards = make_shards(store, [6, 6])
    path = tmp_path / "data" / shards[1].path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    loader = _loader(store, shards, batch_size=2)
    keys = _keys(loader)
    assert len(keys) == len(loader) * 2 and loader.stats["skipped"] >= 1
    assert any("truncated" in s["reason"] for s in loader.skipped_examples)


def test_all_corrupt_fails_instead_of_hanging(store):
    shards = make_shards(store, [3, 3], corrupt={f"s0{s}-00{i}" for s in range(2) for i in range(3)})
    with pytest.raises(VitpipeError, match="is unreadable"):
        _keys(_loader(store, shards, batch_size=2))


def test_resume_refuses_a_different_layout(store):
    shards = make_shards(store, UNEVEN)
    state = _loader(store, shards, num_workers=1).state_dict()
    other = _loader(store, shards, num_workers=2)
    with pytest.raises(VitpipeError, match="cannot resume the data stream: workers changed"):
        other.load_state_dict(state)


def test_resampled_mode_is_infinite_and_resumable(store):
    shards = make_shards(store, UNEVEN)
    loader = _loader(store, shards, resampled=True)
    first_epoch = len(loader)
    stream = iter(loader)
    head = [next(stream)["key"] for _ in range(3 * first_epoch)]  # crosses epoch boundaries
    assert loader.epoch >= 2
    restored = _loader(store, shards, resampled=True)
    part = _loader(store, shards, resampled=True)
    it = iter(part)
    for _ in range(first_epoch + 1):
        next(it)
    restored.load_state_dict(part.state_dict())
    tail = iter(restored)
    assert [next(tail)["key"] for _ in range(5)] == head[first_epoch + 1: first_epoch + 6]


def test_plan_is_pure_and_disjoint():
    shards = [ShardInfo(f"s{i}", 10) for i in range(8)]
    a = plan_epoch(shards, 1, 0, 2, 2, 4)
    assert a == plan_epoch(shards, 1, 0, 2, 2, 4)
    assert plan_epoch(shards, 1, 1, 2, 2, 4) != a
    used = [i for idx in a.assignment.values() for i in idx]
    assert sorted(used) == list(range(8)) and a.batches_per_worker == 5


def test_streams_from_s3(s3_endpoint, s3_bucket):
    store = S3Storage(f"s3://{s3_bucket}/data", endpoint_url=s3_endpoint)
    shards = make_shards(store, [6, 6, 6, 6])
    keys = _keys(_loader(store, shards, num_workers=2, batch_size=3))
    assert len(keys) == 24 and len(set(keys)) == 24


def test_reads_img2dataset_style_shards_made_with_plain_tarfile(store, tmp_path):
    import json
    import tarfile

    from stages.data.loader import scan_shards

    root = tmp_path / "data"
    (root / "foreign").mkdir(parents=True)
    for s in range(2):
        with tarfile.open(root / f"foreign/{s:05d}.tar", "w") as tar:
            for i in range(6):
                key = f"{s:04d}{i:05d}"
                label = ("cat" if i % 2 else "dog")
                members = {f"{key}.jpg": Image.open(io.BytesIO(png(i))).convert("RGB"),
                           f"{key}.{'txt' if s else 'json'}": label}
                for name, value in members.items():
                    if isinstance(value, Image.Image):
                        out = io.BytesIO()
                        value.save(out, format="JPEG")
                        data = out.getvalue()
                    else:
                        data = value.encode() if name.endswith(".txt") else json.dumps({"label": value}).encode()
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shards = scan_shards(store, ["foreign/00000.tar", "foreign/00001.tar"])
    assert [s.samples for s in shards] == [6, 6]
    loader = _loader(store, shards, batch_size=3, class_names=["cat", "dog"])
    labels = {}
    for batch in loader:
        labels.update(zip(batch["key"], batch["label"].tolist()))
    assert len(labels) == 12 and loader.stats["skipped"] == 0
    assert labels["000000001"] == 0 and labels["000100000"] == 1  # cat = 0, dog = 1
    unnamed = _loader(store, shards, batch_size=3)
    with pytest.raises(VitpipeError, match="pass class_names"):
        _keys(unnamed)
