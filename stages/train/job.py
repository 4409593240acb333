"""The training job: one typed, immutable description of a training run that crosses the Ray
Train boundary (and ``torchrun``'s, for the GPU check) instead of a string-keyed dict.

A stage builds it from its validated params (:mod:`stages.train.launch`); every worker reads
the same object. What is only known inside the workers — the world size, hence the batch
geometry and the DeepSpeed config — is resolved there, once (:mod:`stages.train.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import StorageSettings
from pipeline.trackers import TrackerIds
from stages.data.order import OrderSpec
from stages.data.tarshards import ShardInfo
from stages.model.handoff import HandoffRef
from stages.model.vit import ViTConfig
from stages.train.geometry import BatchGeometry
from stages.train.schedule import lr_at

__all__ = ["OptimizerSpec", "ScheduleSpec", "DataSpec", "EvalSpec", "PretrainTask", "FinetuneTask", "Task",
           "DistributedSpec", "CheckpointPolicy", "OutputSpec", "TelemetrySpec", "TrainJob"]


@dataclass(frozen=True)
class OptimizerSpec:
    """AdamW for pretraining (decay on what the model does not exempt), SGD with momentum for
    fine-tuning (the paper's recipe: no weight decay)."""

    name: Literal["adamw", "sgd"]
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.name!r}")
        if self.name == "sgd" and self.weight_decay:
            raise ValueError("the SGD fine-tuning recipe uses no weight decay")


@dataclass(frozen=True)
class ScheduleSpec:
    steps: int
    warmup_steps: int
    decay: Literal["linear", "cosine"]

    def lr(self, step: int, base_lr: float) -> float:
        """LR of optimizer step ``step`` (0-based)."""
        return lr_at(step, base_lr, self.steps, self.warmup_steps, self.decay)


@dataclass(frozen=True)
class DataSpec:
    """The training stream: shards of an ingest stage, their order (``stages.data.order``, seeded
    with the job's seed) and augmentation, and the loader processes per rank."""

    uri: str
    shards: tuple[ShardInfo, ...]
    crop_scale: tuple[float, float]
    hflip: bool
    loader_workers: int
    streams: int = 8
    open_shards: int = 4
    shuffle_buffer: int = 512
    # Label names in class-index order: samples labelled by name (KEY.txt/.json, in a corpus indexed
    # in place) are looked up here; ingest's own shards carry the index (KEY.cls).
    class_names: tuple[str, ...] = ()

    def order(self, seed: int) -> OrderSpec:
        return OrderSpec(seed, self.streams, self.open_shards, self.shuffle_buffer)


@dataclass(frozen=True)
class EvalSpec:
    """Held-out shards (under the training data's ``uri``) scored once after training."""

    split: str
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class PretrainTask:
    """Train from random initialisation; no evaluation afterwards."""

    kind: Literal["pretrain"] = "pretrain"


@dataclass(frozen=True)
class FinetuneTask:
    """Start from a pretrained handoff (head replaced, position embeddings resampled) and score
    ``evaluation`` afterwards."""

    init: HandoffRef
    evaluation: EvalSpec
    kind: Literal["finetune"] = "finetune"


Task = PretrainTask | FinetuneTask


@dataclass(frozen=True)
class DistributedSpec:
    """How ZeRO spreads the work; precision is result-defining, the rest only decides how."""

    zero_stage: int
    precision: Literal["fp32", "bf16"]
    grad_comm_fp32: bool = True
    offload_optimizer: bool = False
    offload_params: bool = False
    use_gpu: bool = False
    peak_flops: float | None = None  # one device's dense bf16 peak, for MFU (None: not reported)


@dataclass(frozen=True)
class CheckpointPolicy:
    every: int
    keep: int


@dataclass(frozen=True)
class OutputSpec:
    """Where the stage's outputs go (its folder, local or S3) and each node's local scratch."""

    uri: str
    storage: StorageSettings = field(default_factory=StorageSettings)
    staging: str = ""  # local directory; per-rank subfolders are made under it


@dataclass(frozen=True)
class TelemetrySpec:
    log_every: int
    tensorboard: bool = True
    show_progress: bool = False
    ledger: bool = False  # record every sample key consumed (audits exact resume)
    trackers: TrackerIds | None = None  # MLflow / W&B runs rank 0 also logs each step to


@dataclass(frozen=True)
class TrainJob:
    label: str  # the stage's name: log lines, TensorBoard tags
    seed: int
    model: ViTConfig
    optimizer: OptimizerSpec
    schedule: ScheduleSpec
    batch: BatchGeometry
    data: DataSpec
    distributed: DistributedSpec
    checkpoints: CheckpointPolicy
    output: OutputSpec
    telemetry: TelemetrySpec
    task: Task = field(default_factory=PretrainTask)

    def __post_init__(self) -> None:
        if self.schedule.warmup_steps > self.schedule.steps:
            raise ValueError(f"warmup_steps {self.schedule.warmup_steps} exceeds steps {self.schedule.steps}")
