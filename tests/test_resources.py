from cluster.resources import ray_task_options
from pipeline.config import StageResources


def test_resources_map_to_ray_options():
    opts = ray_task_options(StageResources(cpus=0.5, gpus=1, memory_gb=2, custom={"H100": 1}), "pretrain")
    assert opts == {"num_cpus": 0.5, "num_gpus": 1.0, "name": "stage:pretrain", "max_retries": 0,
                    "memory": 2 * 1024**3, "resources": {"H100": 1.0}}


def test_defaults_reserve_one_cpu_and_no_extras():
    opts = ray_task_options(StageResources(), "x")
    assert opts["num_cpus"] == 1 and opts["num_gpus"] == 0
    assert "memory" not in opts and "resources" not in opts
