"""Runs a tiny ingest -> pretrain pipeline on a two-node Ray cluster on this machine.

``ray.cluster_utils.Cluster`` starts a head and a second node as separate raylets (each with one
CPU), so Ray Train must place one worker per node. Run as a subprocess by
tests/test_multinode.py (the test process already holds its own Ray connection).
Usage: python -m tests.multinode_driver RUN_DIR CONFIG_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from cluster.executor import RayExecutor
from pipeline.config import parse_config
from pipeline.engine import run_pipeline


def main(run_dir: str, config_json: str) -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        summary = run_pipeline(parse_config(json.loads(config_json)), run_dir, RayExecutor())
        # stdout carries Ray's worker logs too, so the result goes to a file beside the run.
        result = {"ok": summary.ok, "failed": summary.failed, "nodes": len(ray.nodes())}
        Path(run_dir + ".result.json").write_text(json.dumps(result))
        return 0 if summary.ok else 1
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
