"""The ``finetune`` stage: transfer a pretrained ViT to a downstream dataset (paper §3.2, Table 4).

Loads the ``model`` input's handoff (``model.safetensors`` + ``model_config.json``), removes the
pretraining head (and pre-logits), attaches a zero-initialised linear head for the ``data``
input's K classes, resamples the position embeddings to ``image_size`` (e.g. 224 -> 384; 32 -> 48
in the tiny config), and trains with SGD (momentum 0.9, no weight decay, clipping at 1, warmup +
cosine decay) on Ray Train + DeepSpeed with the same checkpoint/resume guarantees as pretraining.
Afterwards every ``eval_split`` sample is scored once and top-1 goes into the manifest metrics
(``top1``) and ``eval.json``; the fine-tuned weights are handed off like pretraining's.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from pipeline.config import StageResources
from pipeline.errors import VitpipeError
from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext
from stages.data.loader import plan_epoch, shards_from_manifest
from stages.model.transfer import transfer_config
from stages.model.vit import ViTConfig, count_params
from stages.train.launch import base_worker_config, run_training
from stages.train.params import TrainParams

__all__ = ["FinetuneParams", "Finetune", "source_model_config"]


class FinetuneParams(TrainParams):
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


def source_model_config(ctx: StageContext) -> ViTConfig:
    """The pretrained model's config, from the ``model`` input's manifest (a pretrain handoff)."""
    model = ctx.input("model")
    raw = model.manifest.metrics.get("model_config")
    if not raw or "model.safetensors" not in {o.path for o in model.manifest.outputs}:
        raise VitpipeError(f"input {model.stage!r} hands off no model (model.safetensors + model_config); "
                           "is it a pretrain or finetune stage?")
    return ViTConfig(**raw)  # hybrid_layers: JSON lists become tuples in ViTConfig


@register_stage("finetune")
class Finetune(Stage):
    Params = FinetuneParams
    input_roles = ("model", "data")

    @classmethod
    def default_resources(cls) -> StageResources:
        return StageResources(cpus=0)  # the Ray Train workers hold the resources

    def run(self, ctx: StageContext) -> None:
        p: FinetuneParams = ctx.params  # type: ignore[assignment]
        source = source_model_config(ctx)
        data = ctx.input("data")
        classes = data.manifest.metrics.get("classes") or []
        if not classes:
            raise VitpipeError(f"input {data.stage!r} records no classes; is it an ingest stage?")
        shards = shards_from_manifest(data.manifest.metrics, p.train_split)
        eval_shards = shards_from_manifest(data.manifest.metrics, p.eval_split)
        plan_epoch(shards, ctx.seed, 0, p.workers, max(1, p.loader_workers), p.micro_batch)  # fail fast
        if p.image_size % source.patch_size:
            raise VitpipeError(f"image_size {p.image_size} is not divisible by the model's patch size "
                               f"{source.patch_size}")
        target = transfer_config(source, p.image_size, len(classes), dropout=p.dropout, drop_path=p.drop_path,
                                 checkpoint_activations=p.checkpoint_activations)
        config = {**base_worker_config(ctx, p, data.storage.uri, shards), "model": target.to_dict(),
                  "optimizer": {"name": "sgd", "momentum": p.momentum},
                  "init": {"uri": ctx.input("model").storage.uri},
                  "eval_shards": [{"path": s.path, "samples": s.samples} for s in eval_shards],
                  "eval_split": p.eval_split}
        dataset = p.dataset or data.stage
        ctx.logger.info("fine-tuning on %s (%d classes) at %d px (grid %d -> %d), %d steps on %d worker(s)",
                        dataset, len(classes), p.image_size, source.grid, target.grid, p.steps, p.workers)
        history = run_training(ctx, p, config)
        ctx.add_output("eval.json")
        result = json.loads(ctx.out.read_text("eval.json"))
        ctx.metrics.update({"dataset": dataset, "top1": result["top1"], "eval": result,
                            "params": count_params(target), "model_config": target.to_dict()})
        if history:
            ctx.metrics.update({"final_loss": history[-1]["loss"], "first_loss": history[0]["loss"],
                                "steps": history[-1]["step"]})
