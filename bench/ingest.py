"""Benchmark: shard-writing throughput of our ingest (copy mode) vs. a plain ``webdataset.ShardWriter`` loop.

Measured, in one run, on the same JPEG corpus (page cache warmed first, so the disk is not measured):

- baseline: one process reads each file's bytes and writes ``KEY.jpg`` + ``KEY.cls`` with
  ``webdataset.ShardWriter``. It does not look inside the images.
- ours, 1 worker: ``write_shard`` over ``plan_shards(...)`` in this process, with the default
  ``validate: structure`` (header and container checked, no pixels decoded: JPEG segments and
  markers through EOI). Besides copying the bytes it writes a deterministic tar with ``KEY.json``
  metadata, hashes it (sha256), fsyncs it and writes a stats file.
- ours with ``validate: decode`` (every image decoded; JPEGs at 1/8 scale, which still reads all
  their entropy-coded data) and with ``validate: none`` (trusted input: header only).
- ours as Ray tasks (scheduled like ``Ingest.run`` does) with 1 and then 2 tasks in flight, for the
  speed-up from 1 to 2 workers. Ray and its worker processes are started (and warmed up) untimed.
- each validation depth alone on in-memory bytes, to show how much of our time it takes.
- ours with ``mode: index`` (``index_shard`` per shard, in this process): the shards the baseline
  writes (made once, untimed) described in place — read once, structure-checked, sha256-hashed,
  nothing written but a stats file per shard.

Each measurement is repeated (round-robin) and the median reported. Written data is flushed to disk
between measurements (untimed) so that none pays for another's writeback.
Main ratio: ours (1 worker, in-process, default validation) / baseline, images/s per core. Goals
from the issues: >= 0.9x the ShardWriter loop per core; >= 1.7x from 1 to 2 workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from corpus import (
    ShardSetup,
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

from pipeline.storage import LocalStorage
from stages.data.images import Validation, inspect_image
from stages.data.shard_index import index_shard
from stages.ingest import ShardPlan, ShardResult, write_shard

MODE = "copy"
MAX_SIDE, QUALITY = 512, 90  # unused in copy mode; write_shard takes them
GOAL_PER_CORE, GOAL_SPEEDUP = 0.9, 1.7


def parse_args() -> argparse.Namespace:
    return bench_args(__doc__, images=3200, quick_shard_samples=25)


def time_once(label: str, images: int, scratch: Path, write: Callable[[Path], int]) -> float:
    """images/s of one ``write`` into a fresh folder; checks that it wrote every image."""
    os.sync()  # earlier measurements' data goes to disk now, untimed
    out = Path(tempfile.mkdtemp(dir=scratch))
    started = time.perf_counter()
    written = write(out)
    seconds = time.perf_counter() - started
    shutil.rmtree(out)
    if written != images:
        raise RuntimeError(f"{label}: wrote {written} of {images} images")
    rate = images / seconds
    log(f"  {label:<30} {images} images in {seconds:6.2f} s = {rate:8.1f} images/s")
    return rate


def shardwriter_loop(setup: ShardSetup, shard_samples: int, out: Path) -> int:
    """The baseline: read bytes, write KEY.jpg + KEY.cls, no validation. Returns images written."""
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=shard_samples, verbose=0) as sink:
        for item in setup.items:
            data = (Path(setup.source.root) / item.locator).read_bytes()
            sink.write({"__key__": item.key, "jpg": data, "cls": setup.class_index[item.label]})
        return sink.total


def written_images(results: list[ShardResult]) -> int:
    """Images in our shards; none may have been skipped (the corpus has no bad images)."""
    skipped = [s for r in results for s in r.skipped]
    if skipped:
        raise RuntimeError(f"our ingest skipped {len(skipped)} images, e.g. {skipped[0]}")
    return sum(r.samples for r in results)


def ours_index(shards: Path, out: Path) -> int:
    """``mode: index`` over ready-made shards, one after another in this process: samples indexed."""
    corpus, storage = LocalStorage(shards), LocalStorage(out)
    indexes = [index_shard(corpus, o.path, storage, "structure", "") for o in corpus.list() if o.path.endswith(".tar")]
    unusable = [s for i in indexes for s in i.skipped]
    if unusable:
        raise RuntimeError(f"index found {len(unusable)} unusable samples, e.g. {unusable[0]}")
    return sum(i.samples for i in indexes)


def ours_in_process(setup: ShardSetup, out: Path, validate: Validation = "structure") -> int:
    """Our shard writing, one shard after another, in this process (one core), validating to the
    depth ``validate``."""
    storage = LocalStorage(out)
    return written_images([write_shard(setup.source, plan, storage, setup.class_index, MODE, MAX_SIDE, QUALITY,
                                       validate) for plan in setup.plans])


def ours_ray(remote: Any, source_ref: Any, setup: ShardSetup, plans: list[ShardPlan], workers: int,
             out: Path) -> int:
    """Our shard writing as Ray tasks with at most ``workers`` in flight (the loop of ``Ingest.run``)."""
    import ray

    storage = LocalStorage(out)
    queue, pending, results = list(plans), {}, []
    while queue or pending:
        while queue and len(pending) < workers:
            plan = queue.pop(0)
            pending[remote.remote(source_ref, plan, storage, setup.class_index, MODE, MAX_SIDE, QUALITY)] = plan
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            pending.pop(ref)
            results.append(ray.get(ref))
    return written_images(results)


def measure_ray(setup: ShardSetup, scratch: Path, repeats: int) -> dict[str, list[float]]:
    """images/s of our Ray tasks with 1 and with 2 in flight, after Ray and its workers are up."""
    import ray

    images = len(setup.items)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(write_shard)
        source_ref = ray.put(setup.source)
        warmup = [ShardPlan(f"warmup-{w}", "train", setup.items[w * 16:(w + 1) * 16]) for w in range(2)]
        ours_ray(remote, source_ref, setup, warmup, 2, Path(tempfile.mkdtemp(dir=scratch)))
        return run_rounds({
            f"ray_{workers}_worker{'s' if workers > 1 else ''}": partial(
                time_once, f"ours: Ray tasks, {workers} in flight", images, scratch,
                partial(ours_ray, remote, source_ref, setup, setup.plans, workers))
            for workers in (1, 2)
        }, repeats)
    finally:
        ray.shutdown()


def validation_rate(blobs: list[bytes], validate: Validation) -> float:
    """images/s of one validation depth alone on bytes already in memory: the cost of validating."""
    started = time.perf_counter()
    for blob in blobs:
        inspect_image(blob, validate)
    seconds = time.perf_counter() - started
    rate = len(blobs) / seconds
    log(f"  {'validate: ' + validate + ' alone, in memory':<30} {len(blobs)} images in {seconds:6.2f} s = "
        f"{rate:8.1f} images/s")
    return rate


def explain(ours: float, baseline: float, validate: float) -> str:
    """What the per-core comparison means, given how long the default validation takes."""
    ms_ours, ms_base, ms_validate = 1000 / ours, 1000 / baseline, 1000 / validate
    return (f"ours checks every image's structure (validate: structure, {ms_validate:.2f} ms of our "
            f"{ms_ours:.2f} ms/image) and also writes KEY.json, sha256-hashes and fsyncs each shard; the "
            f"baseline only copies bytes ({ms_base:.2f} ms/image) and leaves its writes in the page cache.")


def main() -> None:
    args = parse_args()
    cpu_busy = cpu_busy_before_start()
    corpus = build_corpus(args.images, seed=args.seed)
    setup = plan_corpus_shards(corpus, args.shard_samples)
    images = len(setup.items)
    warm_page_cache([Path(setup.source.root) / item.locator for item in setup.items])
    log(f"ingest benchmark: {images} JPEGs ({corpus.describe()['mean_kb']} KiB mean), "
        f"{len(setup.plans)} shards of <= {args.shard_samples}, {args.repeats} repeat(s)")

    blobs = [setup.source.read(item) for item in setup.items]
    with tempfile.TemporaryDirectory(prefix="vitpipe-bench-ingest-") as tmp:
        scratch = Path(tmp)
        made = scratch / "made-by-shardwriter"  # what index mode reads in place
        made.mkdir()
        shardwriter_loop(setup, args.shard_samples, made)
        warm_page_cache(sorted(made.iterdir()))
        samples = run_rounds({
            "baseline": partial(time_once, "baseline: ShardWriter loop", images, scratch,
                                partial(shardwriter_loop, setup, args.shard_samples)),
            "ours": partial(time_once, "ours: write_shard, in-process", images, scratch,
                            partial(ours_in_process, setup)),
            "ours_decode": partial(time_once, "ours: validate: decode", images, scratch,
                                   partial(ours_in_process, setup, validate="decode")),
            "ours_trusted": partial(time_once, "ours: validate: none", images, scratch,
                                    partial(ours_in_process, setup, validate="none")),
            "ours_index": partial(time_once, "ours: mode: index", images, scratch, partial(ours_index, made)),
            **{f"{depth}_alone": partial(validation_rate, blobs, depth) for depth in ("structure", "decode")},
        }, args.repeats)
        samples.update(measure_ray(setup, scratch, args.repeats))

    rates = summarize(samples)
    ratio = rates["ours"] / rates["baseline"]
    speedup = rates["ray_2_workers"] / rates["ray_1_worker"]
    note = explain(rates["ours"], rates["baseline"], rates["structure_alone"])
    log(f"  medians: {', '.join(f'{k} {v:.1f}' for k, v in rates.items())} images/s")
    log(f"  {note}")
    log(f"  ratio ours/baseline = {ratio:.3f} (goal >= {GOAL_PER_CORE}); "
        f"speed-up 1 -> 2 workers = {speedup:.2f}x (goal >= {GOAL_SPEEDUP})")
    emit_result({
        "name": "ingest",
        "ours": round(rates["ours"], 1),
        "baseline": round(rates["baseline"], 1),
        "unit": "images/s per core",
        "ratio": round(ratio, 4),
        "extra": {
            "speedup_1_to_2_workers": round(speedup, 3),
            "ray_1_worker": round(rates["ray_1_worker"], 1),
            "ray_2_workers": round(rates["ray_2_workers"], 1),
            "structure_check_alone": round(rates["structure_alone"], 1),
            "decode_check_alone": round(rates["decode_alone"], 1),
            "ours_validate_decode": round(rates["ours_decode"], 1),
            "ratio_decode_vs_baseline": round(rates["ours_decode"] / rates["baseline"], 4),
            "ours_validate_none": round(rates["ours_trusted"], 1),
            "ratio_none_vs_baseline": round(rates["ours_trusted"] / rates["baseline"], 4),
            "ours_index": round(rates["ours_index"], 1),
            "ratio_index_vs_baseline": round(rates["ours_index"] / rates["baseline"], 4),
            "goal_per_core": GOAL_PER_CORE,
            "goal_per_core_met": ratio >= GOAL_PER_CORE,
            "goal_speedup": GOAL_SPEEDUP,
            "goal_speedup_met": speedup >= GOAL_SPEEDUP,
            "ours_validation": "structure",
            "baseline_validates_images": False,
            "note": note,
            "samples": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
            "statistic": f"median of {args.repeats}",
            "mode": MODE,
            "images": images,
            "shards": len(setup.plans),
            "shard_samples": args.shard_samples,
            "corpus": corpus.describe(),
        },
        "machine": machine_info(cpu_busy),
    })


if __name__ == "__main__":
    main()
