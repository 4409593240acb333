"""An ingest manifest at paper scale: bytes per shard, and `vitpipe status` on such a run.

Builds the manifest an ingest of ``--shards`` shards (default 100k: 300M images at ~3k per shard)
commits — its result record (``stages.ingest.ingest_record``) and its outputs — from synthetic
shard stats, no image bytes, in two formats:

- ours: what ``Ingest`` writes now (compact JSON; each shard once in the outputs list with its
  size and checksum, and as ``{path, samples}`` in the split record; skipped inputs in
  ``skipped.jsonl``, not the manifest);
- baseline: the format before (JSON indented by 2; each shard's stats file listed as an output
  too; size and checksum repeated in the split record), built with the same models.

For each: manifest bytes per shard (goal from the issue: <= 200), the time to serialise it, the
time ``vitpipe status`` (``pipeline.status.collect_status``) takes on a run directory holding it —
ours reads only the manifest's head (the text puts the outputs and result last), the baseline's
order (keys sorted: outputs before params) is read whole — and the time to read and parse the
whole manifest (``read_manifest``: what status did before heads, and what a run's start does).
Prints one JSON line; ``ratio`` is ours / baseline bytes per shard.

    python bench/manifest_scale.py [--shards 100000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.manifest import MANIFEST_NAME, Manifest, OutputEntry, read_manifest  # noqa: E402
from pipeline.status import collect_status  # noqa: E402
from pipeline.storage import LocalStorage  # noqa: E402
from stages.ingest import ShardResult, ingest_record  # noqa: E402

SAMPLES_PER_SHARD, SHARD_BYTES, CLASSES = 3000, 400_000_000, 21843


def synthetic_shards(count: int) -> list[ShardResult]:
    return [ShardResult(f"train-{i:06d}", "train", f"shards/train-{i:06d}.tar", SAMPLES_PER_SHARD, SHARD_BYTES,
                        hashlib.sha256(str(i).encode()).hexdigest()) for i in range(count)]


def ours(shards: list[ShardResult], classes: list[str]) -> str:
    record = ingest_record(shards, classes, len(shards) * SAMPLES_PER_SHARD, 0)
    outputs = [OutputEntry(path=r.path, size=r.bytes, sha256=r.sha256) for r in shards]
    return _manifest(outputs, record.model_dump(mode="json")).to_json()


def baseline(shards: list[ShardResult], classes: list[str]) -> str:
    record = ingest_record(shards, classes, len(shards) * SAMPLES_PER_SHARD, 0).model_dump(mode="json")
    for split in record["splits"].values():  # size and checksum repeated per shard record
        split["shards"] = [{**s, "bytes": r.bytes, "sha256": r.sha256} for s, r in zip(split["shards"], shards)]
    outputs = [entry for r in shards for entry in (
        OutputEntry(path=r.path, size=r.bytes, sha256=r.sha256),
        OutputEntry(path=r.path.replace(".tar", ".json"), size=900, sha256=hashlib.sha256(r.path.encode()).hexdigest()))]
    return json.dumps(_manifest(outputs, record).model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def _manifest(outputs: list[OutputEntry], result: dict) -> Manifest:
    return Manifest(stage="ingest", type="ingest", fingerprint="0" * 32, params={"source": "webdataset"},
                    outputs=outputs, result=result)


def status_seconds(text: str) -> tuple[float, float]:
    """``collect_status`` on a run directory whose only stage is this ingest, and ``read_manifest``
    of the stage's whole manifest."""
    with tempfile.TemporaryDirectory() as tmp:
        run = LocalStorage(tmp)
        config = {"name": "scale", "stages": {"ingest": {"type": "ingest", "params": {
            "source": "webdataset", "path": "s3://corpus/shards"}}}}
        run.write_text("config.json", json.dumps(config))
        run.write_text(f"stages/ingest/{MANIFEST_NAME}", text)
        started = time.perf_counter()
        _, rows = collect_status(run)
        status = time.perf_counter() - started
        started = time.perf_counter()
        manifest = read_manifest(run.child("stages/ingest"))
        whole = time.perf_counter() - started
        assert manifest is not None and rows[0].outputs == 0  # not done under this config: no totals shown
        return status, whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=100_000)
    args = parser.parse_args()
    shards, classes = synthetic_shards(args.shards), [f"n{i:08d}" for i in range(CLASSES)]
    figures = {}
    for name, build in (("ours", ours), ("baseline", baseline)):
        started = time.perf_counter()
        text = build(shards, classes)
        serialise = time.perf_counter() - started
        figures[name] = {"bytes_per_shard": round(len(text.encode()) / args.shards, 1),
                         "manifest_mb": round(len(text.encode()) / 2**20, 1), "build_s": round(serialise, 2),
                         **dict(zip(("status_s", "read_whole_s"), (round(t, 3) for t in status_seconds(text))))}
    print(json.dumps({"bench": "manifest_scale", "shards": args.shards, **figures,
                      "ratio": round(figures["ours"]["bytes_per_shard"] / figures["baseline"]["bytes_per_shard"], 3),
                      "goal_bytes_per_shard": 200}))


if __name__ == "__main__":
    main()
