"""The ``pretrain`` stage: ViT pretraining with DeepSpeed ZeRO on Ray Train workers.

Reads the ``data`` input (an ingest stage's shards), trains for ``steps`` optimizer steps with the
paper's recipe (AdamW, warmup then linear/cosine decay, clipping at 1), checkpoints every
``checkpoint_every`` steps (kept: the last ``keep_checkpoints``), and hands off
``model.safetensors`` + ``model_config.json``. Worker faults are retried by Ray Train
(``max_failures``) from the newest complete checkpoint; driver faults by ``vitpipe resume``.
"""

from __future__ import annotations

from pipeline.config import StageResources
from pipeline.preflight import ResourceDemand
from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext, StageParams
from stages.data.loader import check_layout
from stages.data.order import OrderSpec
from stages.model.vit import count_params
from stages.records import IngestResult, read_result
from stages.train.job import OptimizerSpec, PretrainTask
from stages.train.launch import run_training, train_result, training_job
from stages.train.params import PretrainParams, worker_demand

__all__ = ["Pretrain"]


@register_stage("pretrain")
class Pretrain(Stage):
    Params = PretrainParams
    input_roles = ("data",)

    @classmethod
    def default_resources(cls) -> StageResources:
        return StageResources(cpus=0)  # the coordinator waits; Ray Train workers hold the resources

    @classmethod
    def resource_demand(cls, params: StageParams) -> ResourceDemand:
        return worker_demand(params)  # type: ignore[arg-type]

    def run(self, ctx: StageContext) -> None:
        p: PretrainParams = ctx.params  # type: ignore[assignment]
        data = ctx.input("data")
        ingested = read_result(data, IngestResult, "an ingest stage")
        shards = ingested.shards("train")
        check_layout(shards, OrderSpec(ctx.seed, p.order_streams, p.open_shards, p.shuffle_buffer), p.global_batch,
                     p.micro_batch, p.max_workers)  # fail fast, before any worker starts
        model = p.vit_config(len(ingested.classes))
        optimizer = OptimizerSpec(p.optimizer, p.lr, weight_decay=p.weight_decay, betas=(p.betas[0], p.betas[1]),
                                  grad_clip=p.grad_clip)
        job = training_job(ctx, p, model, optimizer, ingested.shard_uri(data), shards, ingested.classes, PretrainTask())
        ctx.logger.info("pretraining ViT-%s (%.2fM params) on %s worker(s), ZeRO-%d, %s, %d steps",
                        p.model, count_params(model) / 1e6, p.workers_label, p.zero_stage, p.precision, p.steps)
        ctx.result = train_result("pretrain", model, run_training(ctx, p, job))
