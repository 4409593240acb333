"""The ``finetune`` stage: transfer a pretrained ViT to a downstream dataset (paper §3.2, Table 4).

Loads the ``model`` input's handoff (``model.safetensors`` + ``model_config.json``, checked against
its manifest), removes the pretraining head (and pre-logits), attaches a zero-initialised linear
head for the ``data`` input's K classes, resamples the position embeddings to ``image_size``
(e.g. 224 -> 384; 32 -> 48 in the tiny config), and trains with SGD (momentum 0.9, no weight
decay, clipping at 1, warmup + cosine decay) on Ray Train + DeepSpeed with the same
checkpoint/resume guarantees as pretraining. Afterwards every ``eval_split`` sample is scored once
(on the training devices) and top-1 goes into the stage's record and ``eval.json``; the
fine-tuned weights are handed off like pretraining's.
"""

from __future__ import annotations

from pipeline.config import StageResources
from pipeline.errors import VitpipeError
from pipeline.preflight import ResourceDemand
from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext, StageParams
from stages.data.loader import check_layout
from stages.data.order import OrderSpec
from stages.model.transfer import transfer_config
from stages.records import EvalRecord, IngestResult, handoff_of, read_result
from stages.train.job import EvalSpec, FinetuneTask, OptimizerSpec
from stages.train.launch import run_training, train_result, training_job
from stages.train.loop import EVAL_FILE
from stages.train.params import FinetuneParams, worker_demand

__all__ = ["Finetune"]


@register_stage("finetune")
class Finetune(Stage):
    Params = FinetuneParams
    input_roles = ("model", "data")

    @classmethod
    def default_resources(cls) -> StageResources:
        return StageResources(cpus=0)  # the Ray Train workers hold the resources

    @classmethod
    def resource_demand(cls, params: StageParams) -> ResourceDemand:
        return worker_demand(params)  # type: ignore[arg-type]

    def run(self, ctx: StageContext) -> None:
        p: FinetuneParams = ctx.params  # type: ignore[assignment]
        pretrained, handoff = handoff_of(ctx.input("model"))
        source = pretrained.vit_config()
        data = ctx.input("data")
        ingested = read_result(data, IngestResult, "an ingest stage")
        shards = ingested.shards(p.train_split)
        evaluation = EvalSpec(p.eval_split, tuple(ingested.shards(p.eval_split)))
        check_layout(shards, OrderSpec(ctx.seed, p.order_streams, p.open_shards, p.shuffle_buffer), p.global_batch,
                     p.micro_batch, p.max_workers)  # fail fast, before any worker starts
        if p.image_size % source.patch_size:
            raise VitpipeError(f"image_size {p.image_size} is not divisible by the model's patch size "
                               f"{source.patch_size}")
        target = transfer_config(source, p.image_size, len(ingested.classes), dropout=p.dropout,
                                 drop_path=p.drop_path, checkpoint_activations=p.checkpoint_activations)
        optimizer = OptimizerSpec(p.optimizer, p.lr, momentum=p.momentum, grad_clip=p.grad_clip)
        job = training_job(ctx, p, target, optimizer, ingested.shard_uri(data), shards, ingested.classes,
                           FinetuneTask(handoff, evaluation))
        dataset = p.dataset or data.stage
        ctx.logger.info("fine-tuning on %s (%d classes) at %d px (grid %d -> %d), %d steps on %s worker(s)",
                        dataset, len(ingested.classes), p.image_size, source.grid, target.grid, p.steps, p.workers_label)
        outcome = run_training(ctx, p, job)
        result = EvalRecord.model_validate_json(ctx.out.read_text(EVAL_FILE))
        ctx.result = train_result("finetune", target, outcome, dataset=dataset, evaluation=result)
