"""The training loader: one global order for any world size, exact resume across world sizes,
mixed batches from class-sorted shards, damaged data recorded, S3 streaming."""

from __future__ import annotations

import collections
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import VitpipeError
from pipeline.storage import LocalStorage, S3Storage
from stages.data.loader import UNREADABLE, ShardInfo, ShardLoader
from stages.data.order import OrderSpec
from stages.data.tarshards import ShardTarWriter


def png(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def make_shards(storage, sizes: list[int], corrupt: set[str] = frozenset(),
                label=lambda s, i: (s + i) % 5) -> list[ShardInfo]:
    shards = []
    for s, n in enumerate(sizes):
        path = f"shards/train-{s:06d}.tar"
        with storage.open_write(path) as f, ShardTarWriter(f) as tar:
            for i in range(n):
                key = f"s{s:02d}-{i:03d}"
                image = b"\xff\xd8 not a jpeg at all" if key in corrupt else png(s * 1000 + i)
                tar.write(key, {"png": image, "cls": str(label(s, i)).encode()})
        shards.append(ShardInfo(path, n))
    return shards


UNEVEN = [7, 5, 9, 6, 8, 4, 7, 10]  # 56 samples


@pytest.fixture
def store(tmp_path):
    return LocalStorage(tmp_path / "data")


def _loader(store, shards, *, streams=4, open_shards=2, buffer=8, seed=3, global_batch=8, micro_batch=None,
            world_size=1, rank=0, resampled=False, **kw):
    micro = micro_batch or global_batch // world_size
    kw.setdefault("image_size", 8)
    return ShardLoader(store, shards, OrderSpec(seed, streams, open_shards, buffer, resampled), global_batch, micro,
                       world_size=world_size, rank=rank, **kw)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def _steps(loaders: list[ShardLoader], epochs: int = 1) -> list[collections.Counter]:
    """The multiset of keys of every global step, over all ranks' loaders, for ``epochs`` epochs."""
    steps: list[collections.Counter] = []
    for _ in range(epochs):
        per_rank = [list(loader) for loader in loaders]
        accumulation = loaders[0].accumulation
        for t in range(len(per_rank[0]) // accumulation):
            step = collections.Counter()
            for batches in per_rank:
                for batch in batches[t * accumulation:(t + 1) * accumulation]:
                    step.update(batch["key"])
            steps.append(step)
    return steps


def test_batches_are_uint8_images_for_the_device_to_normalise(store):
    shards = make_shards(store, UNEVEN)
    batch = next(iter(_loader(store, shards)))
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == torch.uint8  # 1 byte per pixel
    assert batch["label"].dtype == torch.int64 and len(batch["key"]) == 8


def test_an_epoch_covers_every_sample_at_most_once_and_epochs_differ(store):
    shards = make_shards(store, UNEVEN)
    loader = _loader(store, shards)
    e0, e1 = _keys(loader), _keys(loader)
    # 56 samples over 4 streams: 14 each; 2 per stream per step -> 7 steps of 8, nothing left over.
    assert len(loader) == 7 and len(e0) == len(set(e0)) == 56
    assert set(e0) == {f"s{s:02d}-{i:03d}" for s, n in enumerate(UNEVEN) for i in range(n)}
    assert len(e1) == 56 and e0 != e1


@pytest.mark.parametrize("world,workers", [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (4, 0), (4, 1), (4, 2)])
def test_every_global_step_holds_the_same_samples_for_any_world_size(store, world, workers):
    shards = make_shards(store, UNEVEN)
    reference = _steps([_loader(store, shards)], epochs=2)
    loaders = [_loader(store, shards, world_size=world, rank=r, num_workers=workers,
                       micro_batch=8 // world // 2 if world < 4 else 2) for r in range(world)]
    assert _steps(loaders, epochs=2) == reference
    # The same crops too: augmentation depends on (seed, epoch, key), not on who decodes.
    one = {k: img for b in _loader(store, shards) for k, img in zip(b["key"], b["image"])}
    many = {k: img for r in range(world) for b in _loader(store, shards, world_size=world, rank=r, num_workers=workers)
            for k, img in zip(b["key"], b["image"])}
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


@pytest.mark.parametrize("world,workers", [(2, 0), (2, 2), (4, 1)])
def test_every_micro_batch_slot_holds_the_same_samples_in_order_for_any_world_size(store, world, workers):
    """Micro-batches of 2 from a global batch of 8: four slots per step, whichever ranks run them
    (one rank: 4 micro-batches; two: 2 each; four: 1 each). Dropout masks are seeded by slot."""
    shards = make_shards(store, UNEVEN)

    def slots(loaders) -> dict[tuple, list[str]]:
        return {b["slot"]: b["key"] for loader in loaders for _ in range(2) for b in loader}  # two epochs

    reference = slots([_loader(store, shards, micro_batch=2)])
    assert len(reference) == 2 * 7 * 4 and sorted({g for _, _, g in reference}) == [0, 1, 2, 3]
    assert slots([_loader(store, shards, world_size=world, rank=r, num_workers=workers, micro_batch=2)
                  for r in range(world)]) == reference


def _run(loader: ShardLoader, batches: int) -> tuple[list[list[str]], dict]:
    """Take ``batches`` micro-batches (crossing epochs as the trainer does), then the loader's state."""
    got, it = [], iter(loader)
    while len(got) < batches:
        try:
            got.append(next(it)["key"])
        except StopIteration:
            it = iter(loader)
    return got, loader.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [3, 7, 9])  # mid-epoch, at the epoch's end, in the second epoch
def test_resume_continues_exactly_where_it_stopped(store, workers, stop):
    shards = make_shards(store, UNEVEN)
    expected, _ = _run(_loader(store, shards, num_workers=workers), 14)
    head, state = _run(_loader(store, shards, num_workers=workers), stop)
    resumed = _loader(store, shards, num_workers=workers)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # JSON, as in a checkpoint
    tail, _ = _run(resumed, 14 - stop)
    assert head + tail == expected


@pytest.mark.parametrize("new_world", [1, 4])
def test_a_state_saved_at_two_ranks_resumes_at_another_world_size(store, new_world):
    shards = make_shards(store, UNEVEN)
    reference = _steps([_loader(store, shards)], epochs=2)
    # Two ranks run 3 global steps (micro-batch 2: two micro-batches each per step) and save.
    two = [_loader(store, shards, world_size=2, rank=r, micro_batch=2) for r in range(2)]
    ran = [_run(loader, 3 * 2) for loader in two]
    assert ran[0][1] == ran[1][1]  # one global cursor, the same on every rank
    before = [collections.Counter(k for batch in ran[0][0][t * 2:(t + 1) * 2] + ran[1][0][t * 2:(t + 1) * 2]
                                  for k in batch) for t in range(3)]
    after_loaders = [_loader(store, shards, world_size=new_world, rank=r, micro_batch=8 // new_world)
                     for r in range(new_world)]
    for loader in after_loaders:
        loader.load_state_dict(ran[0][1])
    after = _steps(after_loaders, epochs=1)  # the rest of epoch 0
    after += _steps(after_loaders, epochs=1)  # and epoch 1
    assert before + after == reference


def test_class_sorted_shards_give_mixed_batches(store):
    # Ten shards of one class each, as an ImageFolder listed by key gives; 16-sample batches.
    shards = make_shards(store, [20] * 10, label=lambda s, i: s)
    loader = _loader(store, shards, streams=8, open_shards=4, buffer=32, global_batch=16)
    distinct = [len(set(b["label"].tolist())) for _ in range(2) for b in loader]
    random_draw = 10 * (1 - 0.9 ** 16)  # expected distinct classes in 16 draws from 10: 8.15
    assert np.mean(distinct) >= 0.9 * random_draw, distinct
    # What reading one shard at a time would give: one class per batch.
    unmixed = _loader(store, shards, streams=1, open_shards=1, buffer=1, global_batch=16)
    assert np.mean([len(set(b["label"].tolist())) for b in unmixed]) < 2


def test_few_shards_feed_many_ranks_by_sample_ranges(store):
    shards = make_shards(store, [12, 12])  # CIFAR's few shards on many GPUs, in miniature
    loaders = [_loader(store, shards, streams=8, world_size=8, rank=r, global_batch=8) for r in range(8)]
    keys = [k for loader in loaders for k in _keys(loader)]
    assert len(keys) == len(set(keys)) == 24  # 3 steps of 8: every sample once


def test_geometry_that_cannot_work_fails_at_start(store):
    shards = make_shards(store, [5, 5, 5])
    with pytest.raises(VitpipeError, match=r"streams \(4\) must be a multiple of the number of workers \(3\)"):
        _loader(store, shards, world_size=3, global_batch=12)
    with pytest.raises(VitpipeError, match="global_batch 10 is not divisible by streams 4"):
        _loader(store, shards, global_batch=10)
    with pytest.raises(VitpipeError, match="15 samples cannot fill one global batch of 32"):
        _loader(store, shards, global_batch=32)


def test_damaged_samples_are_recorded_and_left_out_in_their_place(store):
    shards = make_shards(store, [6, 6], corrupt={"s00-002", "s01-004"})
    loader = _loader(store, shards, streams=2, global_batch=4)
    batches = list(loader)
    assert len(batches) == 3 and all(len(b["key"]) == 4 for b in batches)  # sizes kept
    labels = {k: label for b in batches for k, label in zip(b["key"], b["label"].tolist())}
    assert len(labels) == 12  # every sample in its place...
    assert labels["s00-002"] == labels["s01-004"] == UNREADABLE  # ...the damaged ones marked for the loss to skip
    assert all(v >= 0 for k, v in labels.items() if k not in ("s00-002", "s01-004"))
    assert loader.stats["skipped"] == 2
    assert {s["key"] for s in loader.skipped_examples} == {"s00-002", "s01-004"}
    assert all(s["reason"] == "undecodable image (unrecognised format)" for s in loader.skipped_examples)


def test_damaged_samples_do_not_change_a_step_on_another_world_size(store):
    shards = make_shards(store, UNEVEN, corrupt={"s00-002", "s03-000", "s07-009"})

    def labelled(loaders: list[ShardLoader]) -> list[collections.Counter]:
        steps = []
        for per_rank in zip(*[list(loader) for loader in loaders]):
            steps.append(collections.Counter((k, v) for b in per_rank for k, v in zip(b["key"], b["label"].tolist())))
        return steps

    one = labelled([_loader(store, shards)])
    two = labelled([_loader(store, shards, world_size=2, rank=r) for r in range(2)])
    assert one == two and sum(c[(k, UNREADABLE)] for c in one for k in ("s00-002", "s03-000", "s07-009")) == 3


def test_a_truncated_shard_reports_each_missing_sample(store, tmp_path):
    shards = make_shards(store, [6, 6])
    path = tmp_path / "data" / shards[1].path
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"s01-003")])  # samples 3, 4, 5 of shard 1 are gone
    loader = _loader(store, shards, streams=2, global_batch=4)
    keys = _keys(loader)
    assert len(keys) == 12 and loader.stats["skipped"] == 3
    assert sorted(s["key"] for s in loader.skipped_examples) == [f"{shards[1].path}#{i}" for i in (3, 4, 5)]


def test_a_step_with_nothing_readable_fails_in_one_line(store):
    shards = make_shards(store, [4, 4], corrupt={f"s0{s}-00{i}" for s in range(2) for i in range(4)})
    with pytest.raises(VitpipeError, match=r"^every sample of step 0 on rank 0 is unreadable, e\.g\. s0.-00.: "
                                           r"undecodable image"):
        _keys(_loader(store, shards, streams=2, global_batch=4))


def test_resume_refuses_another_order_and_old_states(store):
    shards = make_shards(store, UNEVEN)
    state = _loader(store, shards).state_dict()
    with pytest.raises(VitpipeError, match="cannot resume the data stream: shuffle_buffer, streams changed"):
        _loader(store, shards, streams=8, buffer=4).load_state_dict(state)
    with pytest.raises(VitpipeError, match="^loader state version 1 is from an older vitpipe"):
        _loader(store, shards).load_state_dict({"version": 1, "epoch": 0, "batches": 3, "positions": {}})


def test_resampled_mode_draws_shards_anew_and_seeds_crops_with_the_draw(store):
    shards = make_shards(store, [4] * 8)
    loader = _loader(store, shards, resampled=True, streams=2, global_batch=4)
    epochs = [_keys(loader) for _ in range(3)]
    assert all(len(e) == 32 for e in epochs) and epochs[0] != epochs[1]
    twice = [e for e in epochs if len(set(e)) < len(e)]
    assert twice, "no shard drawn twice in three epochs of 8 draws from 8"
    images = collections.defaultdict(list)
    for batch in _loader(store, shards, resampled=True, streams=2, global_batch=4):
        for key, image in zip(batch["key"], batch["image"]):
            images[key].append(image)
    repeated = [v for v in images.values() if len(v) > 1]
    assert repeated, "seed 3 draws a shard twice in epoch 0"
    assert all(not torch.equal(v[0], v[1]) for v in repeated)  # each draw its own crops


def test_streams_from_s3(s3_endpoint, s3_bucket):
    store = S3Storage(f"s3://{s3_bucket}/data", endpoint_url=s3_endpoint)
    shards = make_shards(store, [6, 6, 6, 6])
    keys = _keys(_loader(store, shards, num_workers=2, global_batch=8))
    assert len(keys) == 24 and len(set(keys)) == 24


def test_reads_img2dataset_style_shards_made_with_plain_tarfile(store, tmp_path):
    from stages.data.loader import scan_shards

    root = tmp_path / "data"
    (root / "foreign").mkdir(parents=True)
    for s in range(2):
        with tarfile.open(root / f"foreign/{s:05d}.tar", "w") as tar:
            for i in range(6):
                key = f"{s:04d}{i:05d}"
                label = ("cat" if i % 2 else "dog")
                out = io.BytesIO()
                Image.open(io.BytesIO(png(i))).convert("RGB").save(out, format="JPEG")
                members = {f"{key}.jpg": out.getvalue(),
                           f"{key}.{'txt' if s else 'json'}": label.encode() if s else json.dumps(
                               {"label": label}).encode()}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shards = scan_shards(store, ["foreign/00000.tar", "foreign/00001.tar"])
    assert [s.samples for s in shards] == [6, 6]
    loader = _loader(store, shards, streams=2, global_batch=4, class_names=["cat", "dog"])
    labels = {}
    for batch in loader:
        labels.update(zip(batch["key"], batch["label"].tolist()))
    assert len(labels) == 12 and loader.stats["skipped"] == 0
    assert labels["000000001"] == 0 and labels["000100000"] == 1  # cat = 0, dog = 1
    with pytest.raises(VitpipeError, match="pass class_names"):
        _keys(_loader(store, shards, streams=2, global_batch=4))


def test_loader_workers_and_ranks_read_disjoint_streams(store):
    shards = make_shards(store, UNEVEN)
    loaders = [_loader(store, shards, world_size=2, rank=r, num_workers=2) for r in range(2)]
    streams = [set(loader.layout.rank_streams(loader.rank)) for loader in loaders]
    assert streams == [{0, 2}, {1, 3}]
    assert [loaders[0].layout.worker_streams(0, w) for w in range(2)] == [[0], [2]]
    per_rank = [set(_keys(loader)) for loader in loaders]
    assert not per_rank[0] & per_rank[1] and len(per_rank[0]) == len(per_rank[1]) == 28


def test_a_stream_resumes_at_any_position_including_its_buffer_drain(store):
    """Every start position of every stream (filling, steady and draining buffer; resampled too)
    gives the rest of the uninterrupted stream, and that is the pure order's."""
    from stages.data.order import epoch_pieces, stream_order
    from stages.data.streams import StreamReader

    shards = make_shards(store, UNEVEN)
    counts = [s.samples for s in shards]
    for spec in (OrderSpec(seed=3, streams=3, open_shards=2, shuffle_buffer=4),
                 OrderSpec(seed=1, streams=2, open_shards=3, shuffle_buffer=40),  # drains a whole stream
                 OrderSpec(seed=1, streams=3, open_shards=2, shuffle_buffer=4, resampled=True)):
        pieces = epoch_pieces(counts, spec, 1)
        for c in range(spec.streams):
            pure = list(stream_order(pieces[c], spec, 1, c))
            for start in range(len(pure) + 1):
                rest = [(i, s.slot) for i, s in StreamReader(store, shards, pieces[c], spec, 1, c, start=start)]
                assert rest == list(enumerate(pure))[start:], (spec, c, start)


def test_resampled_epochs_keep_their_length_with_shards_of_any_size(store):
    shards = make_shards(store, [12, 12, 12, 2, 2])  # draws of the small ones would shorten an epoch
    loader = _loader(store, shards, resampled=True, streams=2, global_batch=4)
    assert [len(_keys(loader)) for _ in range(6)] == [40] * 6  # 40 = 4 x (40 // 4): every epoch, in full


class _Finalised:
    """Cyclic garbage that records which process collected it."""

    def __init__(self, marker) -> None:
        self.marker, self.cycle = marker, self

    def __del__(self) -> None:
        with open(self.marker, "a") as f:
            f.write(f"{os.getpid()}\n")


def test_loader_workers_never_collect_the_parents_garbage(tmp_path):
    """In a Ray process (a Train worker, the test driver) the garbage includes ObjectRefs: a forked
    worker collecting it would call into Ray on its parent's connections. The parent collects
    before forking and freezes the rest, so the workers' collections never see it."""
    import gc

    class Collecting(LocalStorage):
        def open_read(self, rel):  # in the worker: a full collection, as its own allocations would run
            gc.collect()
            return super().open_read(rel)

    store = Collecting(tmp_path / "data")
    shards = make_shards(store, [4, 4])
    marker = tmp_path / "collected"
    gc.disable()  # the garbage below stays until the loader starts its workers
    try:
        _Finalised(marker)
        assert len(_keys(_loader(store, shards, num_workers=2, global_batch=4))) == 8
    finally:
        gc.enable()
    assert marker.read_text().split() == [str(os.getpid())]
