"""Batch geometry: the one place that turns (global batch, micro-batch, world size) into a step.

The global batch is result-defining; the micro-batch and the number of workers only decide how a
global step is computed: accumulation = global / (world x micro). It is resolved once, inside the
workers, from the world size they actually have.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["accumulation_steps", "valid_world_sizes", "BatchGeometry", "StepGeometry"]


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Micro-steps per optimizer step so that micro x accumulation x world = global batch."""
    if min(global_batch, micro_batch, world_size) < 1:
        raise ValueError(f"global batch, micro-batch and world size must be >= 1, got {global_batch}, "
                         f"{micro_batch} and {world_size}")
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(f"global_batch {global_batch} is not divisible by workers x micro_batch "
                         f"({world_size} x {micro_batch} = {per_step}); numbers of workers that can split it: "
                         f"{_listed(valid_world_sizes(global_batch, micro_batch))}")
    return global_batch // per_step


def valid_world_sizes(global_batch: int, micro_batch: int) -> list[int]:
    """Every number of workers that splits ``global_batch`` into whole micro-batches per worker."""
    if global_batch % micro_batch:
        return []
    micro_steps = global_batch // micro_batch
    return [w for w in range(1, micro_steps + 1) if micro_steps % w == 0]


def _listed(sizes: list[int], most: int = 12) -> str:
    if not sizes:
        return "none (micro_batch does not divide global_batch)"
    shown = ", ".join(map(str, sizes[:most]))
    return shown if len(sizes) <= most else f"{shown}, ... {sizes[-1]}"


@dataclass(frozen=True)
class StepGeometry:
    """A batch geometry resolved for a world size."""

    global_batch: int
    micro_batch: int
    world_size: int
    accumulation: int

    @property
    def per_rank(self) -> int:
        """Samples one rank consumes per optimizer step."""
        return self.micro_batch * self.accumulation


@dataclass(frozen=True)
class BatchGeometry:
    global_batch: int
    micro_batch: int

    def resolve(self, world_size: int) -> StepGeometry:
        return StepGeometry(self.global_batch, self.micro_batch, world_size,
                            accumulation_steps(self.global_batch, self.micro_batch, world_size))
