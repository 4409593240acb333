"""Ingest's listing-to-plan at paper scale: memory per input and seconds per million.

Synthetic listings (no image bytes) of an ImageFolder-like corpus — ``CLASS/IMAGE.jpg`` under a
bucket prefix, 1000 classes, a size per file — go through what the ingest coordinator does before
any image is read: the listing tasks' chunks (Arrow columns of 1000 inputs each, made here as each
task makes its own; their time is reported apart, as ``task_seconds``) joined into one
``Listing``, ``unique_key_order`` (key sort, duplicates), the class list, ``plan_shards`` (seeded
permutation, 1000 per shard) and ``plan_digests`` (a digest per shard, from its rows' columns).
Each joined batch is saved as Parquet to a local temporary folder while the listing is joined,
as the stage saves it (``stages.data.saved_listing``; its writes included in the time), and after
the plan the saved listing is read back as a resumed ingest reads it (``read_back_seconds``: what
a resume costs instead of listing again; ``saved_bytes_per_input``: its size). Each size runs in
a fresh process. As the stage does, each joined batch is spilled: moved out of the heap into a
memory-mapped file in a temporary folder (``stages.data.listing.spill``). Two memory figures per
input, each over the footprint before the listing: the peak **heap** (``RssAnon``, sampled every
millisecond: what cannot be dropped, what a process is killed for) and the peak RSS with the
mapped listing's pages (file pages the kernel drops under pressure and reads back). Both include
up to one 16 MB batch of chunks not yet joined and the key sort's scratch: at 1M inputs these
fixed costs show. The same listing held in the heap (not spilled, as before) is measured too.

Baseline, measured the same way: the listing as a plain Python list of its object keys — the least
any per-item Python listing holds (what ``aws s3 ls`` or ``os.walk`` output kept in a list costs).
``ratio`` is ours / baseline heap bytes per input at the largest size. Goal from the issue: <= 100
bytes per input (300M inputs in <= 30 GB), judged on the RSS with the pages; the line also gives
the 300M extrapolation.

``--listing`` measures instead the listing of a bucket split across Ray tasks (one per class
folder, ``stages.ingest.list_source``) with 1 and then 2 tasks in flight, against moto's S3 server
behind a proxy that adds ``--latency`` seconds to every request (a far-away S3: moto on loopback
answers in a millisecond, which would measure only Ray's task overhead). The bucket is small
because moto, in this process, spends CPU on every key of the bucket for each LIST (0.5 s a page
at 6400 keys): a larger one measures moto. Also timed, for reference: one process listing the
whole bucket with one paginated LIST (1000 keys a page), which needs fewer requests than one per
class folder — parts win when there are enough tasks to share them (ImageNet-21k: ~14k pages in
sequence against 21k class folders shared by the tasks). ``ratio`` is the time with 1 task over
the time with 2 (goal >= 1.7).

    python bench/ingest_scale.py [--inputs 1000000 10000000] [--quick]
    python bench/ingest_scale.py --listing [--classes 32] [--per-class 50] [--latency 0.1]
    python bench/ingest_scale.py --skips 3000000

``--skips N`` measures instead the coordinator's memory for N skip records (a sidecar ``.json``
per image, one in ten a duplicate key), held as ``stages.data.skips.SkipLog`` columns against a
Python list of one dict per record (what it held before), each in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from corpus import cpu_busy_before_start, emit_result, log, machine_info, start_moto  # noqa: E402

CLASSES, SHARD_SAMPLES, PAPER_INPUTS, GOAL_BYTES = 1000, 1000, 300_000_000, 100
PREFIX = "s3://datasets/imagenet21k/train"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_anon() -> int:
    """Resident heap (anonymous) memory: RSS less the pages of mapped files, which the kernel can
    drop and read back — the part of a process that is killed for memory."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


class _HeapPeak:
    """The largest ``_rss_anon`` seen, sampled every millisecond by a thread (the kernel keeps the
    peak of the whole RSS only); a transient shorter than that can be missed."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = _rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_anon())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _rss_anon())


def _keys(n: int):
    for i in range(n):
        yield f"n{i % CLASSES:08d}/n{i % CLASSES:08d}_{i:09d}.JPEG"


def _parts(n: int, part_size: int = 1000):
    """The listing as its tasks find it: parts (class folders) of ``part_size`` inputs."""
    for start in range(0, n, part_size):
        c = start // part_size % CLASSES
        yield [f"n{c:08d}/n{c:08d}_{i:09d}.JPEG" for i in range(start, min(start + part_size, n))]


def measure_ours(n: int, spilled: bool = True) -> dict[str, float]:
    """In this (fresh) process: listing to plan for ``n`` synthetic inputs, as the coordinator does
    it: listing chunks (made here, as each listing task makes its own) joined into columns (with
    ``spilled``, each batch moved to a memory-mapped file in a temporary folder, as the stage does),
    duplicates found, the class list, shards cut (seeded permutation, 1000 per shard), each
    shard's plan digested (its items made again, a shard at a time)."""
    import tempfile

    from pipeline.storage import LocalStorage
    from stages.data.listing import ListingBuilder, encode_chunk, unique_key_order
    from stages.data.saved_listing import SavedListing
    from stages.data.sources import ListingPart, SourceItem, sort_labels
    from stages.ingest import plan_digests, plan_shards

    source = _source()
    source.storage.uri_of("x")  # boto3 imported and the client made before the measure starts
    folder = LocalStorage(tempfile.mkdtemp(prefix="saved-listing-"))
    store = SavedListing(folder, source, [ListingPart(str(k)) for k in range(-(-n // 1000))])
    store.start(resume=False)
    spill_dir = tempfile.mkdtemp(prefix="listing-spill-") if spilled else None
    start_rss, start_heap, started = _peak_rss(), _rss_anon(), time.perf_counter()
    heap = _HeapPeak()
    builder, task_seconds = ListingBuilder(source, on_batch=store.save, spill_dir=spill_dir), 0.0  # as the stage
    for keys in _parts(n):
        in_task = time.perf_counter()  # what ImageFolderSource.items_of returns, then the task's encoding
        chunk = encode_chunk(source, [SourceItem(key=key[:-5], split="train", label=key.split("/", 1)[0], locator=key,
                                                 origin=f"{PREFIX}/{key}", size=110_000 + hash(key) % 997,
                                                 filename=key.rsplit("/", 1)[1]) for key in keys])
        task_seconds += time.perf_counter() - in_task
        builder.add(chunk)
    listing = builder.finish()
    store.close()  # the last batches' writes waited for (the stage waits for them too)
    listed = time.perf_counter()
    order, duplicates = unique_key_order(listing)
    codes, labels = listing.codes("label")
    names = sort_labels(labels[c] for c in np.unique(codes[order]))
    del codes
    class_index = {name: k for k, name in enumerate(names)}
    cuts = plan_shards(listing, order, SHARD_SAMPLES, shuffle_seed=0)
    del order
    digests = plan_digests(listing, cuts, class_index, ("copy", 512, 90, "structure"))
    done = time.perf_counter()
    columns_bytes = listing.table.nbytes
    sent = cuts[:100]  # what sending a shard to its writing task costs the coordinator: its rows' columns
    started_sending = time.perf_counter()
    for cut in sent:
        listing.rows(cut.rows)
    send_us = (time.perf_counter() - started_sending) / sum(len(cut.rows) for cut in sent) * 1e6
    assert len(listing) == n and not len(duplicates) and len(digests) == -(-n // SHARD_SAMPLES)
    peak, heap_peak = (_peak_rss() - start_rss) / n, (heap.stop() - start_heap) / n
    del listing, cuts, digests
    assert not spill_dir or not os.listdir(spill_dir)  # the spill files are unlinked as they are mapped
    saved_bytes = sum(o.size for o in folder.list())
    reading = time.perf_counter()  # what a resumed ingest does instead of listing again
    back = list(SavedListing(folder, source, [ListingPart(str(k)) for k in range(-(-n // 1000))]).start(resume=True))
    read_back = time.perf_counter() - reading
    assert sum(len(batch.table) for batch in back) == n
    folder.delete_prefix("")
    return {"bytes_per_input": peak, "heap_bytes_per_input": heap_peak, "seconds": done - started - task_seconds,
            "listing_seconds": listed - started - task_seconds, "task_seconds": task_seconds,
            "columns_bytes_per_input": columns_bytes / n, "send_us_per_input": send_us,
            "saved_bytes_per_input": saved_bytes / n, "read_back_seconds": read_back}


def _source():
    from pipeline.config import StorageSettings
    from stages.data.sources import ImageFolderSource

    return ImageFolderSource(PREFIX, StorageSettings(endpoint_url="http://127.0.0.1:9"))  # never contacted


def measure_baseline(n: int) -> dict[str, float]:
    """In this (fresh) process: the listing as a list of key strings, and nothing else."""
    start_rss, start_heap, started = _peak_rss(), _rss_anon(), time.perf_counter()
    keys = list(_keys(n))
    done = time.perf_counter()
    assert len(keys) == n
    return {"bytes_per_input": (_peak_rss() - start_rss) / n, "heap_bytes_per_input": (_rss_anon() - start_heap) / n,
            "seconds": done - started}


def measure_listing(classes: int, per_class: int, latency: float, rounds: int = 3) -> dict[str, object]:
    """Listing of a moto bucket of ``classes`` x ``per_class`` objects through a latency-adding
    proxy: one Ray task per class folder, 1 vs 2 in flight; and one process's single listing."""
    import statistics
    from concurrent.futures import ThreadPoolExecutor

    import ray
    from faultproxy import FaultProxy

    from pipeline.config import StorageSettings
    from stages.data.sources import ImageFolderSource
    from stages.ingest import list_source

    server, endpoint, s3 = start_moto("corpus")
    keys = [f"n{c:08d}/n{c:08d}_{i:06d}.JPEG" for c in range(classes) for i in range(per_class)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: s3.put_object(Bucket="corpus", Key=f"train/{key}", Body=b"x"), keys))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    times: dict[str, list[float]] = {"one_listing": [], "tasks_1": [], "tasks_2": []}
    try:
        with FaultProxy(endpoint, latency_s=latency) as proxy:
            source = ImageFolderSource("s3://corpus/train", StorageSettings(endpoint_url=proxy.url))
            runs = {"one_listing": source.items, "tasks_1": lambda: list_source(None, source, 1),
                    "tasks_2": lambda: list_source(None, source, 2)}
            assert len(runs["tasks_2"]()) == len(keys)  # warm-up: Ray's worker processes start here
            for _ in range(rounds):
                for name, run in runs.items():
                    started = time.perf_counter()
                    found = run()
                    times[name].append(time.perf_counter() - started)
                    assert len(found) == len(keys)
            requests = proxy.counts["requests"]
    finally:
        ray.shutdown()
        server.stop()
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"median_s": median, "runs_s": times, "requests": requests}


def listing_main(args: argparse.Namespace, cpu_busy: float | None) -> None:
    result = measure_listing(args.classes, args.per_class, args.latency)
    median = result["median_s"]
    ratio = median["tasks_1"] / median["tasks_2"]
    log(f"  listing {args.classes} class folders x {args.per_class} objects, +{args.latency * 1000:.0f} ms a "
        f"request: 1 task {median['tasks_1']:.2f} s, 2 tasks {median['tasks_2']:.2f} s ({ratio:.2f}x); one "
        f"paginated listing in one process {median['one_listing']:.2f} s")
    emit_result({
        "name": "ingest_listing",
        "ours": round(median["tasks_2"], 3),
        "baseline": round(median["tasks_1"], 3),
        "unit": "seconds to list the bucket (median of 3): 2 listing tasks (ours) vs 1",
        "ratio": round(ratio, 3),
        "extra": {"goal_ratio": 1.7, "goal_met": ratio >= 1.7, "classes": args.classes,
                  "per_class": args.per_class, "latency_s": args.latency,
                  "one_process_paginated_listing_s": round(median["one_listing"], 3),
                  "runs_s": {k: [round(v, 3) for v in vs] for k, vs in result["runs_s"].items()}},
        "machine": machine_info(cpu_busy),
    })


def _skip_records(start: int, end: int):
    """Skip records as a web-scraped folder gives them: a sidecar file per image, and some duplicates."""
    for i in range(start, end):
        c = i % CLASSES
        if i % 10:
            yield {"origin": f"{PREFIX}/n{c:08d}/n{c:08d}_{i:09d}.json", "kind": "unsupported file type",
                   "reason": "unsupported file type .json"}
        else:
            yield {"origin": f"{PREFIX}/n{c:08d}/n{c:08d}_{i:09d}.JPEG", "kind": "duplicate key",
                   "reason": f"duplicate key 'n{c:08d}/n{c:08d}_{i:09d}' (kept {PREFIX}/x/n{c:08d}_{i:09d}.JPEG)"}


def measure_skips(which: str, n: int) -> dict[str, float]:
    """In this (fresh) process: ``n`` skip records held as the coordinator holds them (a SkipLog:
    columns) or as a list of dicts (before), and the count by kind the manifest keeps."""
    from stages.data.skips import SkipLog

    start_rss, started = _peak_rss(), time.perf_counter()
    if which == "skips_ours":
        log_ = SkipLog()
        for start in range(0, n, 1000):  # as the listing's chunks bring them, a part at a time
            log_.extend(list(_skip_records(start, min(start + 1000, n))))
        counts = log_.counts_by_kind()
    else:
        records = list(_skip_records(0, n))
        counts = dict(Counter(r["kind"] for r in records))
    done = time.perf_counter()
    assert sum(counts.values()) == n
    return {"bytes_per_record": (_peak_rss() - start_rss) / n, "seconds": done - started}


def skips_main(n: int, cpu_busy: float | None) -> None:
    ours, base = in_fresh_process("skips_ours", n), in_fresh_process("skips_baseline", n)
    ratio = ours["bytes_per_record"] / base["bytes_per_record"]
    log(f"  {n:,} skip records: as columns {ours['bytes_per_record']:.0f} B each, as dicts "
        f"{base['bytes_per_record']:.0f} B each ({ratio:.2f}x); at 30M (10% of 300M inputs): "
        f"{ours['bytes_per_record'] * 30e6 / 1e9:.1f} GB against {base['bytes_per_record'] * 30e6 / 1e9:.1f} GB")
    emit_result({
        "name": "ingest_skip_records",
        "ours": round(ours["bytes_per_record"], 1),
        "baseline": round(base["bytes_per_record"], 1),
        "unit": "bytes of coordinator memory per skip record (peak RSS over the footprint before)",
        "ratio": round(ratio, 3),
        "extra": {"records": n, "seconds": {"ours": round(ours["seconds"], 2), "baseline": round(base["seconds"], 2)},
                  "baseline_is": "a Python list of one dict per record (origin, kind, reason)"},
        "machine": machine_info(cpu_busy),
    })


def in_fresh_process(which: str, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", which, str(n)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--quick", action="store_true", help="one small size (100k inputs)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--listing", action="store_true", help="measure parallel listing on moto instead")
    parser.add_argument("--classes", type=int, default=32, help="--listing: class folders")
    parser.add_argument("--per-class", type=int, default=50, help="--listing: objects per class folder")
    parser.add_argument("--latency", type=float, default=0.1, help="--listing: seconds added to each request")
    parser.add_argument("--skips", type=int, metavar="N", help="measure holding N skip records instead")
    args = parser.parse_args()
    if args.child:
        which, n = args.child[0], int(args.child[1])
        if which.startswith("skips_"):
            print(json.dumps(measure_skips(which, n)))
        else:
            measure = {"ours": measure_ours, "ours_in_heap": lambda n: measure_ours(n, spilled=False),
                       "baseline": measure_baseline}[which]
            print(json.dumps(measure(n)))
        return
    cpu_busy = cpu_busy_before_start()
    if args.listing:
        listing_main(args, cpu_busy)
        return
    if args.skips:
        skips_main(args.skips, cpu_busy)
        return
    sizes = [100_000] if args.quick else args.inputs
    rows = {}
    for n in sizes:
        ours, in_heap, base = (in_fresh_process(which, n) for which in ("ours", "ours_in_heap", "baseline"))
        rows[n] = {"ours": ours, "ours_in_heap": in_heap, "baseline": base}
        log(f"  {n:>11,} inputs: ours {ours['heap_bytes_per_input']:6.0f} B/input in the heap "
            f"({ours['bytes_per_input']:.0f} with the mapped listing's pages; not spilled: "
            f"{in_heap['heap_bytes_per_input']:.0f}), "
            f"{ours['seconds'] / n * 1e6:6.2f} s per million (joining chunks {ours['listing_seconds']:.1f} s of "
            f"{ours['seconds']:.1f} s; the listing tasks' own work {ours['task_seconds']:.1f} s; sending shards "
            f"{ours['send_us_per_input']:.2f} us an input; saved listing {ours['saved_bytes_per_input']:.1f} B/input on "
            f"disk, read back in {ours['read_back_seconds']:.1f} s); baseline (key strings) "
            f"{base['bytes_per_input']:5.0f} B/input")
    largest = rows[max(sizes)]
    ours_b, base_b = largest["ours"]["heap_bytes_per_input"], largest["baseline"]["heap_bytes_per_input"]
    with_pages = largest["ours"]["bytes_per_input"]
    at_paper = ours_b * PAPER_INPUTS / 1e9
    seconds_per_million = largest["ours"]["seconds"] / max(sizes) * 1e6
    log(f"  at 300M inputs: ~{at_paper:.0f} GB of heap in one coordinator process (with the mapped listing's "
        f"pages ~{with_pages * PAPER_INPUTS / 1e9:.0f} GB of RSS, the kernel's to drop) and ~"
        f"{seconds_per_million * 300 / 60:.0f} min from listing to plan (goal <= {GOAL_BYTES} B/input: "
        f"{'met' if with_pages <= GOAL_BYTES else 'not met'} counting the pages too)")
    emit_result({
        "name": "ingest_scale",
        "ours": round(ours_b, 1),
        "baseline": round(base_b, 1),
        "unit": "bytes of coordinator heap per input (peak RssAnon over the footprint before listing; the "
                "listing's columns spilled to memory-mapped files)",
        "ratio": round(ours_b / base_b, 3),
        "extra": {
            "goal_bytes_per_input": GOAL_BYTES,
            "goal_met": with_pages <= GOAL_BYTES,
            "peak_rss_bytes_per_input": round(with_pages, 1),
            "in_heap_bytes_per_input": round(largest["ours_in_heap"]["heap_bytes_per_input"], 1),
            "seconds_per_million": round(seconds_per_million, 2),
            "extrapolated_300m_gb": round(at_paper, 1),
            "extrapolated_300m_minutes": round(seconds_per_million * 300 / 60, 1),
            "saved_listing_300m_gb": round(largest["ours"]["saved_bytes_per_input"] * PAPER_INPUTS / 1e9, 1),
            "read_back_300m_minutes": round(largest["ours"]["read_back_seconds"] / max(sizes) * PAPER_INPUTS / 60, 1),
            "sizes": {str(n): {k: {m: round(v, 2) for m, v in r.items()} for k, r in row.items()}
                      for n, row in rows.items()},
            "classes": CLASSES, "shard_samples": SHARD_SAMPLES,
            "baseline_is": "a Python list of the listing's object keys",
        },
        "machine": machine_info(cpu_busy),
    })


if __name__ == "__main__":
    main()
