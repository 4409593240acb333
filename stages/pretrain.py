"""The ``pretrain`` stage: ViT pretraining with DeepSpeed ZeRO on Ray Train workers.

Reads the ``data`` input (an ingest stage's shards), trains for ``steps`` optimizer steps with the
paper's recipe (AdamW, warmup then linear/cosine decay, clipping at 1), checkpoints every
``checkpoint_every`` steps (kept: the last ``keep_checkpoints``), and hands off
``model.safetensors`` + ``model_config.json``. Worker faults are retried by Ray Train
(``max_failures``) from the newest complete checkpoint; driver faults by ``vitpipe resume``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config import StageResources
from pipeline.errors import VitpipeError
from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext
from stages.data.loader import plan_epoch, shards_from_manifest
from stages.model.vit import ViTConfig, count_params, decode_variant
from stages.train.launch import base_worker_config, run_training
from stages.train.params import PEAK_FLOPS, TrainParams

__all__ = ["PretrainParams", "Pretrain", "PEAK_FLOPS"]


class PretrainParams(TrainParams):
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


@register_stage("pretrain")
class Pretrain(Stage):
    Params = PretrainParams
    input_roles = ("data",)

    @classmethod
    def default_resources(cls) -> StageResources:
        return StageResources(cpus=0)  # the coordinator waits; Ray Train workers hold the resources

    def run(self, ctx: StageContext) -> None:
        p: PretrainParams = ctx.params  # type: ignore[assignment]
        data = ctx.input("data")
        shards = shards_from_manifest(data.manifest.metrics, "train")
        classes = data.manifest.metrics.get("classes") or []
        if not classes:
            raise VitpipeError(f"input {data.stage!r} records no classes; is it an ingest stage?")
        plan_epoch(shards, ctx.seed, 0, p.workers, max(1, p.loader_workers), p.micro_batch)  # fail fast
        model_cfg = p.vit_config(len(classes))
        config = {**base_worker_config(ctx, p, data.storage.uri, shards), "model": model_cfg.to_dict(),
                  "optimizer": {"name": "adamw", "betas": p.betas, "weight_decay": p.weight_decay}}
        ctx.logger.info("pretraining ViT-%s (%.2fM params) on %d worker(s), ZeRO-%d, %s, %d steps",
                        p.model, count_params(model_cfg) / 1e6, p.workers, p.zero_stage, p.precision, p.steps)
        history = run_training(ctx, p, config)
        if history:
            ctx.metrics.update({"final_loss": history[-1]["loss"], "first_loss": history[0]["loss"],
                                "steps": history[-1]["step"], "params": count_params(model_cfg),
                                "images_per_s": history[-1]["images_per_s"]})
        ctx.metrics["model_config"] = model_cfg.to_dict()
