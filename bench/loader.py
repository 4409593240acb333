"""Benchmark: training-input throughput of our ``ShardLoader`` vs. a bare PIL loop and webdataset.

All three do the same work on the same shards (written once from the JPEG corpus by our ingest
functions, copy mode) and the same number of images: read the tar, decode each JPEG, take an
Inception-style random-resized-crop to 224x224, flip half of them horizontally, normalise, and
stack batches of 64 float32 tensors (with int64 labels).

- ours: ``ShardLoader(..., num_workers=0)`` over one epoch, with the global order's mixing on
  (``MIXING``: 4 streams, each reading 4 shards at once through a 256-sample shuffle buffer, as
  the training stages do). It picks the crop from the JPEG header and decodes at a reduced DCT
  scale (PIL draft mode) when the crop allows it. Its batches are uint8; ``to_model_input``
  normalises them as the trainer does on its device (here the CPU, so the same work as the
  baselines' ``Normalize`` is counted).
- bare loop: ``tarfile`` + ``Image.open(...).convert("RGB")`` + torchvision ``RandomResizedCrop``,
  ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, ``torch.stack``.
- webdataset: ``WebDataset(urls).decode("pil").to_tuple("jpg", "cls").map_tuple(transform, identity)
  .batched(64)`` with the same torchvision transform.

Everything runs in this one process with one torch thread, so images/s is per core. Shards are read
once before timing so that the page cache, not the disk, serves them. Each pipeline is measured
several times, round-robin, and the median reported. Main ratio: ours / bare loop (goal from the
sample-order issue: >= 1.3x with mixing on).
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from corpus import (
    bench_args,
    build_corpus,
    cpu_busy_before_start,
    emit_result,
    log,
    machine_info,
    plan_corpus_shards,
    run_rounds,
    summarize,
    warm_page_cache,
)
from PIL import Image
from torchvision import transforms

from pipeline.storage import LocalStorage
from stages.data.loader import ShardInfo, ShardLoader
from stages.data.order import OrderSpec
from stages.data.tarshards import split_key
from stages.data.transforms import MEAN, STD, to_model_input
from stages.ingest import write_shard

BATCH_SIZE = 64
IMAGE_SIZE = 224
GOAL = 1.3
MIXING = OrderSpec(seed=0, streams=4, open_shards=4, shuffle_buffer=256)

Batch = tuple[torch.Tensor, torch.Tensor]


def parse_args() -> argparse.Namespace:
    return bench_args(__doc__, images=1600, quick_shard_samples=50)


def write_shards(images: int, seed: int, shard_samples: int, out: Path) -> tuple[list[ShardInfo], dict[str, object]]:
    """Shards of the corpus, written with our ingest functions in copy mode. Returns them and the corpus info."""
    corpus = build_corpus(images, seed=seed)
    setup = plan_corpus_shards(corpus, shard_samples)
    storage = LocalStorage(out)
    results = [write_shard(setup.source, plan, storage, setup.class_index, "copy", max_side=512, quality=90)
               for plan in setup.plans]  # max_side and quality only matter when re-encoding
    return [ShardInfo(r.path, r.samples) for r in results], corpus.describe()


def torchvision_transform() -> Callable[[Image.Image], torch.Tensor]:
    """The baselines' augmentation, with our normalisation constants."""
    return transforms.Compose([
        transforms.RandomResizedCrop(IMAGE_SIZE),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def ours(root: Path, shards: list[ShardInfo]) -> Iterator[Batch]:
    """Our loader, single process, mixing on: draft-mode JPEG decode + crop + flip, batch-wise normalise."""
    loader = ShardLoader(LocalStorage(root), shards, MIXING, global_batch=BATCH_SIZE, micro_batch=BATCH_SIZE,
                         image_size=IMAGE_SIZE, num_workers=0)
    for batch in loader:
        yield to_model_input(batch["image"]), batch["label"]


def tar_samples(path: Path) -> Iterator[dict[str, bytes]]:
    """{extension: bytes} per sample of one tar (consecutive members sharing a key)."""
    current, files = None, {}
    with tarfile.open(path) as tar:
        for member in tar:
            extracted = tar.extractfile(member)
            if extracted is None:
                continue  # not a regular file
            key, ext = split_key(member.name)
            if key != current and files:
                yield files
                files = {}
            current = key
            files[ext] = extracted.read()
    if files:
        yield files


def bare_loop(root: Path, shards: list[ShardInfo]) -> Iterator[Batch]:
    """The baseline: what one would write by hand with tarfile, PIL and torchvision."""
    transform = torchvision_transform()
    images, labels = [], []
    for shard in shards:
        for files in tar_samples(root / shard.path):
            images.append(transform(Image.open(io.BytesIO(files["jpg"])).convert("RGB")))
            labels.append(int(files["cls"]))
            if len(images) == BATCH_SIZE:
                yield torch.stack(images), torch.tensor(labels)
                images, labels = [], []


def webdataset_pipeline(root: Path, shards: list[ShardInfo]) -> Iterable[Batch]:
    """webdataset's default decoding pipeline (full PIL decode of every image) with the same transform."""
    urls = [str(root / shard.path) for shard in shards]
    return (wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls")
            .map_tuple(torchvision_transform(), wds.filters.identity).batched(BATCH_SIZE))


def measure(label: str, pipeline: Callable[[], Iterable[Batch]], count: int) -> float:
    """images/s over the first ``count`` images (whole batches) of a fresh ``pipeline()``, after one
    untimed batch from another instance (so one-time set-up costs hit none of the timings)."""
    next(iter(pipeline()))
    started = time.perf_counter()
    seen = 0
    for images, labels in islice(pipeline(), count // BATCH_SIZE):
        if images.shape != (BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE) or images.dtype != torch.float32:
            raise RuntimeError(f"{label}: unexpected batch {tuple(images.shape)} {images.dtype}")
        seen += len(labels)
    seconds = time.perf_counter() - started
    if seen != count:
        raise RuntimeError(f"{label}: {seen} images, {count} expected")
    rate = seen / seconds
    log(f"  {label:<12} {seen} images in {seconds:6.2f} s = {rate:7.1f} images/s")
    return rate


def pipelines(root: Path, shards: list[ShardInfo]) -> dict[str, Callable[[], Iterable[Batch]]]:
    """Makers of a fresh instance of each compared pipeline."""
    return {
        "ours": partial(ours, root, shards),
        "bare_loop": partial(bare_loop, root, shards),
        "webdataset": partial(webdataset_pipeline, root, shards),
    }


def main() -> None:
    args = parse_args()
    cpu_busy = cpu_busy_before_start()
    torch.set_num_threads(1)  # one core per pipeline, like one DataLoader worker
    with tempfile.TemporaryDirectory(prefix="vitpipe-bench-loader-") as tmp:
        root = Path(tmp)
        shards, corpus = write_shards(args.images, args.seed, args.shard_samples, root)
        warm_page_cache([root / shard.path for shard in shards])
        count = sum(s.samples for s in shards) // BATCH_SIZE * BATCH_SIZE  # one epoch of ours
        log(f"loader benchmark: {count} images, {len(shards)} shards, batch {BATCH_SIZE}, {IMAGE_SIZE}px, "
            f"1 process, 1 torch thread, {args.repeats} repeat(s)")
        samples = run_rounds({name: partial(measure, name, pipeline, count)
                              for name, pipeline in pipelines(root, shards).items()}, args.repeats)
    rates = summarize(samples)

    ratio = rates["ours"] / rates["bare_loop"]
    vs_wds = rates["ours"] / rates["webdataset"]
    log(f"  medians: {', '.join(f'{k} {v:.1f}' for k, v in rates.items())} images/s")
    log(f"  ratio ours/bare loop = {ratio:.3f} (goal >= {GOAL}); "
        f"ours/webdataset = {vs_wds:.3f}")
    emit_result({
        "name": "loader",
        "ours": round(rates["ours"], 1),
        "baseline": round(rates["bare_loop"], 1),
        "unit": "images/s per core",
        "ratio": round(ratio, 4),
        "extra": {
            "baseline_name": "bare single-process PIL + torchvision loop",
            "webdataset": round(rates["webdataset"], 1),
            "ratio_vs_webdataset": round(vs_wds, 4),
            "goal": GOAL,
            "goal_met": ratio >= GOAL,
            "order": {"streams": MIXING.streams, "open_shards": MIXING.open_shards,
                      "shuffle_buffer": MIXING.shuffle_buffer},
            "samples": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
            "statistic": f"median of {args.repeats}",
            "images": count,
            "batch_size": BATCH_SIZE,
            "image_size": IMAGE_SIZE,
            "torch_threads": torch.get_num_threads(),
            "shards": len(shards),
            "corpus": corpus,
        },
        "machine": machine_info(cpu_busy),
    })


if __name__ == "__main__":
    main()
