"""The consolidated model after training: full fp32 weights gathered from the ZeRO partitions."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["gather_full_state"]


def gather_full_state(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter at full size, fp32, contiguous on the CPU (a collective: every rank calls it).

    The fp32 master copy where ZeRO keeps one (it is what the optimizer updates); the module's own
    weights where it does not (ZeRO-0 in fp32).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        state[name] = (full if full is not None else p).detach().float().cpu().contiguous()
    return state
