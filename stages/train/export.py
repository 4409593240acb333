"""The consolidated model after training: full fp32 weights gathered from the ZeRO partitions."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["gather_full_state"]


def gather_full_state(engine: Any, keep: bool) -> dict[str, torch.Tensor] | None:
    """Every parameter at full size, fp32, contiguous on the CPU — on the ranks that ``keep`` it.

    A collective: every rank takes part in each parameter's gather, but only the ranks that need
    the weights (rank 0 for the handoff; all of them before a fine-tune's evaluation) hold a
    copy: at H/14 that is 2.6 GB of host memory per rank. The fp32 master copy where ZeRO keeps
    one (it is what the optimizer updates); the module's own weights where it does not (ZeRO-0 in
    fp32).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if keep:
            state[name] = (full if full is not None else p).detach().float().cpu().contiguous()
    return state if keep else None
