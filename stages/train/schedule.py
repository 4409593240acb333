"""Learning-rate schedules as pure functions of the step (nanoGPT's ``get_lr`` style)."""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["lr_at"]


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int,
          decay: Literal["linear", "cosine"] = "linear", end_lr: float = 0.0) -> float:
    """LR for optimizer step ``step`` (0-based).

    1) linear warmup from 0 over ``warmup_steps`` (the paper: 10k steps at scale);
    2) then linear or cosine decay from ``base_lr`` to ``end_lr`` at ``total_steps``.
    """
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        factor = 1.0 - progress
    elif decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown decay {decay!r}")
    return end_lr + (base_lr - end_lr) * factor
