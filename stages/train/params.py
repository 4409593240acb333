"""The params of the training stages (pretrain, finetune), validated when the config is loaded.

Kept in one module so that the stages, the planner and the trainer read the same definitions
without importing each other. ``TrainParams`` holds what every training stage shares: batch
geometry, schedule, distribution and checkpointing.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.preflight import ResourceDemand
from pipeline.stage import StageParams
from stages.model.vit import ViTConfig, decode_variant
from stages.train.geometry import accumulation_steps, valid_world_sizes

__all__ = ["TrainParams", "PretrainParams", "FinetuneParams"]


class TrainParams(StageParams):
    image_size: int = Field(default=224, ge=8)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    checkpoint_activations: bool = False
    crop_scale_min: float = Field(default=0.08, gt=0, le=1, description="Inception crop: smallest area fraction")
    hflip: bool = Field(default=True, description="random horizontal flips (off for digits, text, ...)")

    steps: int = Field(default=1000, ge=1)
    global_batch: int = Field(default=4096, ge=1)
    micro_batch: int = Field(default=32, ge=1)
    lr: float = Field(default=8e-4, gt=0)
    warmup_steps: int = Field(default=10_000, ge=0)
    decay: Literal["linear", "cosine"] = "linear"
    grad_clip: float = Field(default=1.0, gt=0)

    workers: int | list[int] = Field(
        default=2, description="Ray Train workers (one GPU each on a cluster); [MIN, MAX]: elastic, the group runs "
                               "at whatever size in that range the cluster can hold, shrinking when a node is lost "
                               "and growing back when capacity returns")
    worker_start_timeout_s: float = Field(
        default=60.0, gt=0, description="how long Ray Train waits for a worker group to start before retrying at the "
                                        "size available (elastic: what a lost node costs before the group shrinks)")
    resize_check_s: float = Field(default=60.0, ge=0, description="elastic: how often a healthy group checks whether "
                                  "it could grow (a grow restarts it from the newest checkpoint)")
    wait_for_workers_s: float = Field(default=1800.0, gt=0, description="fail the stage when no worker group has "
                                      "been able to run for this long (Ray Train itself would wait forever)")
    use_gpu: bool = False
    gpu: Literal["h100", "h200", "a100"] = "h100"
    cpus_per_worker: float = Field(default=1.0, gt=0)
    zero_stage: int = Field(default=2, ge=0, le=3)
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_comm_fp32: bool = Field(default=True, description="bf16 training: reduce gradients across ranks in fp32 "
                                                           "(bf16 sums lose low bits at hundreds of ranks)")
    offload_optimizer: bool = Field(default=False, description="optimizer state in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(default=False, description="parameters in CPU memory (ZeRO-3 only)")
    loader_workers: int = Field(default=0, ge=0)
    streams: int | None = Field(default=None, ge=1, description="canonical streams of the sample order, a multiple "
                                "of workers dividing global_batch (default: workers x loader_workers; pin it to "
                                "resume on another number of workers)")
    open_shards: int = Field(default=4, ge=1, description="shards each stream reads at once (mixes class-sorted shards)")
    shuffle_buffer: int = Field(default=512, ge=1, description="samples each stream shuffles among")
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=0, description="worker faults Ray Train recovers from")
    log_every: int = Field(default=10, ge=1)
    tensorboard: bool = Field(default=True, description="write TensorBoard event files under tensorboard/")
    ledger: bool = Field(default=False, description="record every sample key consumed (audits exact resume)")

    optimizer: ClassVar[str]  # the stage's optimizer: decides whether its state can be resharded

    # How the stage runs, not what it learns: a resume that changes one of these continues from the
    # checkpoints. The global batch, the sample order (streams, resolved below) and the update do
    # not depend on them; the micro-batch only splits a global step into more or fewer pieces.
    execution_params: ClassVar[frozenset[str]] = frozenset({
        "workers", "worker_start_timeout_s", "resize_check_s", "wait_for_workers_s", "use_gpu", "gpu",
        "cpus_per_worker", "micro_batch", "loader_workers", "checkpoint_activations", "checkpoint_every",
        "keep_checkpoints", "max_failures", "log_every", "tensorboard", "ledger"})

    def result_params(self) -> dict[str, Any]:
        params = super().result_params()
        params["streams"] = self.order_streams  # unset, it follows the workers: then they decide the order
        return params

    @field_validator("workers")
    @classmethod
    def _check_workers(cls, workers: int | list[int]) -> int | list[int]:
        bounds = [workers, workers] if isinstance(workers, int) else workers
        if len(bounds) != 2 or not 1 <= bounds[0] <= bounds[1]:
            raise ValueError(f"workers must be a number >= 1 or [MIN, MAX] with 1 <= MIN <= MAX, got {workers}")
        return workers

    @property
    def elastic(self) -> bool:
        return not isinstance(self.workers, int)

    @property
    def world_sizes(self) -> list[int]:
        """Every number of workers this stage may run on: ``workers``, or (elastic) the sizes in
        [MIN, MAX] that split the global batch into whole micro-batches per rank (the group's size
        is rounded down to one of them: ``stages.train.elastic``)."""
        if isinstance(self.workers, int):
            return [self.workers]
        low, high = self.workers
        return [w for w in valid_world_sizes(self.global_batch, self.micro_batch) if low <= w <= high]

    @property
    def workers_label(self) -> str:
        """For logs: "2", or "1-2 (elastic)"."""
        return f"{self.min_workers}-{self.max_workers} (elastic)" if self.elastic else str(self.workers)

    @property
    def min_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[0]

    @property
    def max_workers(self) -> int:
        return self.workers if isinstance(self.workers, int) else self.workers[1]

    @property
    def order_streams(self) -> int:
        """The streams of the sample order: as set, else one per loader process of every worker
        (elastic: of the least common multiple of the sizes it may run on, so that each can split them)."""
        return self.streams or math.lcm(*self.world_sizes) * max(1, self.loader_workers)

    @model_validator(mode="after")
    def _check_training(self) -> TrainParams:
        if self.elastic:
            usable = self.world_sizes  # between them, the group's size is rounded down to one
            if self.min_workers not in usable or self.max_workers not in usable:
                raise ValueError(f"workers [{self.min_workers}, {self.max_workers}]: MIN and MAX must each split "
                                 f"global_batch {self.global_batch} into micro-batches of {self.micro_batch}; the "
                                 f"sizes in that range that do: {usable or 'none'}")
        for size in self.world_sizes:
            accumulation_steps(self.global_batch, self.micro_batch, size)  # raises a one-line ValueError
        streams = self.order_streams
        if any(streams % size for size in self.world_sizes) or self.global_batch % streams:
            given = "" if self.streams else " (workers x loader_workers; set streams)"
            what = f"every size the group may take ({self.world_sizes})" if self.elastic else f"workers ({self.workers})"
            raise ValueError(f"streams {streams}{given} must be a multiple of {what} and divide global_batch "
                             f"({self.global_batch})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        return self


class PretrainParams(TrainParams):
    optimizer: ClassVar[str] = "adamw"
    model: str = Field(default="Ti/16", description="variant SIZE/PATCH, e.g. B/16, L/16, H/14, Ti/4")
    width: int | None = Field(default=None, ge=8, description="override the variant's width (tiny runs)")
    depth: int | None = Field(default=None, ge=1)
    heads: int | None = Field(default=None, ge=1)
    mlp_dim: int | None = Field(default=None, ge=8)
    pool: Literal["cls", "gap"] = "cls"
    representation_size: int | None = Field(default=None, ge=1, description="pre-logits (tanh) layer width")
    weight_decay: float = Field(default=0.1, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])

    @model_validator(mode="after")
    def _check(self) -> PretrainParams:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must be two numbers in [0, 1)")
        self.vit_config(10)  # raises on an unknown variant or a size not divisible by the patch
        return self

    def vit_config(self, num_classes: int) -> ViTConfig:
        overrides = {k: getattr(self, k) for k in ("width", "depth", "heads", "mlp_dim") if getattr(self, k)}
        return decode_variant(self.model, image_size=self.image_size, num_classes=num_classes, pool=self.pool,
                              representation_size=self.representation_size, dropout=self.dropout,
                              drop_path=self.drop_path, checkpoint_activations=self.checkpoint_activations,
                              **overrides)


class FinetuneParams(TrainParams):
    optimizer: ClassVar[str] = "sgd"
    image_size: int = Field(default=384, ge=8, description="fine-tuning resolution (position embeddings resampled)")
    steps: int = Field(default=10_000, ge=1)
    global_batch: int = Field(default=512, ge=1)
    lr: float = Field(default=0.01, gt=0, description="the paper's grid: 0.001, 0.003, 0.01, 0.03")
    warmup_steps: int = Field(default=500, ge=0)
    decay: Literal["linear", "cosine"] = "cosine"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    crop_scale_min: float = Field(default=0.08, gt=0, le=1)
    train_split: str = "train"
    eval_split: str = Field(default="test", description="the held-out split top-1 is reported on")
    dataset: str | None = Field(default=None, description="name in metrics and the report (default: data input)")


def worker_demand(p: TrainParams) -> ResourceDemand:
    """The Ray Train worker group: ``workers`` bundles at once (elastic: the minimum; the group grows
    into whatever else the cluster has), each its CPUs and (on GPUs) one GPU."""
    bundle = {"CPU": p.cpus_per_worker, "GPU": 1.0 if p.use_gpu else 0.0}
    return ResourceDemand(bundles=(bundle,) * p.min_workers, together=True, label="training worker")
