"""Running a training loop on Ray Train workers, for any training stage.

The coordinator (a stage task) builds the worker config, starts a ``TorchTrainer`` with gloo (CPU)
or NCCL (GPU), lets Ray Train retry worker faults from the newest complete checkpoint, and turns
a worker's error into one line. Model code never sees Ray or DeepSpeed: the worker loop wraps it.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from typing import Any

from pipeline.errors import VitpipeError
from pipeline.stage import StageContext
from stages.train.ds_config import build_deepspeed_config
from stages.train.params import PEAK_FLOPS, TrainParams

__all__ = ["base_worker_config", "run_training", "worker_error_line"]

_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception)): (.*)$")


def worker_error_line(text: str, limit: int = 400) -> str:
    """One line for a worker failure Ray reports as a whole traceback: the last exception raised.

    Our own errors (``VitpipeError``) are shown bare; others keep their type, e.g.
    ``RuntimeError: value cannot be converted to type float without overflow``.
    """
    found = None
    for line in text.splitlines():
        m = _EXCEPTION_LINE.match(line.strip())
        if m and not m.group(1).startswith(("WorkerGroupError", "TrainingFailedError")):
            found = m
    if found is None:
        return " ".join(text.split())[:limit]
    kind, message = found.group(1), " ".join(found.group(2).split())
    return (message if kind == "VitpipeError" else f"{kind}: {message}")[:limit]


def base_worker_config(ctx: StageContext, p: TrainParams, data_uri: str, shards: list[Any]) -> dict[str, Any]:
    """The worker config keys every training stage shares (the stage adds model and optimizer)."""
    return {
        "seed": ctx.seed, "label": ctx.name,
        "deepspeed": build_deepspeed_config(global_batch=p.global_batch, micro_batch=p.micro_batch,
                                            world_size=p.workers, zero_stage=p.zero_stage,
                                            precision=p.precision, grad_clip=p.grad_clip,
                                            offload_optimizer=p.offload_optimizer),
        "storage": (ctx.run_storage_settings.model_dump() if ctx.run_storage_settings else {}),
        "out_uri": ctx.out.uri, "data_uri": data_uri,
        "shards": [{"path": s.path, "samples": s.samples} for s in shards],
        "micro_batch": p.micro_batch, "global_batch": p.global_batch, "loader_workers": p.loader_workers,
        "steps": p.steps, "lr": p.lr, "warmup_steps": p.warmup_steps, "decay": p.decay,
        "checkpoint_every": p.checkpoint_every, "keep_checkpoints": p.keep_checkpoints, "log_every": p.log_every,
        "ledger": p.ledger, "tensorboard": p.tensorboard, "show_progress": ctx.show_progress,
        "peak_flops": PEAK_FLOPS[p.gpu] if p.use_gpu else 0.0, "crop_scale": [p.crop_scale_min, 1.0],
        "hflip": p.hflip,
        "eval_shards": [], "eval_split": None, "init": None,
    }


def run_training(ctx: StageContext, p: TrainParams, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Train on ``p.workers`` Ray Train workers; returns the per-step metrics history."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from stages.train.worker import train_loop

    staging = tempfile.mkdtemp(prefix=f"vitpipe-{ctx.name}-")
    config = {**config, "staging": staging}
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
    except Exception as err:  # noqa: BLE001 - Ray wraps the worker's traceback; keep the cause's line
        raise VitpipeError(f"training failed: {worker_error_line(str(err))}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for rel in ("model.safetensors", "model_config.json", "metrics.jsonl", "workers.json"):
        ctx.add_output(rel)
    for obj in ctx.out.list("tensorboard/"):
        ctx.add_output(obj.path)
    return [json.loads(line) for line in ctx.out.read_text("metrics.jsonl").splitlines() if line]
