"""Pretraining across two Ray nodes (``ray.cluster_utils.Cluster``), one worker per node, ZeRO-2,
with the run on S3 and the S3 endpoint known only to the driver (``vitpipe run --address``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.storage import S3Storage
from tests.conftest import REPO, S3_KEY_ID, cli_env

pytestmark = pytest.mark.slow


def test_zero2_on_two_nodes_on_s3_learns_with_disjoint_samples(tmp_path, s3_endpoint, s3_bucket):
    config = {
        "name": "two-nodes", "seed": 3,
        "stages": {
            "ingest": {"type": "ingest", "params": {"source": "digits", "image_size": 16, "shard_samples": 100,
                                                    "workers": 2}},
            "pretrain": {"type": "pretrain", "inputs": {"data": "ingest"}, "params": {
                "model": "Ti/4", "width": 64, "depth": 2, "heads": 2, "mlp_dim": 128, "image_size": 16,
                "steps": 40, "global_batch": 32, "micro_batch": 16, "lr": 0.003, "warmup_steps": 3,
                "weight_decay": 0.0, "crop_scale_min": 0.6, "hflip": False, "workers": 2, "zero_stage": 2, "checkpoint_every": 20,
                "ledger": True, "tensorboard": False, "log_every": 5}},
        },
    }
    run_uri, result_file = f"s3://{s3_bucket}/two-nodes", tmp_path / "result.json"
    env = cli_env()
    env.pop("AWS_ENDPOINT_URL", None)
    proc = subprocess.run([sys.executable, "-m", "tests.multinode_driver", run_uri, json.dumps(config), s3_endpoint,
                           str(result_file)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(result_file.read_text())
    assert result["nodes"] == 2
    # The endpoint reached the second node through the job's runtime_env; the driver's key id did not.
    assert result["seen"] == {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": S3_KEY_ID}

    out = S3Storage(f"{run_uri}/stages/pretrain", endpoint_url=s3_endpoint)
    placement = json.loads(out.read_text("workers.json"))
    assert len({w["node_id"] for w in placement}) == 2, placement  # one worker on each node
    history = [json.loads(line) for line in out.read_text("metrics.jsonl").splitlines()]
    first, last = sum(h["loss"] for h in history[:5]) / 5, sum(h["loss"] for h in history[-5:]) / 5
    assert last < first - 0.1, (first, last)
    rank0, rank1 = (json.loads(out.read_text(f"ledger/rank{r}.json")) for r in range(2))
    assert len(rank0) == len(rank1) == 40 * 16
    first_epoch = 30 * 16  # within the first epoch (each rank holds >= 590 of the 1297 train samples)
    assert not set(rank0[:first_epoch]) & set(rank1[:first_epoch])  # the nodes read disjoint samples
    assert out.exists("model.safetensors")
