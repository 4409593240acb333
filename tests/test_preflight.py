"""A stage the cluster can never run is refused before anything runs, in one line (pure check,
and the driver on a real 2-CPU Ray instance)."""

from __future__ import annotations

import pytest

from pipeline.config import StageResources, parse_config
from pipeline.errors import VitpipeError
from pipeline.preflight import ResourceDemand, infeasible_reason, task_demand

P5 = {"CPU": 192.0, "GPU": 8.0, "memory": 2e12, "node:10.0.0.1": 1.0, "accelerator_type:H100": 1.0}
HEAD = {"CPU": 8.0, "memory": 3e10, "node:10.0.0.0": 1.0}
CLUSTER = [HEAD] + [P5] * 16  # the H/14 recipe: 16 p5 nodes, 128 GPUs


def _workers(n: int, cpus: float = 8.0, gpu: bool = True) -> ResourceDemand:
    return ResourceDemand(bundles=({"CPU": cpus, "GPU": 1.0 if gpu else 0.0},) * n, together=True,
                          label="training worker")


def test_what_fits_passes_even_when_it_must_wait_its_turn():
    assert infeasible_reason("pretrain", {"CPU": 0}, _workers(128), CLUSTER) is None
    # One at a time is enough for queued tasks: 10,000 shard tasks on a small cluster are fine.
    queued = ResourceDemand(bundles=({"CPU": 1.0},), label="shard-writing task")
    assert infeasible_reason("ingest", {"CPU": 0}, queued, [HEAD]) is None


@pytest.mark.parametrize("task, demand, nodes, expected", [
    ({"CPU": 0}, _workers(129), CLUSTER,
     "stage pretrain: 129 training workers at once ask for CPU 1032, GPU 129 in all; the cluster has CPU 3080, "
     "GPU 128, memory 29830 GiB on 17 nodes (the largest: CPU 192, GPU 8, memory 1863 GiB); lower the stage's workers"),
    ({"CPU": 0}, _workers(2, cpus=1.0), [HEAD],
     "stage pretrain: each training worker asks for CPU 1, GPU 1 and no node has that; the cluster has CPU 8, "
     "memory 28 GiB on 1 node"),
    ({"CPU": 0}, _workers(8, cpus=256.0), CLUSTER,
     "stage pretrain: each training worker asks for CPU 256, GPU 1 and no node has that"),
    ({"CPU": 1.0, "memory": 4e12}, ResourceDemand(), CLUSTER,
     "stage pretrain: its task asks for CPU 1, memory 3725 GiB and no node has that"),
])
def test_what_can_never_run_is_named_with_what_it_asks_and_what_the_cluster_has(task, demand, nodes, expected):
    reason = infeasible_reason("pretrain", task, demand, nodes)
    assert reason is not None and reason.startswith(expected), reason
    assert "\n" not in reason and reason.endswith("(autoscaling: set ray.autoscaling: true)")


def test_task_demand_speaks_rays_resource_names():
    assert task_demand(StageResources(cpus=2, gpus=1, memory_gb=4, custom={"tpu": 1})) == {
        "CPU": 2, "GPU": 1, "tpu": 1, "memory": 4 * 2**30}


def test_the_driver_refuses_an_impossible_stage_before_running_anything(ray_instance, tmp_path):
    from cluster.executor import RayExecutor
    from pipeline.engine import run_pipeline

    config = parse_config({"name": "too-big", "stages": {
        "ingest": {"type": "ingest", "params": {"source": "digits", "image_size": 16}},
        "pretrain": {"type": "pretrain", "inputs": {"data": "ingest"}, "params": {
            "model": "Ti/4", "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "image_size": 16, "steps": 2,
            "warmup_steps": 1, "global_batch": 12, "micro_batch": 4, "workers": 3}}}})
    with pytest.raises(VitpipeError, match=r"^stage pretrain: 3 training workers at once ask for CPU 3 in all; "
                                           r"the cluster has CPU 2(\.0)?,? .*on 1 node"):
        run_pipeline(config, str(tmp_path / "run"), RayExecutor())
    assert not (tmp_path / "run/stages").exists() and not (tmp_path / "run/state.json").exists()  # nothing ran
    autoscaled = config.model_copy(update={"ray": config.ray.model_copy(update={"autoscaling": True})})
    from pipeline.engine import _Driver  # noqa: PLC0415 - the check alone; an autoscaled run would wait for nodes
    from pipeline.lock import RunLock
    from pipeline.storage import LocalStorage

    driver = _Driver(autoscaled, LocalStorage(tmp_path / "other"), RayExecutor(), False, RunLock(LocalStorage(tmp_path)))
    driver._preflight([type("Plan", (), {"name": "pretrain"})()])  # no error
