"""Runs a tiny ingest -> elastic pretrain pipeline on a two-node Ray cluster on this machine, on S3,
takes the second node away mid-run (a machine that dies) and later lets a fresh one join.

``ray.cluster_utils.Cluster`` starts a head (one CPU, and the ``coordinator`` resource that pins the
stage tasks to it, as a real cluster keeps them off nodes that may vanish) and a second node with
one CPU, so the ``workers: [1, 2]`` group starts with one worker per node. Once a checkpoint of that
group is committed, the second node's raylet and worker are killed (``allow_graceful=False``); once
the group has restarted on one worker, a fresh node joins, and the group should grow back. The
stage's ``attempts.jsonl`` records every start of the group: its size and the step it resumed from.

The nodes start *without* ``AWS_ENDPOINT_URL`` (as a cluster's nodes would lack a setting of the
submitting shell); the driver then sets it and a different access key id, and joins through
:func:`cluster.runtime.ray_runtime` as ``vitpipe run --address`` does: every stage task reaches the
S3 endpoint only if the driver forwarded it, and must still use its node's own credentials. A probe
task on the node that joined last reports what it sees.

Run as a subprocess by tests/test_multinode.py (the test process holds its own Ray connection).
Usage: python -m tests.multinode_driver RUN_URI CONFIG_JSON S3_ENDPOINT RESULT_FILE
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.executor import RayExecutor
from cluster.runtime import ray_runtime
from pipeline.config import RaySettings, parse_config
from pipeline.engine import run_pipeline
from pipeline.environment import scoped_environment
from pipeline.storage import S3Storage

DRIVER_KEY_ID = "AKIADRIVERONLYKEY000"  # must never reach a task
COORDINATOR = "coordinator"  # a custom resource only the head has: the stage tasks run there
# What the cluster's machines have (the test starts this process without the endpoint): a node that
# joins later must not inherit the driver's settings.
NODE_ENVIRONMENT = {name: os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}


@ray.remote(num_cpus=0)
def _probe() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")}


class _Stage:
    """What the pretrain stage has written so far (its folder on S3)."""

    def __init__(self, run_uri: str, endpoint: str) -> None:
        self.out = S3Storage(f"{run_uri}/stages/pretrain", endpoint_url=endpoint)

    def group_sizes(self) -> list[int]:
        if not self.out.exists("attempts.jsonl"):
            return []
        return [json.loads(line)["world_size"] for line in self.out.read_text("attempts.jsonl").splitlines()]

    def committed(self) -> list[int]:
        return sorted(int(o.path.split("/")[1].split("-")[1]) for o in self.out.list("checkpoints/")
                      if o.path.endswith("/COMPLETE.json") and o.path.count("/") == 2)


def _wait(predicate: Any, finished: threading.Event, timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not finished.is_set():
        if predicate():
            return True
        time.sleep(0.5)
    return bool(predicate())


def _take_a_node_away_and_back(cluster: Cluster, node: Any, stage: _Stage, finished: threading.Event,
                               events: list[dict[str, Any]]) -> Any:
    """Returns the node that joined (None if the run ended first)."""
    started = time.monotonic()

    def note(what: str, **extra: Any) -> None:
        events.append({"event": what, "t": round(time.monotonic() - started, 1), **extra})

    if not _wait(lambda: stage.group_sizes()[-1:] == [2] and stage.committed(), finished):
        return note("no checkpoint at two workers")
    cluster.remove_node(node, allow_graceful=False)
    note("node removed", committed=stage.committed())
    if not _wait(lambda: stage.group_sizes()[-1:] == [1], finished):
        return note("the group did not restart on one worker")
    note("running on one worker")
    with scoped_environment(NODE_ENVIRONMENT):
        joined = cluster.add_node(num_cpus=1)
    note("node added")
    if _wait(lambda: stage.group_sizes()[-1:] == [2], finished):
        note("running on two workers")
    return joined


def main(run_uri: str, config_json: str, endpoint: str, result_file: str) -> int:
    # The GCS declares a silent node dead after period x threshold (default 3 s x 5): 1 s x 3 here.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "resources": {COORDINATOR: 8},
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}})
    finished, events, outcome = threading.Event(), [], {}

    def run() -> None:
        try:
            outcome["ok"] = run_pipeline(parse_config(json.loads(config_json)), run_uri, RayExecutor()).ok
        finally:
            finished.set()

    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=DRIVER_KEY_ID)
        with ray_runtime(RaySettings(), address=cluster.address):
            nodes = len(ray.nodes())
            pipeline = threading.Thread(target=run, daemon=True)
            pipeline.start()
            # Ray adds and removes nodes only from the main thread (it sets signal handlers).
            joined = _take_a_node_away_and_back(cluster, second, _Stage(run_uri, endpoint), finished, events)
            pipeline.join()
            seen = ray.get(_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                joined.node_id, soft=False)).remote()) if joined else None
        # stdout carries Ray's worker logs too, so the result goes to a file.
        result = {"ok": outcome.get("ok", False), "nodes": nodes, "seen": seen, "events": events}
        Path(result_file).write_text(json.dumps(result))
        return 0 if result["ok"] else 1
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
