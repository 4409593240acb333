"""Ingest's listing-to-plan at paper scale: memory per input and seconds per million.

Synthetic listings (no image bytes) of an ImageFolder-like corpus — ``CLASS/IMAGE.jpg`` under a
bucket prefix, 1000 classes, a size per file — go through what the ingest coordinator does before
any image is read: the source's listing (``SourceItem`` per input), ``screen_items``, the class
list, ``plan_shards`` (seeded shuffle, 1000 per shard) and ``plan_digest`` per shard. Each size
runs in a fresh process; its peak resident memory over the process's start-up footprint, divided
by the inputs, is the memory per input.

Baseline, measured the same way: the listing as a plain Python list of its object keys — the least
any per-item Python listing holds (what ``aws s3 ls`` or ``os.walk`` output kept in a list costs).
``ratio`` is ours / baseline bytes per input at the largest size. Goal from the issue: <= 100
bytes per input (300M inputs in <= 30 GB); the line also gives the 300M extrapolation.

    python bench/ingest_scale.py [--inputs 1000000 10000000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from corpus import cpu_busy_before_start, emit_result, log, machine_info  # noqa: E402

CLASSES, SHARD_SAMPLES, PAPER_INPUTS, GOAL_BYTES = 1000, 1000, 300_000_000, 100
PREFIX = "s3://datasets/imagenet21k/train"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _keys(n: int):
    for i in range(n):
        yield f"n{i % CLASSES:08d}/n{i % CLASSES:08d}_{i:09d}.JPEG"


def measure_ours(n: int) -> dict[str, float]:
    """In this (fresh) process: listing to plan for ``n`` synthetic inputs."""
    from stages.data.sources import SourceItem, sort_labels
    from stages.ingest import plan_digest, plan_shards, screen_items

    start_rss, started = _peak_rss(), time.perf_counter()
    items = [SourceItem(key=key[:-5], split="train", label=key.split("/", 1)[0], locator=key,
                        origin=f"{PREFIX}/{key}", size=110_000 + i % 997, filename=key.rsplit("/", 1)[1])
             for i, key in enumerate(_keys(n))]  # what ImageFolderSource.items() returns
    listed = time.perf_counter()
    kept, skipped = screen_items(items)
    names = sort_labels({i.label for i in kept if i.label is not None})
    class_index = {name: k for k, name in enumerate(names)}
    plans = plan_shards(kept, SHARD_SAMPLES, shuffle_seed=0)
    digests = [plan_digest(plan, class_index, ("copy", 512, 90, "structure")) for plan in plans]
    done = time.perf_counter()
    assert len(kept) == n and not skipped and len(digests) == -(-n // SHARD_SAMPLES)
    return {"bytes_per_input": (_peak_rss() - start_rss) / n, "seconds": done - started,
            "listing_seconds": listed - started}


def measure_baseline(n: int) -> dict[str, float]:
    """In this (fresh) process: the listing as a list of key strings, and nothing else."""
    start_rss, started = _peak_rss(), time.perf_counter()
    keys = list(_keys(n))
    done = time.perf_counter()
    assert len(keys) == n
    return {"bytes_per_input": (_peak_rss() - start_rss) / n, "seconds": done - started}


def in_fresh_process(which: str, n: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", which, str(n)], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--quick", action="store_true", help="one small size (100k inputs)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        which, n = args.child[0], int(args.child[1])
        print(json.dumps((measure_ours if which == "ours" else measure_baseline)(n)))
        return
    sizes = [100_000] if args.quick else args.inputs
    cpu_busy = cpu_busy_before_start()
    rows = {}
    for n in sizes:
        ours, base = in_fresh_process("ours", n), in_fresh_process("baseline", n)
        rows[n] = {"ours": ours, "baseline": base}
        log(f"  {n:>11,} inputs: ours {ours['bytes_per_input']:6.0f} B/input, "
            f"{ours['seconds'] / n * 1e6:6.2f} s per million (listing {ours['listing_seconds']:.1f} s of "
            f"{ours['seconds']:.1f} s); baseline (key strings) {base['bytes_per_input']:5.0f} B/input")
    largest = rows[max(sizes)]
    ours_b, base_b = largest["ours"]["bytes_per_input"], largest["baseline"]["bytes_per_input"]
    at_paper = ours_b * PAPER_INPUTS / 1e9
    seconds_per_million = largest["ours"]["seconds"] / max(sizes) * 1e6
    log(f"  at 300M inputs: ~{at_paper:.0f} GB in one coordinator process and ~"
        f"{seconds_per_million * 300 / 60:.0f} min from listing to plan (goal <= {GOAL_BYTES} B/input: "
        f"{'met' if ours_b <= GOAL_BYTES else 'not met'})")
    emit_result({
        "name": "ingest_scale",
        "ours": round(ours_b, 1),
        "baseline": round(base_b, 1),
        "unit": "bytes of coordinator memory per input (peak RSS over start-up)",
        "ratio": round(ours_b / base_b, 3),
        "extra": {
            "goal_bytes_per_input": GOAL_BYTES,
            "goal_met": ours_b <= GOAL_BYTES,
            "seconds_per_million": round(seconds_per_million, 2),
            "extrapolated_300m_gb": round(at_paper, 1),
            "extrapolated_300m_minutes": round(seconds_per_million * 300 / 60, 1),
            "sizes": {str(n): {k: {m: round(v, 2) for m, v in r.items()} for k, r in row.items()}
                      for n, row in rows.items()},
            "classes": CLASSES, "shard_samples": SHARD_SAMPLES,
            "baseline_is": "a Python list of the listing's object keys",
        },
        "machine": machine_info(cpu_busy),
    })


if __name__ == "__main__":
    main()
