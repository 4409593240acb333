"""Elastic worker groups whose sizes always split the global batch.

Ray Train's elastic policy (``ScalingConfig(num_workers=(MIN, MAX))``) starts a group of as many
workers as the cluster holds, capped at MAX. vitpipe keeps the global batch fixed (it is
result-defining), so only sizes that split it into whole micro-batches per rank can train: at
the paper's batch of 4096 and micro-batches of 32, between 64 and 128 workers only 64 and 128 can.
:class:`UsableSizesPolicy` rounds the count Ray Train computes down to the nearest usable size —
100 GPUs left after a node loss give a group of 64, never an impossible 100 — and
:class:`ElasticTorchTrainer` hands that policy to the controller.

Both build on Ray Train 2.60 internals (its ``ElasticScalingPolicy`` and the trainer method that
starts the controller); the unit tests below exercise them so that an upgrade that changes them fails
loudly (``tests/test_pretrain.py``).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy

__all__ = ["usable_size", "UsableSizesPolicy", "ElasticTorchTrainer"]


def usable_size(available: int, sizes: Sequence[int]) -> int:
    """The largest of ``sizes`` (ascending) not above ``available``; 0 when even the smallest is."""
    at = bisect.bisect_right(sizes, available)
    return sizes[at - 1] if at else 0


class UsableSizesPolicy(ElasticScalingPolicy):
    """Ray Train's elastic policy, with every group size rounded down to a usable one. Below the
    smallest usable size it reports 0 workers, which Ray Train treats as "below the minimum": wait."""

    def __init__(self, scaling_config: Any, sizes: Sequence[int]) -> None:
        super().__init__(scaling_config)
        self.sizes = sorted(sizes)

    def _count_possible_workers(self, reserved_resources: Any) -> int:
        return usable_size(super()._count_possible_workers(reserved_resources), self.sizes)


class ElasticTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` whose elastic groups only take ``sizes``."""

    def __init__(self, *args: Any, sizes: Sequence[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sizes = list(sizes)

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        controller_init_kwargs["scaling_policy"] = UsableSizesPolicy(self.scaling_config, self._sizes)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
