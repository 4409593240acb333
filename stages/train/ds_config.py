"""Building DeepSpeed configs (pure): what ZeRO stage, precision and batch geometry mean in
DeepSpeed's terms. The optimiser and LR schedule stay ours (torch AdamW/SGD, ``lr_at``), passed
to ``deepspeed.initialize`` client-side, so the same code runs on CPU (gloo) and GPU (NCCL)."""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["build_deepspeed_config", "micro_steps"]


def micro_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps so that micro x accumulation x world = global batch."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(f"global batch {global_batch} is not divisible by workers x micro-batch "
                         f"({world_size} x {micro_batch} = {per_step})")
    return global_batch // per_step


def build_deepspeed_config(
    *,
    global_batch: int,
    micro_batch: int,
    world_size: int,
    zero_stage: int,
    precision: Literal["fp32", "bf16"] = "fp32",
    grad_clip: float = 1.0,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, Any]:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": micro_steps(global_batch, micro_batch, world_size),
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # Our torch optimiser is allowed with offload (DeepSpeed otherwise insists on its CPU Adam).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # our own metrics log instead
        "wall_clock_breakdown": False,
    }
