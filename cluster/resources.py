"""Translate stage resource requests into Ray task options (pure)."""

from __future__ import annotations

from typing import Any

from pipeline.config import StageResources

__all__ = ["ray_task_options"]

_GIB = 1 << 30


def ray_task_options(resources: StageResources, name: str) -> dict[str, Any]:
    """Options for ``ray.remote(...).options(**opts)`` that reserve what the stage asked for."""
    options: dict[str, Any] = {
        "num_cpus": resources.cpus,
        "num_gpus": resources.gpus,
        "name": f"stage:{name}",
        # A stage's retry policy is the engine's (resume), not Ray's: a blind retry could
        # double-write outputs or hide a real failure.
        "max_retries": 0,
    }
    if resources.memory_gb is not None:
        options["memory"] = int(resources.memory_gb * _GIB)
    if resources.custom:
        options["resources"] = dict(resources.custom)
    return options
