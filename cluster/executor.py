"""The engine's executor on Ray: each stage runs as a Ray task with its declared resources."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import ray

from cluster.resources import ray_task_options
from pipeline.config import StageResources
from pipeline.runner import StageResult, StageTask, execute_stage

__all__ = ["RayExecutor"]

log = logging.getLogger(__name__)

_run_stage = ray.remote(execute_stage)


class RayExecutor:
    """Submits stage tasks to the connected Ray cluster (see :mod:`cluster.runtime`)."""

    def __init__(self) -> None:
        self._names: dict[Any, str] = {}

    def submit(self, task: StageTask, resources: StageResources) -> Any:
        # Ray Train's helper actors (started from a stage task) look the cluster up through
        # RAY_ADDRESS, else through the newest cluster *any* process on this machine started;
        # pin it so they never chase another (or a dead) instance. env_vars merge with the job's.
        options = {**ray_task_options(resources, task.name),
                   "runtime_env": {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}}
        ref = _run_stage.options(**options).remote(task)
        self._names[ref] = task.name
        return ref

    def wait(self, handles: Sequence[Any], timeout: float) -> list[tuple[Any, StageResult]]:
        ready, _ = ray.wait(list(handles), num_returns=1, timeout=timeout)
        results = []
        for ref in ready:
            name = self._names.pop(ref, "?")
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as err:
                # The task's process died (killed, OOM) or Ray lost it: report it in one line.
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                result = StageResult(name, ok=False, error=f"{type(err).__name__}: {first}")
            results.append((ref, result))
        return results

    def capacity(self) -> list[dict[str, float]] | None:
        return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]

    def cancel(self, handle: Any) -> None:
        # Ray 2.60 aborts the driver process ("Tried to complete task that was not pending",
        # task_manager.cc) when a force-cancel meets a task completing at that moment: leave
        # finished tasks alone (seen in CI when a lost lock cancelled a stage that had just ended).
        ready, _ = ray.wait([handle], timeout=0)
        if ready:
            return
        try:
            ray.cancel(handle, force=True)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.debug("cancel failed", exc_info=True)
