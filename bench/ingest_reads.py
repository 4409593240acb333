"""How many times ``mode: copy`` reads a webdataset corpus on S3: with the listing's local copies
(``cache_sources: true``, ours) against reading the source again to write (``false``, what copy
mode did before), on two Ray nodes with separate local disks.

A ``ray.cluster_utils.Cluster`` of two nodes on this machine, each with its own ``TMPDIR`` (its
"local disk": a copy one node keeps is not seen by the other), runs the ingest stage through the
engine against moto's S3 server behind a proxy (``bench/faultproxy.py``) that counts the body
bytes served for each object and adds ``--latency`` to every request. The listing tasks spread
over both nodes, so each node holds some of the copies and a writing task finds its bytes only on
the node it is sent to: the read volume shows whether the placement works across nodes, not just
on one. The same shards must come out of both runs (checked: paths and sha256).

``ratio`` is the source bytes read without the copies over the bytes read with them (2.0 is the
ideal: the listing's read, then the writing's); the times are reported, not judged (moto on
loopback is not S3).

    python bench/ingest_reads.py [--shards 8] [--samples 40] [--latency 0.02]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from corpus import cpu_busy_before_start, emit_result, log, machine_info, start_moto  # noqa: E402


def _images(count: int, seed: int) -> list[bytes]:
    """Noise JPEGs of ~20 KB (noise does not compress: the bytes are what is moved)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


def _shard(index: int, samples: int, images: list[bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(samples):
            for ext, data in (("cls", str(i % 10).encode()), ("jpg", images[(index * samples + i) % len(images)])):
                info = tarfile.TarInfo(f"s{index:04d}-{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _ingest(uri: str, endpoint: str, path: str, cache: bool, shard_samples: int) -> tuple[float, object]:
    from cluster.executor import RayExecutor
    from pipeline.config import parse_config
    from pipeline.engine import run_pipeline
    from pipeline.manifest import read_manifest
    from pipeline.storage import open_storage

    config = parse_config({"name": "reads", "storage": {"endpoint_url": endpoint}, "stages": {"ingest": {
        "type": "ingest", "params": {"source": "webdataset", "path": path, "shard_samples": shard_samples,
                                     "workers": 4, "cache_sources": cache}}}})
    started = time.perf_counter()
    assert run_pipeline(config, uri, RayExecutor()).ok
    seconds = time.perf_counter() - started
    return seconds, read_manifest(open_storage(uri, config.storage).child("stages/ingest"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8, help="source shards (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=40, help="samples per source shard (default: %(default)s)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds added to each S3 request")
    args = parser.parse_args()
    busy = cpu_busy_before_start()

    import ray
    from faultproxy import FaultProxy
    from ray.cluster_utils import Cluster

    server, endpoint, s3 = start_moto("corpus")
    images = _images(64, seed=0)
    sizes = {}
    for index in range(args.shards):
        body = _shard(index, args.samples, images)
        s3.put_object(Bucket="corpus", Key=f"wds/train-{index:06d}.tar", Body=body)
        sizes[f"/corpus/wds/train-{index:06d}.tar"] = len(body)
    corpus = sum(sizes.values())

    with tempfile.TemporaryDirectory() as scratch:
        disks = [os.path.join(scratch, name) for name in ("node-a", "node-b")]
        for disk in disks:
            os.makedirs(disk)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False, "env_vars": {"TMPDIR": disks[0]}})
        try:
            cluster.add_node(num_cpus=2, env_vars={"TMPDIR": disks[1]})
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            runs = {}
            with FaultProxy(endpoint, latency_s=args.latency) as proxy:
                for name, cache in (("baseline", False), ("ours", True)):
                    proxy.object_bytes.clear()
                    seconds, manifest = _ingest(f"s3://corpus/runs/{name}", proxy.url, "s3://corpus/wds", cache,
                                                shard_samples=args.samples // 2 + 3)  # cuts across source shards
                    read = sum(proxy.object_bytes[path] for path in sizes)
                    runs[name] = {"seconds": seconds, "read": read, "manifest": manifest}
                    log(f"  {name}: read {read / corpus:.2f}x the corpus ({read:,} of {corpus:,} bytes) in "
                        f"{seconds:.1f} s{'; ' + json.dumps(manifest.metrics.get('source_cache')) if cache else ''}")
            left = [os.path.join(disk, folder) for disk in disks
                    for folder in os.listdir(os.path.join(disk, "vitpipe-source-cache"))] \
                if any(os.path.isdir(os.path.join(d, "vitpipe-source-cache")) for d in disks) else []
        finally:
            ray.shutdown()
            cluster.shutdown()
            server.stop()

    ours, base = runs["ours"], runs["baseline"]
    same = [(o.path, o.sha256) for o in ours["manifest"].outputs] == [(o.path, o.sha256) for o in base["manifest"].outputs]
    ratio = base["read"] / ours["read"]
    emit_result({
        "name": "ingest_source_reads",
        "ours": round(ours["read"] / corpus, 3),
        "baseline": round(base["read"] / corpus, 3),
        "unit": "source bytes read from S3 / corpus bytes, mode: copy of a webdataset corpus on two Ray nodes "
                "(ours: cache_sources: true; baseline: false, as before)",
        "ratio": round(ratio, 3),
        "extra": {"goal": "ours == 1.0", "goal_met": ours["read"] == corpus, "same_shards": same,
                  "copies_left_on_nodes": left, "corpus_bytes": corpus, "source_shards": args.shards,
                  "samples_per_shard": args.samples, "latency_s": args.latency,
                  "source_cache": ours["manifest"].metrics.get("source_cache"),
                  "seconds": {"ours": round(ours["seconds"], 2), "baseline": round(base["seconds"], 2)}},
        "machine": machine_info(busy),
    })


if __name__ == "__main__":
    main()
