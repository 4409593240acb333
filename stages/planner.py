"""Capacity planning for pretraining: what a config needs on a given cluster, without running it.

``vitpipe plan`` calls the planner registered here for every ``pretrain`` stage. Everything is a
pure function of the stage's params and the cluster, so each number can be checked by hand:

1. Parameters and FLOPs come from the model's closed forms (``count_params``, ``flops_per_image``).
2. ZeRO model states per GPU (DESIGN.md §1; mixed-precision Adam, Ψ params, N ranks, K = 12):
   stage 0: 16Ψ; stage 1: 4Ψ + 12Ψ/N; stage 2: 2Ψ + 14Ψ/N; stage 3: 16Ψ/N bytes.
   ``precision: fp32`` keeps 4-byte weights and gradients instead (see ``state_bytes_per_param``).
3. Activations per micro-batch: the tensors autograd saves in one encoder block, derived below
   (``layer_activation_bytes``), times depth; with activation checkpointing only each block's
   input is kept, plus one block recomputed at a time during the backward pass.
4. Peak per GPU = model states + DeepSpeed's communication buffers (``comm_buffer_bytes``, sized
   by the same ``comm_buckets`` the DeepSpeed config uses) + max(activations, the optimizer
   step's fp32 gradient copy) + a fixed reserve (CUDA context, NCCL, allocator slack). The two
   terms in the max are never live together: activations are freed by the end of the backward
   pass, before the optimizer step.
5. Throughput at an assumed model-FLOPs utilisation (MFU) of the GPU's dense bf16 peak; the data
   plane must decode as many images per second as the GPUs consume.
6. A recommendation (``recommend``): of every (ZeRO stage, activation checkpointing) pair that fits
   at the configured micro-batch, the one that communicates least (``communication_volume``),
   then the one that does not recompute, then the one whose communication overlaps the backward
   pass, then the one with the lowest peak.

How this relates to DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs`` in DeepSpeed 0.19.8, cross-checked in
``tests/test_planner.py``): both count a 4-byte fp32 gradient per parameter shard that the
DESIGN formula does not. ZeRO-2: DeepSpeed's 2Ψ + 18Ψ/N = our 2Ψ + 14Ψ/N + 4Ψ/N, which is
exactly our optimizer-step peak (DeepSpeed makes that fp32 copy of the gradient partition in
``step``). ZeRO-3: DeepSpeed's 18Ψ/N + 4 x largest layer = our 16Ψ/N + 2Ψ/N (it swaps the
2-byte gradient shard for a 4-byte one) + the gathered largest layer, which we add as a ZeRO-3
buffer. DeepSpeed's ``additional_buffer_factor`` (1.5) scales only its CPU-memory figure.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from pipeline.errors import VitpipeError
from pipeline.registry import PlanOptions, register_planner
from pipeline.tables import text_table
from stages.model.vit import ViTConfig, count_params, flops_per_image
from stages.train.ds_config import comm_buckets
from stages.train.hardware import Accelerator, accelerator
from stages.train.params import FinetuneParams, PretrainParams

if TYPE_CHECKING:
    from pipeline.config import RunConfig

__all__ = [
    "BYTES_PER_ELEMENT", "DEFAULT_MFU", "DEFAULT_DECODE_RATE", "DEFAULT_NUM_CLASSES", "RESERVED_BYTES",
    "ZERO0_ALLREDUCE_ELEMENTS", "state_bytes_per_param", "zero_model_state_bytes", "optimizer_step_bytes",
    "comm_buffer_bytes", "communication_volume", "recommend", "largest_layer_params", "layer_activation_bytes",
    "activation_breakdown", "activation_bytes", "checkpoint_bytes", "plan_pretrain", "render_pretrain_plan",
]

log = logging.getLogger(__name__)


BYTES_PER_ELEMENT = {"bf16": 2, "fp32": 4}
DEFAULT_MFU = 0.4
# Images/s one CPU core decodes + augments (random-resized crop 224, flip, normalise): our loader
# measured 281/s per core on ImageNet-sized JPEGs (BENCHMARKS.md, bench/loader.py); rounded down
# for headroom (other processes on the node, larger source images).
DEFAULT_DECODE_RATE = 250.0
DEFAULT_NUM_CLASSES = 1000
# Per GPU, never available to the model: CUDA context and kernels, cuBLAS/NCCL workspaces,
# caching-allocator fragmentation. A round figure; real use varies by a few hundred MB.
RESERVED_BYTES = 2 * 10**9
# ZeRO-0 has no bucket setting: the engine all-reduces gradients after the backward pass in flat
# chunks of DeepSpeed's MEMORY_OPT_ALLREDUCE_SIZE elements (deepspeed/runtime/engine.py:151, 3073).
ZERO0_ALLREDUCE_ELEMENTS = 500_000_000

_ZERO_STAGES = (0, 1, 2, 3)


def _bytes_per_element(precision: str) -> int:
    try:
        return BYTES_PER_ELEMENT[precision]
    except KeyError:
        raise ValueError(f"precision must be one of {', '.join(BYTES_PER_ELEMENT)}, got {precision!r}") from None


def _check_zero_stage(stage: int) -> None:
    if stage not in _ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")


def state_bytes_per_param(precision: str, stage: int) -> tuple[int, int, int]:
    """(weights, gradients, optimizer) bytes per parameter before any partitioning.

    bf16 (mixed precision, DESIGN.md): 2-byte weights and gradients; K = 12 (fp32 master copy,
    Adam m and v). fp32: 4-byte weights and gradients and no master copy is needed (K = 8), but
    DeepSpeed's ZeRO-1/2 optimizer clones its fp32 partition regardless of the weights' dtype
    (K = 12 there); ZeRO-3 aliases it when the dtypes match, and ZeRO-0 runs torch's Adam as is.
    """
    _check_zero_stage(stage)
    if _bytes_per_element(precision) == 2:
        return 2, 2, 12
    return 4, 4, (12 if stage in (1, 2) else 8)


def zero_model_state_bytes(params: int, world: int, stage: int, *, precision: str = "bf16",
                           offload_optimizer: bool = False) -> int:
    """Model-state bytes (weights, gradients, optimizer) per GPU for ZeRO ``stage`` on ``world`` ranks.

    Stage 1 partitions the optimizer states, stage 2 also the gradients, stage 3 also the
    weights. With the default bf16 this is DESIGN.md's 16Ψ / 4Ψ + 12Ψ/N / 2Ψ + 14Ψ/N / 16Ψ/N.
    ``offload_optimizer`` (stages 1-3) moves the optimizer term to CPU memory.
    """
    if params < 0 or world < 1:
        raise ValueError(f"need params >= 0 and world >= 1, got {params} and {world}")
    w, g, k = state_bytes_per_param(precision, stage)
    if offload_optimizer and stage >= 1:
        k = 0
    replicated, partitioned = {0: (w + g + k, 0), 1: (w + g, k), 2: (w, g + k), 3: (0, w + g + k)}[stage]
    return replicated * params + math.ceil(partitioned * params / world)


def optimizer_step_bytes(params: int, world: int, stage: int, *, precision: str = "bf16",
                         offload_optimizer: bool = False) -> int:
    """The transient fp32 copy of this rank's gradients that DeepSpeed makes for the optimizer step.

    Mixed precision only (fp32 gradients need no copy); the rank's gradient shard is everything
    at stage 0 and Ψ/N from stage 1 on (ZeRO-1 reduces gradients into partitions before the step).
    """
    _check_zero_stage(stage)
    if _bytes_per_element(precision) == 4 or (offload_optimizer and stage >= 1):
        return 0
    return 4 * (params if stage == 0 else math.ceil(params / world))


def comm_buffer_bytes(params: int, stage: int, precision: str, largest_layer: int = 0, *,
                      grad_comm_fp32: bool = True) -> int:
    """Per-GPU bytes of DeepSpeed's communication buffers, with the bucket sizes of ``comm_buckets``
    (the function the DeepSpeed config is built from, so plan and run agree).

    g = gradient bytes per element; c = bytes per communicated element (4 with fp32 communication,
    which fp32 training always has, else g); a cast to the communication dtype costs c per element
    only where c != g. E = the reduce bucket, P = the ZeRO-3 prefetch bucket (elements).
    - ZeRO-0: the engine flattens up to ``ZERO0_ALLREDUCE_ELEMENTS`` gradients at a time and casts
      them: n (g + cast), n = min(Ψ, 5e8) (``deepspeed/runtime/engine.py:3795-3821``).
    - ZeRO-1/2: two bucket buffers in the gradient dtype (``overlap_comm`` double-buffers them,
      ``deepspeed/runtime/zero/stage_1_and_2.py:3256-3278``), the flattened copy of the bucket
      being reduced and its cast (``:2359-2391``): E (3g + cast).
    - ZeRO-3: the bucket, allocated in the communication dtype (``deepspeed/runtime/zero/stage3.py:
      780-784``), and the reduce-scatter's interleaved copy of it: 2Ec; plus the parameters
      prefetched, P x weight bytes, and DeepSpeed's own figure for the layer being computed,
      4 bytes x the largest layer (``estimate_zero3_model_states_mem_needs``). The small tensors
      ZeRO-3 keeps whole (at most 1% of the model, ``comm_buckets``) are left out.
    """
    _check_zero_stage(stage)
    w, g, _ = state_bytes_per_param(precision, stage)
    c = 4 if grad_comm_fp32 else g
    cast = c if c != g else 0
    buckets = comm_buckets(max(params, 1))
    if stage == 0:
        return min(params, ZERO0_ALLREDUCE_ELEMENTS) * (g + cast)
    if stage in (1, 2):
        return buckets.reduce_bucket * (3 * g + cast)
    return 2 * buckets.reduce_bucket * c + buckets.prefetch_bucket * w + 4 * largest_layer


def communication_volume(stage: int, accumulation: int = 1) -> int:
    """Elements each rank sends per optimizer step, in units of Ψ (the model's parameters).

    The ZeRO paper's counts for bandwidth-optimal (ring) collectives on many ranks, where an
    all-reduce moves 2Ψ (a reduce-scatter Ψ and an all-gather Ψ); A = micro-steps per step:
    - ZeRO-0: the gradients are all-reduced once per step: 2Ψ.
    - ZeRO-1: gradients reduced to their owners once per step (Ψ), updated weights all-gathered (Ψ).
    - ZeRO-2: as ZeRO-1, but the gradients are reduce-scattered at every micro-step, so that each rank
      keeps only its partition (``deepspeed/runtime/engine.py:3084-3086``): (A + 1)Ψ.
    - ZeRO-3: at every micro-step the weights are all-gathered for the forward and again for the
      backward pass, and the gradients reduce-scattered: 3AΨ.
    DeepSpeed 0.19.8 by default all-reduces ZeRO-1/2 gradient buckets instead of reducing each slice
    to its owner (``use_multi_rank_bucket_allreduce``, ``deepspeed/runtime/zero/stage_1_and_2.py:
    1695``): fewer, larger collectives for up to Ψ more traffic. Counted that way ZeRO-1/2 send up
    to 3Ψ, more than ZeRO-0's 2Ψ; the paper's counts are kept here because that traffic overlaps
    the backward pass, while ZeRO-0's all-reduce follows it and ZeRO-3's forward all-gathers sit in
    front of compute. That ordering is a model, not a measurement: check it on the GPUs with
    ``bash bench/gpu_check.sh -- --zero-stages 0,1,2,3`` (it times each) before a long run.
    """
    _check_zero_stage(stage)
    if accumulation < 1:
        raise ValueError(f"accumulation must be >= 1, got {accumulation}")
    return {0: 2, 1: 2, 2: accumulation + 1, 3: 3 * accumulation}[stage]


def recommend(rows: list[dict[str, Any]], accumulation: int = 1, *,
              offload_optimizer: bool = False) -> dict[str, Any] | None:
    """The (ZeRO stage, activation checkpointing) pair to run, from the plan's per-stage ``rows``.

    Of the pairs that fit at the configured micro-batch (``fits`` / ``fits_checkpointed``), the
    one that (1) communicates least per step (``communication_volume``); then (2) does not
    recompute the forward pass (checkpointing costs ~1/3 more compute); then (3) communicates during
    the backward pass (ZeRO 1-3 with ``overlap_comm``; DeepSpeed's ZeRO-0 all-reduces only after it,
    ``deepspeed/runtime/engine.py:3089-3095``); then (4) has the lowest peak, i.e. the most headroom.
    With ``offload_optimizer`` ZeRO-0 is not a candidate (the offload needs ZeRO 1-3).
    None when nothing fits.
    """
    candidates = []
    for r in rows:
        if offload_optimizer and r["stage"] == 0:
            continue
        volume = communication_volume(r["stage"], accumulation)
        for ckpt, suffix in ((False, ""), (True, "_checkpointed")):
            if r[f"fits{suffix}"]:
                candidates.append(((volume, ckpt, r["stage"] == 0, r[f"peak_bytes{suffix}"]), r["stage"], ckpt))
    if not candidates:
        return None
    candidates.sort()
    (volume, _, _, peak), stage, ckpt = candidates[0]
    reason = (f"the least communication that fits: {volume}x the parameters per step"
              f"{', overlapping the backward pass' if stage else ', after the backward pass'}, "
              f"{'with' if ckpt else 'no'} recomputation, peak {_gb(peak)}")
    ties = sorted({s for (v, c, _, _), s, _ in candidates[1:] if v == volume and c == ckpt and s != stage})
    why = [f"ZeRO-{t} moves as much " + ("but only after the backward pass" if t == 0 and stage else
                                         "with a higher peak") for t in ties]
    if why:
        reason += f" ({'; '.join(why)})"
    return {"zero_stage": stage, "checkpoint_activations": ckpt, "communication_volume": volume,
            "peak_bytes": peak, "reason": reason}


def largest_layer_params(cfg: ViTConfig) -> int:
    """Parameters of the largest single module (its own, not its children's), as DeepSpeed's
    ``model_to_params`` counts them. A hybrid's ResNet convs are left out (smaller than the MLP)."""
    D, M, P, C, T = cfg.width, cfg.mlp_dim, cfg.patch_size, getattr(cfg, "embed_channels", cfg.channels), cfg.tokens
    head_in = cfg.representation_size or D
    return max(
        C * P * P * D + D,  # patch embedding conv
        T * D + (D if cfg.pool == "cls" else 0),  # the ViT module itself: position embeddings, class token
        3 * D * D + 3 * D,  # qkv
        D * M + M,  # fc1 (fc2 has M*D + D, never more)
        (D * cfg.representation_size + cfg.representation_size) if cfg.representation_size else 0,
        head_in * cfg.num_classes + cfg.num_classes if cfg.num_classes > 0 else 0,
    )


def layer_activation_bytes(cfg: ViTConfig, micro_batch: int, precision: str) -> int:
    """Bytes autograd saves for the backward pass of one encoder block, for ``micro_batch`` images.

    Per token (T per image, width D, MLP M, h heads, s bytes per element), assuming a fused
    (flash / memory-efficient) attention kernel, which saves no T x T matrix:
      LN1 input (the residual stream) D, LN1 output (qkv's input) D, qkv output 3D (q, k, v are
      views of it), attention output D (the projection's input is a view of it), LN2 input D,
      LN2 output (fc1's input) D, fc1 output (GELU's input) M, GELU output (fc2's input) M:
      (8D + 2M) s; plus fp32 LayerNorm mean and rstd (2 norms x 2 x 4 bytes) and the attention's
      fp32 log-sum-exp per head (4h). Dropout > 0 adds 1-byte masks after attention, GELU and fc2.
    Residual adds, reshapes and the drop-path scale (per sample) save nothing of size.
    """
    s = _bytes_per_element(precision)
    D, M = cfg.width, cfg.mlp_dim
    per_token = (8 * D + 2 * M) * s + 2 * 2 * 4 + 4 * cfg.heads
    if cfg.dropout > 0:
        per_token += 2 * D + M
    return micro_batch * cfg.tokens * per_token


def _outside_blocks_bytes(cfg: ViTConfig, micro_batch: int, precision: str) -> int:
    """Saved tensors outside the encoder blocks: patch conv input, final norm, head, loss."""
    s = _bytes_per_element(precision)
    b, T, D = micro_batch, cfg.tokens, cfg.width
    images = b * cfg.channels * cfg.image_size**2 * s  # the patch conv's input (a hybrid's ResNet: not modelled)
    pos_dropout = b * T * D if cfg.dropout > 0 else 0
    final_norm = b * T * (D * s + 8)  # input + fp32 mean/rstd
    # The class token is x[:, 0], a view: the head's saved input keeps the whole (B, T, D) output alive.
    head_in = b * T * D * s if cfg.pool == "cls" else b * D * s
    pre_logits = b * cfg.representation_size * s if cfg.representation_size else 0  # tanh output
    logits = b * max(cfg.num_classes, 0) * 4  # the loss takes float logits; log-softmax saves its output
    return images + pos_dropout + final_norm + head_in + pre_logits + logits


def activation_breakdown(cfg: ViTConfig, micro_batch: int, precision: str, checkpointing: bool) -> dict[str, int]:
    """Activation bytes per GPU for one micro-batch.

    ``stored``: saved for backward at the end of the forward pass; ``recompute``: one block's
    activations rebuilt during the backward pass (checkpointing only); ``total`` = the peak of the
    two together. Every term is proportional to the micro-batch.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    layer = layer_activation_bytes(cfg, micro_batch, precision)
    outside = _outside_blocks_bytes(cfg, micro_batch, precision)
    if checkpointing:
        # Only each block's input survives the forward pass; the backward pass recomputes one block at a time.
        kept = cfg.depth * micro_batch * cfg.tokens * cfg.width * _bytes_per_element(precision)
        stored, recompute = kept + outside, layer
    else:
        stored, recompute = cfg.depth * layer + outside, 0
    return {"per_layer": layer, "stored": stored, "recompute": recompute, "total": stored + recompute}


def activation_bytes(cfg: ViTConfig, micro_batch: int, precision: str, checkpointing: bool) -> int:
    """Peak activation bytes per GPU for one micro-batch (see :func:`activation_breakdown`)."""
    return activation_breakdown(cfg, micro_batch, precision, checkpointing)["total"]


def checkpoint_bytes(params: int, precision: str, stage: int) -> dict[str, int]:
    """Bytes of one DeepSpeed checkpoint (all ranks together) and of the fp32 safetensors handoff.

    DeepSpeed saves the module's weights in their training dtype (none at ZeRO-3, whose module
    holds only partition placeholders), the fp32 master weights (which fp32 ZeRO-0 does not
    have: torch's Adam updates the weights directly) and Adam's m and v (8 bytes).
    """
    w, _, k = state_bytes_per_param(precision, stage)
    weights = 0 if stage == 3 else w
    master_and_moments = k if stage != 3 else 12  # ZeRO-3 saves its fp32 partitions (aliased or not)
    return {"deepspeed": (weights + master_and_moments) * params, "handoff": 4 * params}


def _check_cluster(nodes: int, gpus_per_node: int, gpu: str, mfu: float, decode_rate: float,
                   num_classes: int) -> Accelerator:
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes and gpus_per_node must be >= 1, got {nodes} and {gpus_per_node}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if decode_rate <= 0:
        raise ValueError(f"decode_rate must be > 0 images/s per core, got {decode_rate}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return accelerator(gpu)  # raises a one-line ValueError naming the known GPUs


def _max_micro_batch(cfg: ViTConfig, precision: str, checkpointing: bool, budget: int) -> int:
    """The largest micro-batch whose activations fit in ``budget`` bytes (0 if none)."""
    per_image = activation_bytes(cfg, 1, precision, checkpointing)  # exactly linear in the micro-batch
    return max(0, budget // per_image)


def _divides(global_batch: int, world: int, micro_batch: int) -> bool:
    return micro_batch > 0 and global_batch % (world * micro_batch) == 0


def _best_micro_batch(limit: int, global_batch: int, world: int) -> int:
    """The largest micro-batch <= limit that divides the global batch over ``world`` ranks, else ``limit``."""
    for b in range(min(limit, global_batch // world if global_batch >= world else 0), 0, -1):
        if _divides(global_batch, world, b):
            return b
    return limit


def plan_pretrain(params: PretrainParams, nodes: int = 1, gpus_per_node: int = 1, gpu: str | None = None,
                  mfu: float = DEFAULT_MFU, decode_rate: float = DEFAULT_DECODE_RATE,
                  num_classes: int = DEFAULT_NUM_CLASSES) -> dict[str, Any]:
    """The capacity plan of one pretrain stage on ``nodes`` x ``gpus_per_node`` GPUs (JSON-able).

    The data-parallel world is N = nodes x gpus_per_node; ``gpu`` defaults to the stage's own.
    """
    gpu = gpu or params.gpu
    spec = _check_cluster(nodes, gpus_per_node, gpu, mfu, decode_rate, num_classes)
    world = nodes * gpus_per_node
    cfg = params.vit_config(num_classes)
    n_params = count_params(cfg)
    precision, micro, ckpt = params.precision, params.micro_batch, params.checkpoint_activations
    largest = largest_layer_params(cfg)
    usable = spec.memory_bytes - RESERVED_BYTES

    # fp32 training communicates in fp32 whatever the switch says (ds_config does the same).
    comm_fp32 = precision == "fp32" or params.grad_comm_fp32
    # Micro-steps per optimizer step at this world size (rounded up where the batch does not divide,
    # which is warned about below): ZeRO-2/3 communicate at every one of them.
    accumulation = max(1, math.ceil(params.global_batch / (world * micro)))
    acts = {c: activation_breakdown(cfg, micro, precision, c) for c in (False, True)}
    zero_rows = []
    for stage in _ZERO_STAGES:
        offload = params.offload_optimizer and stage >= 1
        states = zero_model_state_bytes(n_params, world, stage, precision=precision, offload_optimizer=offload)
        step = optimizer_step_bytes(n_params, world, stage, precision=precision, offload_optimizer=offload)
        buffers = comm_buffer_bytes(n_params, stage, precision, largest, grad_comm_fp32=comm_fp32)
        fixed = RESERVED_BYTES + states + buffers
        row: dict[str, Any] = {"stage": stage, "model_state_bytes": states, "optimizer_step_bytes": step,
                               "buffer_bytes": buffers, "offload_optimizer": offload,
                               "communication_volume": communication_volume(stage, accumulation)}
        for c, suffix in ((False, ""), (True, "_checkpointed")):
            peak = fixed + max(acts[c]["total"], step)
            # The step copy must fit on its own; then every byte left is activation budget.
            budget = spec.memory_bytes - fixed if fixed + step <= spec.memory_bytes else 0
            row[f"peak_bytes{suffix}"] = peak
            row[f"fits{suffix}"] = peak <= spec.memory_bytes
            row[f"max_micro_batch{suffix}"] = _max_micro_batch(cfg, precision, c, budget)
        zero_rows.append(row)

    train_flops = flops_per_image(cfg, training=True)
    images_per_s = world * spec.peak_flops * mfu / train_flops
    step_time = params.global_batch / images_per_s
    per_node = images_per_s / nodes
    cores_per_node = math.ceil(per_node / decode_rate)
    ckpt_bytes = checkpoint_bytes(n_params, precision, params.zero_stage)

    configured = zero_rows[params.zero_stage]
    suffix = "_checkpointed" if ckpt else ""
    notes: list[str] = []
    warnings: list[str] = []
    if params.max_workers != world:
        notes.append(f"the config has workers={params.workers_label} but this plan is for N = {nodes} x {gpus_per_node} "
                     f"= {world} data-parallel ranks: set pretrain.workers={world} to run it")
    if not _divides(params.global_batch, world, micro):
        warnings.append(f"global_batch {params.global_batch} is not divisible by N x micro_batch = {world} x {micro} "
                        f"= {world * micro}: choose a global batch that is a multiple of {world * micro}, "
                        "or a smaller micro_batch")
    else:
        notes.append(f"global_batch {params.global_batch} = N x micro_batch x {params.global_batch // (world * micro)} "
                     f"gradient-accumulation step(s) ({world} x {micro})")
    if precision == "fp32":
        notes.append("precision fp32: throughput is estimated against the bf16 peak and model states/activations "
                     "use 4-byte elements; set pretrain.precision=bf16 for GPU runs")
    if ckpt:
        # MFU counts model FLOPs only; the recomputed forward is extra work on top.
        notes.append("activation checkpointing recomputes each block's forward: at the same hardware utilisation "
                     "a step takes about 4/3 of the time shown")
    custom = {k: getattr(params, k) for k in ("width", "depth", "heads", "mlp_dim") if getattr(params, k)}
    if custom:
        shown = ", ".join(f"{k}={v}" for k, v in custom.items())
        notes.append(f"{shown} override the {params.model} variant's shape; set them to null for the paper's model")
    if getattr(cfg, "hybrid_layers", None):
        notes.append("hybrid model: the ResNet backbone's activations are not modelled (a lower bound)")
    decode_procs = max(1, params.loader_workers)
    if cores_per_node / gpus_per_node > decode_procs:
        notes.append(f"each GPU needs {cores_per_node / gpus_per_node:.1f} decode cores but loader_workers="
                     f"{params.loader_workers} gives it {decode_procs} process(es): raise pretrain.loader_workers "
                     "(and cpus_per_worker)")
    if params.offload_params:
        notes.append("offload_params: parameter offload is not modelled; the ZeRO-3 row keeps the weight "
                     "partition on the GPU (an upper bound)")
    if not configured[f"fits{suffix}"]:
        warnings.insert(0, _does_not_fit(params, spec, configured, zero_rows, acts, world, ckpt))
    recommended = recommend(zero_rows, accumulation, offload_optimizer=params.offload_optimizer)
    if recommended is None:
        recommended = {"zero_stage": None, "checkpoint_activations": None, "communication_volume": None,
                       "peak_bytes": None, "reason": f"nothing fits at micro_batch {micro} on {world} x {gpu}"}
    elif (recommended["zero_stage"], recommended["checkpoint_activations"]) != (params.zero_stage, ckpt):
        notes.append(f"this config has zero_stage {params.zero_stage}, checkpoint_activations {str(ckpt).lower()}; "
                     f"the plan recommends zero_stage {recommended['zero_stage']}, checkpoint_activations "
                     f"{str(recommended['checkpoint_activations']).lower()} (less communication or recomputation)")

    return {
        "model": params.model, "image_size": cfg.image_size, "tokens": cfg.tokens, "width": cfg.width,
        "depth": cfg.depth, "mlp_dim": cfg.mlp_dim, "heads": cfg.heads, "num_classes": num_classes,
        "precision": precision, "micro_batch": micro, "global_batch": params.global_batch,
        "zero_stage": params.zero_stage, "checkpoint_activations": ckpt, "workers": params.workers,
        "cluster": {"nodes": nodes, "gpus_per_node": gpus_per_node, "world_size": world, "gpu": gpu,
                    "gpu_memory_bytes": spec.memory_bytes, "reserved_bytes": RESERVED_BYTES,
                    "usable_bytes": usable, "peak_flops": spec.peak_flops},
        "params": n_params,
        "flops_per_image": flops_per_image(cfg),
        "train_flops_per_image": train_flops,
        "largest_layer_params": largest,
        "activations": {"bytes_per_element": _bytes_per_element(precision), "per_layer_bytes": acts[False]["per_layer"],
                        "bytes": acts[False]["total"], "bytes_checkpointed": acts[True]["total"]},
        "zero_stages": zero_rows,
        "throughput": {"mfu": mfu, "images_per_s": images_per_s, "step_time_s": step_time,
                       "run_time_s": step_time * params.steps, "gpu_hours": step_time * params.steps * world / 3600},
        "data_plane": {"images_per_s": images_per_s, "images_per_s_per_node": per_node, "decode_rate": decode_rate,
                       "decode_cores": cores_per_node * nodes, "decode_cores_per_node": cores_per_node,
                       "decode_cores_per_gpu": cores_per_node / gpus_per_node},
        "checkpoint": {"deepspeed_bytes": ckpt_bytes["deepspeed"], "handoff_bytes": ckpt_bytes["handoff"],
                       "kept": params.keep_checkpoints,
                       "storage_bytes": ckpt_bytes["deepspeed"] * params.keep_checkpoints + ckpt_bytes["handoff"]},
        "fits": configured[f"fits{suffix}"],
        "accumulation": accumulation,
        "grad_comm_fp32": comm_fp32,
        "recommended": recommended,
        "warnings": warnings,
        "notes": notes,
    }


def _does_not_fit(params: PretrainParams, spec: Accelerator, configured: dict[str, Any], rows: list[dict[str, Any]],
                  acts: dict[bool, dict[str, int]], world: int, ckpt: bool) -> str:
    """One line: what the configured setup needs, and the nearest setups that would fit."""
    suffix = "_checkpointed" if ckpt else ""
    stage = params.zero_stage
    need = configured[f"peak_bytes{suffix}"]
    fixes: list[str] = []
    higher = [r["stage"] for r in rows if r["stage"] > stage and r[f"fits{suffix}"]]
    if higher:
        fixes.append(f"ZeRO-{higher[0]} ({_gb(rows[higher[0]][f'peak_bytes{suffix}'])})")
    if not ckpt:
        with_ckpt = [r["stage"] for r in rows if r["stage"] >= stage and r["fits_checkpointed"]]
        if with_ckpt:
            fixes.append(f"checkpoint_activations=true with ZeRO-{with_ckpt[0]} "
                         f"({_gb(rows[with_ckpt[0]]['peak_bytes_checkpointed'])})")
    limit = configured[f"max_micro_batch{suffix}"]
    if limit >= 1:
        fixes.append(f"micro_batch {_best_micro_batch(limit, params.global_batch, world)} at ZeRO-{stage} "
                     f"(at most {limit})")
    remedy = "would fit: " + "; ".join(fixes) if fixes else \
        "nothing fits at this size: use more GPUs, offload_optimizer=true or a smaller model"
    return (f"does not fit: ZeRO-{stage}{' with activation checkpointing' if ckpt else ''} at micro_batch "
            f"{params.micro_batch} needs {_gb(need)} per GPU (model states {_gb(configured['model_state_bytes'])} "
            f"+ activations {_gb(acts[ckpt]['total'])} + buffers and reserve) but each {spec.name} has "
            f"{_gb(spec.memory_bytes)}; {remedy}")


def _gb(n: float) -> str:
    """Decimal units, like GPU memory is sold: 80 GB, not 74.5 GiB."""
    for factor, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n:.0f} B"


def _si(n: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def render_pretrain_plan(plan: dict[str, Any]) -> str:
    """The plan as plain text: a summary, the ZeRO table, then notes and warnings."""
    c, t, d, ck, a = plan["cluster"], plan["throughput"], plan["data_plane"], plan["checkpoint"], plan["activations"]
    classes = f"{plan['num_classes']} classes" + (f" ({plan['classes_from']})" if plan.get("classes_from") else "")
    ckpt_on = plan["checkpoint_activations"]
    lines = [
        f"{plan.get('stage', 'pretrain')}: ViT-{plan['model']} at {plan['image_size']} px, {plan['tokens']} tokens "
        f"(D {plan['width']}, depth {plan['depth']}, MLP {plan['mlp_dim']}, {plan['heads']} heads), {classes}",
    ]
    rows = [
        ("cluster", f"{c['nodes']} node(s) x {c['gpus_per_node']} {c['gpu']}: N = {c['world_size']} data-parallel "
                    f"rank(s); {_gb(c['gpu_memory_bytes'])} and {_si(c['peak_flops'], 'FLOP/s')} dense bf16 per GPU"),
        ("parameters", f"{plan['params']:,} ({plan['params'] / 1e6:.1f}M)"),
        ("FLOPs/image", f"{_si(plan['flops_per_image'], 'FLOP')} forward, "
                        f"{_si(plan['train_flops_per_image'], 'FLOP')} per training image (3x)"),
        ("throughput", f"{t['images_per_s']:,.0f} images/s at MFU {t['mfu']:.2f}; "
                       f"{_duration(t['step_time_s'])} per step of {plan['global_batch']} images; "
                       f"run {_duration(t['run_time_s'])} ({t['gpu_hours']:,.1f} GPU-hours)"),
        ("data plane", f"{d['images_per_s']:,.0f} images/s ({d['images_per_s_per_node']:,.0f} per node) -> "
                       f"{d['decode_cores']} decode cores ({d['decode_cores_per_node']} per node, "
                       f"{d['decode_cores_per_gpu']:.1f} per GPU) at {d['decode_rate']:g} images/s per core"),
        ("checkpoints", f"DeepSpeed {_gb(ck['deepspeed_bytes'])} each (weights + fp32 master + Adam m, v; "
                        f"{ck['kept']} kept), handoff model.safetensors {_gb(ck['handoff_bytes'])} (fp32)"),
        ("activations", f"{_gb(a['bytes'])} per micro-batch of {plan['micro_batch']} ({plan['precision']}), "
                        f"{_gb(a['bytes_checkpointed'])} with activation checkpointing; "
                        f"{_gb(a['per_layer_bytes'])} per block"),
    ]
    lines += ["  " + line for line in text_table(("", ""), rows).splitlines()[1:]]
    table = []
    for r in plan["zero_stages"]:
        mark = " *" if r["stage"] == plan["zero_stage"] else ""
        table.append((f"{r['stage']}{mark}", _gb(r["model_state_bytes"]), _gb(r["optimizer_step_bytes"]),
                      _gb(r["buffer_bytes"]), f"{r['communication_volume']}x", _gb(r["peak_bytes"]),
                      "yes" if r["fits"] else "NO", _gb(r["peak_bytes_checkpointed"]),
                      "yes" if r["fits_checkpointed"] else "NO",
                      f"{r['max_micro_batch']} / {r['max_micro_batch_checkpointed']}"))
    header = ("ZeRO", "model states", "step copy", "buffers", "comm/step", "peak", "fits", "peak (ckpt)",
              "fits (ckpt)", "max micro-batch (/ ckpt)")
    lines += [""] + ["  " + line for line in text_table(header, table).splitlines()]
    lines.append(f"  * configured (ZeRO-{plan['zero_stage']}, activation checkpointing "
                 f"{'on' if ckpt_on else 'off'}). peak = model states + buffers + max(activations, step copy) + "
                 f"{_gb(c['reserved_bytes'])} reserve, against {_gb(c['gpu_memory_bytes'])} per {c['gpu']}; "
                 f"comm/step = elements each GPU sends per optimizer step, in parameters "
                 f"({plan['accumulation']} micro-step(s), {'fp32' if plan['grad_comm_fp32'] else 'bf16'} gradients)")
    rec = plan["recommended"]
    if rec["zero_stage"] is None:
        lines.append(f"  recommended: none ({rec['reason']})")
    else:
        lines.append(f"  recommended: ZeRO-{rec['zero_stage']}, activation checkpointing "
                     f"{'on' if rec['checkpoint_activations'] else 'off'}: {rec['reason']}")
    lines += [f"  note: {n}" for n in plan["notes"]]
    lines += [f"  warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


# Known class counts of ingest sources, for the head's size when the config does not say.
_SOURCE_CLASSES = {"digits": 10}


def _num_classes(config: RunConfig, name: str, options: PlanOptions) -> tuple[int, str]:
    if options.num_classes is not None:
        return options.num_classes, "--num-classes"
    upstream = config.stages[name].inputs.get("data")
    spec = config.stages.get(upstream) if upstream else None
    if spec is not None and spec.type == "ingest" and spec.params.get("source") in _SOURCE_CLASSES:
        return _SOURCE_CLASSES[spec.params["source"]], f"from ingest source {spec.params['source']!r}"
    return DEFAULT_NUM_CLASSES, "assumed; set --num-classes"


@register_planner("pretrain", render=render_pretrain_plan)
def plan_pretrain_stage(config: RunConfig, name: str, options: PlanOptions) -> dict[str, Any]:
    """The registry's entry point: the plan of stage ``name`` of ``config`` (already validated)."""
    return _plan_stage(PretrainParams.model_validate(config.stages[name].params), config, name, options)


def _plan_stage(params: PretrainParams, config: RunConfig, name: str, options: PlanOptions) -> dict[str, Any]:
    num_classes, classes_from = _num_classes(config, name, options)
    try:
        plan = plan_pretrain(params, nodes=options.nodes, gpus_per_node=options.gpus_per_node, gpu=options.gpu,
                             mfu=options.mfu, decode_rate=options.decode_rate or DEFAULT_DECODE_RATE,
                             num_classes=num_classes)
    except ValueError as err:
        raise VitpipeError(f"stages.{name}: {err}") from None
    log.debug("planned stage %s: %d params, fits=%s", name, plan["params"], plan["fits"])
    return {"stage": name, "type": config.stages[name].type, "classes_from": classes_from, **plan}


@register_planner("finetune", render=render_pretrain_plan)
def plan_finetune_stage(config: RunConfig, name: str, options: PlanOptions) -> dict[str, Any]:
    """A fine-tune stage: the backbone of its ``model`` input at the fine-tuning resolution and batch.

    The architecture comes from the upstream pretrain stage's params (a finetune of a finetune is
    followed upstream); the resolution, batch geometry, ZeRO stage and precision are the
    fine-tune's own. The head is the downstream one, with no pre-logits layer.
    """
    spec = config.stages[name]
    ft = FinetuneParams.model_validate(spec.params)
    source = spec.inputs.get("model")
    seen = {name}
    while source in config.stages and config.stages[source].type == "finetune" and source not in seen:
        seen.add(source)
        source = config.stages[source].inputs.get("model")
    if source not in config.stages or config.stages[source].type != "pretrain":
        raise VitpipeError(f"stages.{name}: its model input is not a pretrain stage of this config; cannot plan it")
    pre = PretrainParams.model_validate(config.stages[source].params)
    shared = ("image_size", "micro_batch", "global_batch", "workers", "zero_stage", "precision", "offload_optimizer",
              "offload_params", "grad_comm_fp32", "checkpoint_activations", "gpu", "use_gpu", "steps",
              "warmup_steps", "dropout", "drop_path", "loader_workers", "cpus_per_worker")
    params = pre.model_copy(update={**{k: getattr(ft, k) for k in shared}, "representation_size": None})
    plan = _plan_stage(params, config, name, options)
    plan["notes"].append("fine-tuning uses SGD with momentum: 8 bytes of optimizer state per parameter instead of "
                         "Adam's 12, so the model-state figures are an upper bound")
    return {**plan, "model_from": source}
