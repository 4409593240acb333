"""Will a stage ever get what it asks for? Checked before anything runs (pure).

Ray queues a demand the cluster can never satisfy without an error: a task that asks for a GPU
on a CPU cluster, or a training group of 16 workers on 8 GPUs, waits forever (Ray Train's
controller even spins a core while it waits). The driver checks each stage it is about to run
against the cluster's nodes first and fails in one line naming the stage, what it asks and what
the cluster has. Only what is certainly impossible is refused — a bundle no node can hold, or a
group larger than the whole cluster — never a demand that merely has to wait its turn. An
autoscaling cluster (``ray.autoscaling: true``) grows on demand, so it is not checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.config import StageResources

__all__ = ["ResourceDemand", "infeasible_reason", "format_resources", "task_demand"]

Resources = Mapping[str, float]


@dataclass(frozen=True)
class ResourceDemand:
    """What a stage's own Ray work needs beyond its coordinating task: ``bundles`` each go to one
    node; ``together`` means all at once (a Ray Train worker group), else one at a time suffices
    (tasks that queue, like ingest's shard writers)."""

    bundles: tuple[Resources, ...] = ()
    together: bool = False
    label: str = "worker"  # what one bundle is, for the message


def task_demand(resources: StageResources) -> dict[str, float]:
    """A stage task's request in Ray's resource names (memory in bytes, as nodes report it)."""
    demand = {"CPU": resources.cpus, "GPU": resources.gpus, **resources.custom}
    if resources.memory_gb is not None:
        demand["memory"] = resources.memory_gb * 2**30
    return demand


def _nonzero(resources: Resources) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if v}


def _fits(demand: Resources, node: Resources) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in _nonzero(demand).items())


def _total(items: Sequence[Resources]) -> dict[str, float]:
    total: dict[str, float] = {}
    for item in items:
        for k, v in _nonzero(item).items():
            total[k] = total.get(k, 0.0) + v
    return total


# Ray's bookkeeping resources on every node: not what a user asks for.
_NOT_SHOWN = ("node:", "object_store_memory", "accelerator_type:")


def format_resources(resources: Resources) -> str:
    shown = {k: v for k, v in _nonzero(resources).items() if not k.startswith(_NOT_SHOWN)}
    if not shown:
        return "nothing"
    parts = []
    for k, v in sorted(shown.items()):
        value = f"{v / 2**30:.0f} GiB" if k == "memory" else f"{v:g}"
        parts.append(f"{k} {value}")
    return ", ".join(parts)


def infeasible_reason(stage: str, task: Resources, demand: ResourceDemand, nodes: Sequence[Resources]) -> str | None:
    """Why ``stage`` can never run on ``nodes`` (each node's total resources), or None if it can."""
    have = _total(nodes)
    largest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    where = (f"the cluster has {format_resources(have)} on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"
             f" (the largest: {format_resources(largest)})")
    fix = "lower the stage's workers or per-worker resources, or add nodes (autoscaling: set ray.autoscaling: true)"
    if not any(_fits(task, node) for node in nodes):
        return f"stage {stage}: its task asks for {format_resources(task)} and no node has that; {where}; {fix}"
    for bundle in demand.bundles:
        if not any(_fits(bundle, node) for node in nodes):
            return (f"stage {stage}: each {demand.label} asks for {format_resources(bundle)} and no node has that; "
                    f"{where}; {fix}")
    if demand.together and demand.bundles:
        asked = _total([task, *demand.bundles])
        short = {k: v for k, v in asked.items() if v > have.get(k, 0.0)}
        if short:
            return (f"stage {stage}: {len(demand.bundles)} {demand.label}s at once ask for {format_resources(asked)} "
                    f"in all; {where}; {fix}")
    return None

