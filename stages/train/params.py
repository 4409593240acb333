"""Parameters every training stage shares (pretrain and finetune): batch geometry, schedule,
distribution, checkpointing. Validated when the config is loaded, not when a worker starts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.stage import StageParams

__all__ = ["TrainParams", "PEAK_FLOPS"]

# Dense bf16 peak FLOP/s per accelerator, for MFU.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "cpu": 0.0}


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

    workers: int = Field(default=2, ge=1, description="Ray Train workers (one GPU each on a cluster)")
    use_gpu: bool = False
    gpu: Literal["h100", "h200", "a100"] = "h100"
    cpus_per_worker: float = Field(default=1.0, gt=0)
    zero_stage: int = Field(default=2, ge=0, le=3)
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False
    loader_workers: int = Field(default=0, ge=0)
    checkpoint_every: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=2, ge=0, description="worker faults Ray Train recovers from")
    log_every: int = Field(default=10, ge=1)
    tensorboard: bool = Field(default=True, description="write TensorBoard event files under tensorboard/")
    ledger: bool = Field(default=False, description="record every sample key consumed (audits exact resume)")

    @model_validator(mode="after")
    def _check_geometry(self) -> TrainParams:
        if self.global_batch % (self.workers * self.micro_batch):
            raise ValueError(f"global_batch {self.global_batch} is not divisible by workers x micro_batch "
                             f"({self.workers} x {self.micro_batch})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        return self
