"""Elastic pretraining across two Ray nodes (``ray.cluster_utils.Cluster``), ZeRO-2, on S3, with
the S3 endpoint known only to the driver (``vitpipe run --address``): a node dies mid-run, the
group goes on with one worker from the newest checkpoint without anyone acting, and grows back to
two when a fresh node joins — every global step consuming exactly the samples of the sample order."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.storage import S3Storage
from stages.data.loader import ShardLoader
from stages.data.order import OrderSpec
from stages.records import IngestResult
from stages.train.params import PretrainParams
from stages.train.step import DataFeed
from tests.conftest import REPO, S3_KEY_ID, cli_env, ledger_by_step, wait_for

pytestmark = pytest.mark.slow

# Enough that one worker still trains when Ray Train sees the fresh node: 20-37 s after it joins
# (a 20 s capacity refresh, then the next resize check); one worker made ~420 steps in that time here.
STEPS = 800


def config() -> dict:
    coordinator = {"custom": {"coordinator": 1}}  # the head's: stage tasks never run on a node that dies
    return {
        "name": "two-nodes", "seed": 3,
        "stages": {
            "ingest": {"type": "ingest", "resources": {"cpus": 1, **coordinator},
                       "params": {"source": "digits", "image_size": 16, "shard_samples": 100, "workers": 1}},
            "pretrain": {"type": "pretrain", "inputs": {"data": "ingest"}, "resources": {"cpus": 0, **coordinator},
                         "params": {
                "model": "Ti/4", "width": 64, "depth": 2, "heads": 2, "mlp_dim": 128, "image_size": 16,
                "steps": STEPS, "global_batch": 32, "micro_batch": 16, "lr": 0.003, "warmup_steps": 3,
                "weight_decay": 0.0, "crop_scale_min": 0.6, "hflip": False, "dropout": 0.1, "drop_path": 0.1,
                "workers": [1, 2], "zero_stage": 2, "checkpoint_every": 20, "max_failures": 3,
                "worker_start_timeout_s": 10, "resize_check_s": 2,
                "ledger": True, "tensorboard": False, "log_every": 50}},
        },
    }


def sample_order_by_step(data: S3Storage, seed: int, p: PretrainParams) -> dict[int, list[str]]:
    """What an uninterrupted run consumes at each global step: the loader alone, on one rank."""
    shards = IngestResult.model_validate(json.loads(data.read_text("manifest.json"))["result"]).shards("train")
    order = OrderSpec(seed, p.order_streams, p.open_shards, p.shuffle_buffer)
    loader = ShardLoader(data, shards, order, global_batch=p.global_batch,
                         micro_batch=p.micro_batch, image_size=p.image_size, world_size=1, rank=0,
                         crop_scale=(p.crop_scale_min, 1.0), hflip=p.hflip)
    feed = DataFeed(loader, torch.device("cpu"), torch.float32, record_keys=True)
    steps = {}
    for step in range(1, p.steps + 1):
        for _ in range(p.global_batch // p.micro_batch):
            feed()
        steps[step] = sorted(feed.take_keys())
    return steps


def test_elastic_group_loses_a_node_and_grows_back_on_s3_with_an_exact_ledger(tmp_path, s3_endpoint, s3_bucket):
    raw = config()
    run_uri, result_file = f"s3://{s3_bucket}/two-nodes", tmp_path / "result.json"
    env = cli_env()
    env.pop("AWS_ENDPOINT_URL", None)
    log = tmp_path / "driver.log"
    with open(log, "wb") as output:
        proc = subprocess.Popen([sys.executable, "-m", "tests.multinode_driver", run_uri, json.dumps(raw), s3_endpoint,
                                 str(result_file)], cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            # The reference order, worked out while the cluster trains (mostly waiting on Ray's timeouts).
            data = S3Storage(f"{run_uri}/stages/ingest", endpoint_url=s3_endpoint)
            wait_for(lambda: data.exists("manifest.json") or proc.poll() is not None, timeout=600, interval=1,
                     what="the ingest")
            expected = sample_order_by_step(data, 3, PretrainParams.model_validate(
                raw["stages"]["pretrain"]["params"])) if data.exists("manifest.json") else None
            returncode = proc.wait(timeout=900)
        finally:
            proc.kill()
    assert returncode == 0, log.read_text()[-6000:]
    result = json.loads(result_file.read_text())
    assert result["nodes"] == 2
    events = [e["event"] for e in result["events"]]
    assert events == ["node removed", "running on one worker", "node added", "running on two workers"], result

    out = S3Storage(f"{run_uri}/stages/pretrain", endpoint_url=s3_endpoint)
    attempts = [json.loads(line) for line in out.read_text("attempts.jsonl").splitlines()]
    # Two workers, one after the node died (from the newest checkpoint then), two again.
    assert [a["world_size"] for a in attempts] == [2, 1, 2], attempts
    removed_after = result["events"][0]["committed"][-1]
    shrunk_from, grown_from = attempts[1]["resumed_from"], attempts[2]["resumed_from"]
    # Each resize resumed a checkpoint written by the other number of workers: resharded on S3.
    assert removed_after <= shrunk_from < grown_from < STEPS, (attempts, result["events"])
    # The fresh node started without the endpoint: it reached it through the job's runtime_env; the
    # driver's key id did not.
    assert result["seen"] == {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID}
    placement = json.loads(out.read_text("workers.json"))
    assert len({w["node_id"] for w in placement}) == 2, placement  # one worker on each node at the end

    history = [json.loads(line) for line in out.read_text("metrics.jsonl").splitlines()]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    first, last = sum(h["loss"] for h in history[:20]) / 20, sum(h["loss"] for h in history[-20:]) / 20
    assert last < first - 0.5, (first, last)
    assert out.exists("model.safetensors")

    # The ledger: every global step consumed exactly what the sample order gives it, whichever
    # ranks ran it, with nothing from the work lost at each resize.
    ledgers = [json.loads(out.read_text(o.path)) for o in sorted(out.list("ledger/"), key=lambda o: o.path)]
    assert len(ledgers) == 2
    assert ledger_by_step(ledgers) == expected
