"""Building DeepSpeed configs (pure): what ZeRO stage, precision, communication and batch geometry
mean in DeepSpeed's terms. The optimiser and LR schedule stay ours (torch AdamW/SGD, ``lr_at``),
passed to ``deepspeed.initialize`` client-side, so the same code runs on CPU (gloo) and GPU (NCCL).

Communication (DeepSpeed 0.19.8; paths below are under ``deepspeed/``):

- ``overlap_comm`` is on for ZeRO 1-3: gradient buckets are reduced from backward hooks while the
  backward pass goes on (``runtime/zero/stage_1_and_2.py:2284-2295``, ``process_gradients``). Left
  unset, DeepSpeed turns it on for ZeRO-3 only (``runtime/zero/config.py:384-386``). ZeRO-0 has no
  ZeRO optimizer: the engine all-reduces every gradient after the backward pass
  (``runtime/engine.py:3089-3095``), so nothing there overlaps whatever the config says.
- Bucket sizes come from the model's size (:func:`comm_buckets`). DeepSpeed's default 5e8-element
  reduce bucket is larger than all of ViT-B/16 (86M) and L/16 (304M): the whole gradient would go in
  one reduction after the last hook, with nothing left to overlap.
- ``communication_data_type: fp32`` makes bf16 gradients travel and sum in fp32: each bucket is
  cast before the collective and the sum cast back (ZeRO-0: ``runtime/engine.py:3795-3819``,
  ``allreduce_bucket``; ZeRO-1/2: ``runtime/zero/stage_1_and_2.py:1485-1513`` and ``:2359-2391``;
  ZeRO-3: ``runtime/zero/stage3.py:1862-1886`` and ``:1911-1944``, whose gradient bucket is itself
  allocated in that dtype, ``:475-477`` and ``:780-784``). Unset, bf16 training communicates in
  bf16 (``runtime/engine.py:1718-1730``), and a bf16 sum over hundreds of ranks keeps 8 bits of
  mantissa at every partial sum.
  ``data_types.grad_accum_dtype`` is *not* that switch: it sets the dtype gradients accumulate in
  across micro-steps, and with bf16 it raises NotImplementedError at ZeRO-0
  (``runtime/engine.py:2313-2323``), silently swaps ZeRO-1 for ``BF16_Optimizer`` (``:2305-2310``)
  and grows ZeRO-2/3 gradient partitions to 4 bytes; communication still defaults to bf16. We do
  not set it (the paper recipes run one micro-step per optimizer step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from stages.train.geometry import accumulation_steps

__all__ = ["CommBuckets", "comm_buckets", "build_deepspeed_config", "GRADIENT_BUCKETS", "MIN_BUCKET_ELEMENTS",
           "MAX_BUCKET_ELEMENTS"]

# At least this many gradient buckets per backward pass: the reduction of one bucket runs while
# the next is computed, so only the last bucket's reduction (~1/8 of the traffic) is exposed.
GRADIENT_BUCKETS = 8
# Below ~10M elements (40 MB in fp32) a multi-node all-reduce / reduce-scatter is latency-bound:
# NCCL needs messages of tens of MB to reach its bus bandwidth, and every bucket adds a collective
# launch and a stream wait. Small models therefore get fewer, 10M-element buckets.
MIN_BUCKET_ELEMENTS = 10_000_000
# Above ~100M elements a message gains no bandwidth, only memory: ZeRO-1/2 hold two bf16 buckets
# (overlap_comm double-buffers them), the flattened bucket under reduction and its fp32 cast:
# 1 GB per GPU at this size (stages.planner.comm_buffer_bytes).
MAX_BUCKET_ELEMENTS = 100_000_000
# Buckets are rounded up to whole millions: readable in the config, and even, as DeepSpeed asserts
# for allgather_bucket_size (runtime/zero/stage_1_and_2.py:387-391).
_ROUND = 1_000_000


@dataclass(frozen=True)
class CommBuckets:
    """DeepSpeed's communication sizes for one model, all in elements (parameters), not bytes."""

    reduce_bucket: int  # gradients per reduction (ZeRO 1-3 ``reduce_bucket_size``)
    allgather_bucket: int  # parameters per all-gather after the step (ZeRO 1-2)
    prefetch_bucket: int  # ZeRO-3: parameters gathered ahead of the layer being computed
    param_persistence_threshold: int  # ZeRO-3: tensors smaller than this stay whole on every rank
    model_persistence_threshold: int  # ZeRO-3: cap on the total of such whole tensors


def _clamp_round(n: float, lo: int, hi: int) -> int:
    n = min(max(n, lo), hi)
    return -(-int(n) // _ROUND) * _ROUND


def comm_buckets(model_params: int) -> CommBuckets:
    """Communication sizes for a model of ``model_params`` parameters (the one source for both the
    DeepSpeed config and the planner's buffer memory).

    1. Gradient reduce bucket = 1/``GRADIENT_BUCKETS`` of the model, clamped to
       [``MIN_BUCKET_ELEMENTS``, ``MAX_BUCKET_ELEMENTS``]: several buckets per backward pass so that
       ``overlap_comm`` has something to overlap, each large enough to run at link bandwidth;
       rounded up to whole millions, and never above the model itself (rounded) when the model
       is below the minimum.
       The paper recipes (21,843-class heads): B/16 103M -> 13M, L/16 327M -> 41M, H/14 660M -> 83M.
    2. All-gather bucket (ZeRO-1/2, the updated parameters after the step) = the reduce bucket:
       that all-gather cannot overlap compute anyway; the size only bounds its staging memory.
    3. ZeRO-3 prefetch = half a reduce bucket, ~Ψ/16: two transformer blocks of a 32-block
       model (a block holds ~Ψ/depth), so the next block's all-gather is in flight while the
       current one computes.
    4. ZeRO-3 persistence: tensors below 1% of a reduce bucket (biases, LayerNorms, the class
       token) would be all-gathered twice per micro-step in latency-bound messages; they stay
       whole on every rank instead, capped in total at 1% of the model.
    """
    if model_params < 1:
        raise ValueError(f"model_params must be >= 1, got {model_params}")
    # A model below the minimum gets one bucket of its own size: DeepSpeed allocates the full
    # bucket whatever the model, and there is nothing to overlap in so small a model anyway.
    floor = min(MIN_BUCKET_ELEMENTS, model_params)
    reduce = _clamp_round(model_params / GRADIENT_BUCKETS, floor, MAX_BUCKET_ELEMENTS)
    prefetch = _clamp_round(reduce / 2, floor // 2, MAX_BUCKET_ELEMENTS // 2)
    return CommBuckets(reduce_bucket=reduce, allgather_bucket=reduce, prefetch_bucket=prefetch,
                       param_persistence_threshold=reduce // 100,
                       model_persistence_threshold=model_params // 100)


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
    grad_comm_fp32: bool = True,
    model_params: int,
    load_universal: bool = False,
) -> dict[str, Any]:
    """The DeepSpeed config of one training run on ``world_size`` data-parallel ranks.

    Called inside the workers once the world size is known (accumulation follows from it).
    ``grad_comm_fp32`` matters for bf16 only: fp32 training communicates in fp32 anyway.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    if offload_params and zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    buckets = comm_buckets(model_params)
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=buckets.reduce_bucket)
    if zero_stage in (1, 2):
        zero["allgather_bucket_size"] = buckets.allgather_bucket
    if zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=buckets.prefetch_bucket,
                    stage3_param_persistence_threshold=buckets.param_persistence_threshold,
                    stage3_model_persistence_threshold=buckets.model_persistence_threshold)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation_steps(global_batch, micro_batch, world_size),
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        # bf16: no per-step overflow check. DeepSpeed's reads a flag from the device and all-reduces
        # it at every step (runtime/zero/stage_1_and_2.py:3218-3249) to skip steps with inf/nan
        # gradients -- which bf16 has no loss scale to back off from. The trainer records every
        # step's gradient norm and stops at the first non-finite one before anything is saved
        # (stages/train/metrics.py), so that host wait buys nothing.
        "bf16": {"enabled": True, "check_grad_overflow": False} if precision == "bf16" else {"enabled": False},
        "fp16": {"enabled": False},
        # The dtype gradients are summed in across ranks (module docstring); stated even where it
        # is DeepSpeed's default, so the config says what it does.
        "communication_data_type": "fp32" if precision == "fp32" or grad_comm_fp32 else "bf16",
        # Our torch optimiser is allowed with offload (DeepSpeed otherwise insists on its CPU Adam).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # our own metrics log instead
        "wall_clock_breakdown": False,
    }
    if load_universal:  # resuming a checkpoint of another world size (stages/train/reshard.py)
        config["checkpoint"] = {"load_universal": True}
    return config
