"""Pretraining across two Ray nodes (``ray.cluster_utils.Cluster``), one worker per node, ZeRO-2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env

pytestmark = pytest.mark.slow


def test_zero2_on_two_nodes_learns_with_disjoint_samples(tmp_path):
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
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tests.multinode_driver", str(run), json.dumps(config)],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((tmp_path / "run.result.json").read_text())["nodes"] == 2

    out = run / "stages/pretrain"
    placement = json.loads((out / "workers.json").read_text())
    assert len({w["node_id"] for w in placement}) == 2, placement  # one worker on each node
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(h["loss"] for h in history[:5]) / 5, sum(h["loss"] for h in history[-5:]) / 5
    assert last < first - 0.1, (first, last)
    rank0, rank1 = (json.loads((out / f"ledger/rank{r}.json").read_text()) for r in range(2))
    assert len(rank0) == len(rank1) == 40 * 16
    first_epoch = 30 * 16  # within the first epoch (each rank holds >= 590 of the 1297 train samples)
    assert not set(rank0[:first_epoch]) & set(rank1[:first_epoch])  # the nodes read disjoint samples
    assert (Path(out) / "model.safetensors").exists()
