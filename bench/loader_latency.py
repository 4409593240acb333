"""Benchmark: our loader over S3 with 200 ms added to every request vs. the same loader without it.

A far-away or busy object store answers each request late; a loader that opens a shard only when
it needs its first sample waits for that at every shard. Ours opens the shards each stream reads
next ahead of time (``stages.data.streams``), so the wait should disappear behind decoding.

Both runs read the same shards (the benchmark corpus, written with our ingest functions, copy
mode) from moto's S3 server on 127.0.0.1, in one process with one torch thread, with the mixing
order the training stages use (``bench/loader.py``'s ``MIXING``): directly, and through
``bench/faultproxy.py`` adding ``--latency-ms`` before every request it forwards. Rounds alternate
the two; the medians are compared. Main ratio: with latency / without (goal from the
sample-order issue: >= 0.9).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from corpus import cpu_busy_before_start, emit_result, log, machine_info, run_rounds, summarize
from faultproxy import FaultProxy
from loader import BATCH_SIZE, IMAGE_SIZE, MIXING, write_shards

from pipeline.storage import LocalStorage, S3Storage
from stages.data.loader import ShardInfo, ShardLoader

GOAL = 0.9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1600, help="corpus images (default: %(default)s)")
    parser.add_argument("--shard-samples", type=int, default=100, help="images per shard (default: %(default)s)")
    parser.add_argument("--latency-ms", type=float, default=200.0, help="added per request (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both runs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 images, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.images, args.shard_samples, args.repeats = 256, 32, 1
    return args


def measure(label: str, storage: S3Storage, shards: list[ShardInfo], count: int) -> float:
    loader = ShardLoader(storage, shards, MIXING, global_batch=BATCH_SIZE, micro_batch=BATCH_SIZE,
                         image_size=IMAGE_SIZE)
    started = time.perf_counter()
    seen = sum(len(batch["key"]) for batch in islice(loader, count // BATCH_SIZE))
    seconds = time.perf_counter() - started
    if seen != count:
        raise RuntimeError(f"{label}: {seen} images, {count} expected")
    log(f"  {label:<13} {seen} images in {seconds:6.2f} s = {seen / seconds:7.1f} images/s")
    return seen / seconds


def main() -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    args = parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request otherwise
    # moto's local server accepts any credentials; these only ever go to 127.0.0.1.
    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    cpu_busy = cpu_busy_before_start()
    torch.set_num_threads(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"  # port 0: the one it got
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        direct = S3Storage("s3://bench/corpus", endpoint_url=endpoint)
        with tempfile.TemporaryDirectory(prefix="vitpipe-bench-latency-") as tmp:
            shards, corpus = write_shards(args.images, args.seed, args.shard_samples, Path(tmp))
            local = LocalStorage(tmp)
            for shard in shards:
                direct.write_bytes(shard.path, local.read_bytes(shard.path))
        count = sum(s.samples for s in shards) // BATCH_SIZE * BATCH_SIZE
        with FaultProxy(endpoint, latency_s=args.latency_ms / 1000) as proxy:
            far = S3Storage("s3://bench/corpus", endpoint_url=proxy.url)
            log(f"loader latency benchmark: {count} images, {len(shards)} shards, +{args.latency_ms:g} ms per "
                f"request, {args.repeats} round(s)")
            samples = run_rounds({"no_latency": lambda: measure("no latency", direct, shards, count),
                                  "latency": lambda: measure(f"+{args.latency_ms:g} ms", far, shards, count)},
                                 args.repeats)
            requests = proxy.counts["requests"]
    finally:
        server.stop()
    rates = summarize(samples)
    ratio = rates["latency"] / rates["no_latency"]
    log(f"  ratio with / without latency = {ratio:.3f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'not met'})")
    emit_result({
        "name": "loader_latency",
        "ours": round(rates["latency"], 1),
        "baseline": round(rates["no_latency"], 1),
        "unit": "images/s per core",
        "ratio": round(ratio, 4),
        "extra": {
            "baseline_name": "the same loader without the added latency",
            "latency_ms_per_request": args.latency_ms,
            "requests_through_the_proxy": requests,
            "goal": GOAL,
            "goal_met": ratio >= GOAL,
            "samples": {k: [round(v, 1) for v in vs] for k, vs in samples.items()},
            "statistic": f"median of {args.repeats}",
            "images": count,
            "shards": len(shards),
            "order": {"streams": MIXING.streams, "open_shards": MIXING.open_shards,
                      "shuffle_buffer": MIXING.shuffle_buffer},
            "corpus": corpus,
        },
        "machine": machine_info(cpu_busy),
    })


if __name__ == "__main__":
    main()
