"""The training step and what feeds it: micro-batches on the device, forward/backward, the update.

Nothing here waits for the device. Batches arrive as uint8 (pinned when the device is a GPU),
are copied without blocking and normalised on the device; the loss of each micro-step stays a
device tensor, accumulated there. The host reads losses only when the loop decides to (once per
logged step; :class:`~stages.train.metrics.StepMonitor`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from stages.data.loader import UNREADABLE
from stages.data.order import derived_seed
from stages.data.transforms import to_model_input

__all__ = ["Batch", "DataFeed", "forward_backward", "mask_seed", "train_step"]


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (B, 3, S, S), the training dtype, on the device
    labels: torch.Tensor  # (B,) int64, on the device
    mask_seed: int | None = None  # seeds dropout and stochastic depth for this micro-batch (None: as they are)


def mask_seed(seed: int, slot: tuple[int, int, int]) -> int:
    """The seed of one micro-batch's random masks (dropout, stochastic depth): a function of the
    run's seed and the micro-batch's slot (epoch, step, g) in the global order, which holds the same
    samples on any number of workers (``stages.data.loader.slot_order``) — so a run resumed on
    another world size, or restarted, draws the masks an uninterrupted run would have drawn."""
    return derived_seed(seed, "masks", *slot)


class DataFeed:
    """Micro-batches on ``device``, endlessly (a new epoch starts when the loader's ends).

    The host's wait for each batch is added to ``wait_s`` (the data-wait share of a step); with
    ``record_keys`` the consumed sample keys are kept until :meth:`take_keys` (the sample ledger).
    """

    def __init__(self, loader: Any, device: torch.device, dtype: torch.dtype, record_keys: bool = False,
                 seed: int | None = None) -> None:
        """``seed``: the run's; each micro-batch then carries its :func:`mask_seed`."""
        self.loader = loader
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.record_keys = record_keys
        self._keys: list[str] = []
        self.wait_s = 0.0
        self._batches: Iterator[dict[str, Any]] = iter(loader)

    def _next_raw(self) -> dict[str, Any]:
        try:
            return next(self._batches)
        except StopIteration:  # epoch boundary
            self._batches = iter(self.loader)
            return next(self._batches)

    def __call__(self) -> Batch:
        started = time.perf_counter()
        raw = self._next_raw()
        self.wait_s += time.perf_counter() - started
        if self.record_keys:
            self._keys.extend(raw["key"])
        return Batch(to_model_input(raw["image"], self.device, self.dtype),
                     raw["label"].to(self.device, non_blocking=True),
                     None if self.seed is None else mask_seed(self.seed, raw["slot"]))

    def take_keys(self) -> list[str]:
        """The keys of the samples consumed since the last call."""
        keys, self._keys = self._keys, []
        return keys

    def take_wait(self) -> float:
        """Seconds waited since the last call."""
        waited, self.wait_s = self.wait_s, 0.0
        return waited


def forward_backward(engine: Any, batch: Batch) -> torch.Tensor:
    """One micro-batch: the loss (fp32 logits), its gradients accumulated; returns the detached loss.

    Samples the loader could not read carry the label ``UNREADABLE``: they add nothing to the loss or
    the gradient. The sum is divided by the micro-batch's full size, not by the samples read, so
    every sample weighs the same in the global step whichever rank it landed on (and with nothing
    damaged this is the mean).
    """
    labels = batch.labels
    if batch.mask_seed is not None:
        torch.manual_seed(batch.mask_seed)  # host-side: sets the generators' seed, no device sync
    logits = engine(batch.images).float()
    loss = F.cross_entropy(logits, labels, ignore_index=UNREADABLE, reduction="sum") / len(labels)
    engine.backward(loss)
    return loss.detach()


def train_step(engine: Any, next_batch: Callable[[], Batch], accumulation: int) -> torch.Tensor:
    """One optimizer step over ``accumulation`` micro-batches; the mean micro-batch loss, on the device.

    ``engine.step()`` after every micro-batch is DeepSpeed's contract: it applies the optimizer
    (with clipping) only at the accumulation boundary.
    """
    total = None
    for _ in range(accumulation):
        loss = forward_backward(engine, next_batch())
        engine.step()
        total = loss if total is None else total + loss
    assert total is not None, "accumulation must be >= 1"
    return total / accumulation
