"""The ``pretrain`` stage: ViT pretraining with DeepSpeed ZeRO on Ray Train workers.

Reads the ``data`` input (an ingest stage's shards), trains for ``steps`` optimizer steps with the
paper's recipe (AdamW, warmup then linear/cosine decay, clipping at 1), checkpoints every
``checkpoint_every`` steps (kept: the last ``keep_checkpoints``), and hands off
``model.safetensors`` + ``model_config.json``. Worker faults are retried by Ray Train
(``max_failures``) from the newest complete checkpoint; driver faults by ``vitpipe resume``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import StageResources
from pipeline.errors import VitpipeError
from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext, StageParams
from stages.data.loader import plan_epoch, shards_from_manifest
from stages.model.vit import count_params, decode_variant
from stages.train.ds_config import build_deepspeed_config

__all__ = ["PretrainParams", "Pretrain", "PEAK_FLOPS"]

# Dense bf16 peak FLOP/s per accelerator, for MFU.
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "cpu": 0.0}


class PretrainParams(StageParams):
    model: str = Field(default="Ti/16", description="variant SIZE/PATCH, e.g. B/16, L/16, H/14, Ti/4")
    width: int | None = Field(default=None, ge=8, description="override the variant's width (tiny runs)")
    depth: int | None = Field(default=None, ge=1)
    heads: int | None = Field(default=None, ge=1)
    mlp_dim: int | None = Field(default=None, ge=8)
    image_size: int = Field(default=224, ge=8)
    pool: Literal["cls", "gap"] = "cls"
    representation_size: int | None = Field(default=None, ge=1, description="pre-logits (tanh) layer width")
    dropout: float = Field(default=0.0, ge=0, lt=1)
    drop_path: float = Field(default=0.0, ge=0, lt=1)
    checkpoint_activations: bool = False
    crop_scale_min: float = Field(default=0.08, gt=0, le=1, description="Inception crop: smallest area fraction")

    steps: int = Field(default=1000, ge=1)
    global_batch: int = Field(default=4096, ge=1)
    micro_batch: int = Field(default=32, ge=1)
    lr: float = Field(default=8e-4, gt=0)
    warmup_steps: int = Field(default=10_000, ge=0)
    decay: Literal["linear", "cosine"] = "linear"
    weight_decay: float = Field(default=0.1, ge=0)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999])
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
    ledger: bool = Field(default=False, description="record every sample key consumed (audits exact resume)")

    @model_validator(mode="after")
    def _check(self) -> PretrainParams:
        if self.global_batch % (self.workers * self.micro_batch):
            raise ValueError(f"global_batch {self.global_batch} is not divisible by workers x micro_batch "
                             f"({self.workers} x {self.micro_batch})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds steps {self.steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must be two numbers in [0, 1)")
        self.vit_config(10)  # raises on an unknown variant or a size not divisible by the patch
        return self

    def vit_config(self, num_classes: int):  # -> ViTConfig
        overrides = {k: getattr(self, k) for k in ("width", "depth", "heads", "mlp_dim") if getattr(self, k)}
        return decode_variant(self.model, image_size=self.image_size, num_classes=num_classes, pool=self.pool,
                              representation_size=self.representation_size, dropout=self.dropout,
                              drop_path=self.drop_path, checkpoint_activations=self.checkpoint_activations,
                              **overrides)


@register_stage("pretrain")
class Pretrain(Stage):
    Params = PretrainParams
    input_roles = ("data",)

    @classmethod
    def default_resources(cls) -> StageResources:
        return StageResources(cpus=0)  # the coordinator waits; Ray Train workers hold the resources

    def run(self, ctx: StageContext) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from stages.train.worker import train_loop

        p: PretrainParams = ctx.params  # type: ignore[assignment]
        data = ctx.input("data")
        shards = shards_from_manifest(data.manifest.metrics, "train")
        classes = data.manifest.metrics.get("classes") or []
        if not classes:
            raise VitpipeError(f"input {data.stage!r} records no classes; is it an ingest stage?")
        plan_epoch(shards, ctx.seed, 0, p.workers, max(1, p.loader_workers), p.micro_batch)  # fail fast
        model_cfg = p.vit_config(len(classes))
        ds_config = build_deepspeed_config(global_batch=p.global_batch, micro_batch=p.micro_batch,
                                           world_size=p.workers, zero_stage=p.zero_stage, precision=p.precision,
                                           grad_clip=p.grad_clip, offload_optimizer=p.offload_optimizer)
        staging = tempfile.mkdtemp(prefix=f"vitpipe-{ctx.name}-")
        config = {
            "seed": ctx.seed, "model": model_cfg.to_dict(), "deepspeed": ds_config,
            "storage": (ctx.run_storage_settings.model_dump() if ctx.run_storage_settings else {}),
            "out_uri": ctx.out.uri, "data_uri": data.storage.uri, "staging": staging,
            "shards": [{"path": s.path, "samples": s.samples} for s in shards],
            "micro_batch": p.micro_batch, "global_batch": p.global_batch, "loader_workers": p.loader_workers,
            "steps": p.steps, "lr": p.lr, "warmup_steps": p.warmup_steps, "decay": p.decay,
            "weight_decay": p.weight_decay, "betas": p.betas, "checkpoint_every": p.checkpoint_every,
            "keep_checkpoints": p.keep_checkpoints, "log_every": p.log_every, "ledger": p.ledger,
            "peak_flops": PEAK_FLOPS[p.gpu] if p.use_gpu else 0.0, "crop_scale": [p.crop_scale_min, 1.0],
        }
        ctx.logger.info("pretraining ViT-%s (%.2fM params) on %d worker(s), ZeRO-%d, %s, %d steps",
                        p.model, count_params(model_cfg) / 1e6, p.workers, p.zero_stage, p.precision, p.steps)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=p.workers, use_gpu=p.use_gpu,
                                         resources_per_worker={"CPU": p.cpus_per_worker}),
            run_config=RunConfig(name=f"{ctx.name}-{ctx.fingerprint[:12]}", storage_path=staging,
                                 failure_config=FailureConfig(max_failures=p.max_failures)),
        )
        try:
            trainer.fit()
        except Exception as err:  # noqa: BLE001 - Ray wraps the worker's error; keep its first line
            text = " ".join(str(err).split())
            cause = text.split("VitpipeError: ", 1)[-1] if "VitpipeError: " in text else text
            raise VitpipeError(f"training failed: {cause[:400]}") from None
        for rel in ("model.safetensors", "model_config.json", "metrics.jsonl"):
            ctx.add_output(rel)
        history = [json.loads(line) for line in ctx.out.read_text("metrics.jsonl").splitlines() if line]
        if history:
            ctx.metrics.update({"final_loss": history[-1]["loss"], "first_loss": history[0]["loss"],
                                "steps": history[-1]["step"], "params": count_params(model_cfg),
                                "images_per_s": history[-1]["images_per_s"]})
        ctx.metrics["model_config"] = model_cfg.to_dict()
        shutil.rmtree(staging, ignore_errors=True)
