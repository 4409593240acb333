"""Runs a tiny ingest -> pretrain pipeline on a two-node Ray cluster on this machine, on S3.

``ray.cluster_utils.Cluster`` starts a head and a second node as separate raylets (each with one
CPU), so Ray Train must place one worker per node. The nodes start *without* ``AWS_ENDPOINT_URL``
(as a cluster's nodes would lack a setting of the submitting shell); the driver then sets it and
a different access key id, and joins through :func:`cluster.runtime.ray_runtime` as ``vitpipe run
--address`` does: every stage task reaches the S3 endpoint only if the driver forwarded it, and
must still use its node's own credentials. A probe task on the second node reports what it sees.
Run as a subprocess by tests/test_multinode.py (the test process holds its own Ray connection).
Usage: python -m tests.multinode_driver RUN_URI CONFIG_JSON S3_ENDPOINT RESULT_FILE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.executor import RayExecutor
from cluster.runtime import ray_runtime
from pipeline.config import RaySettings, parse_config
from pipeline.engine import run_pipeline

DRIVER_KEY_ID = "AKIADRIVERONLYKEY000"  # must never reach a task


@ray.remote(num_cpus=0)
def _probe() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}


def main(run_uri: str, config_json: str, endpoint: str, result_file: str) -> int:
    os.environ.pop("AWS_ENDPOINT_URL", None)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker_node = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=DRIVER_KEY_ID)
        with ray_runtime(RaySettings(), address=cluster.address):
            summary = run_pipeline(parse_config(json.loads(config_json)), run_uri, RayExecutor())
            seen = ray.get(_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                worker_node.node_id, soft=False)).remote())
            # stdout carries Ray's worker logs too, so the result goes to a file.
            result = {"ok": summary.ok, "failed": summary.failed, "nodes": len(ray.nodes()), "seen": seen}
        Path(result_file).write_text(json.dumps(result))
        return 0 if summary.ok else 1
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
