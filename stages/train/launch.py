"""Running a training job on Ray Train workers, for any training stage.

:func:`training_job` turns a stage's validated params into the typed :class:`TrainJob`;
:func:`run_training` starts a ``TorchTrainer`` with gloo (CPU) or NCCL (GPU), lets Ray Train retry
worker faults from the newest complete checkpoint, and turns a worker's error into one line.
Model code never sees Ray or DeepSpeed: the loop wraps it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pipeline.config import StorageSettings
from pipeline.environment import scoped_environment
from pipeline.errors import DeterministicError, VitpipeError
from pipeline.stage import StageContext
from pipeline.storage import Storage
from stages.data.tarshards import ShardInfo
from stages.model.handoff import HANDOFF_FILES
from stages.model.vit import ViTConfig, count_params
from stages.records import GoodputRecord, TrainResult
from stages.train.checkpoint import CheckpointStore
from stages.train.geometry import BatchGeometry
from stages.train.goodput import GOODPUT_DIR, account, read_snapshots
from stages.train.hardware import ACCELERATORS
from stages.train.job import (
    CheckpointPolicy,
    DataSpec,
    DistributedSpec,
    FinetuneTask,
    OptimizerSpec,
    OutputSpec,
    ScheduleSpec,
    Task,
    TelemetrySpec,
    TrainJob,
)
from stages.train.loop import ATTEMPTS_FILE, EVAL_FILE, STOPPED_FILE, WORKERS_FILE, attempts_recorded
from stages.train.metrics import METRICS_FILE, StepRecord, read_history
from stages.train.params import TrainParams
from stages.train.timing import format_duration

__all__ = ["training_job", "run_training", "scaling_config", "TrainingOutcome", "train_result", "worker_error_line"]

log = logging.getLogger(__name__)

_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception)): (.*)$")


def _subclass_names(cls: type) -> set[str]:
    return {cls.__name__}.union(*(_subclass_names(sub) for sub in cls.__subclasses__()))


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
    ours = kind in _subclass_names(VitpipeError)  # their messages stand alone: shown without the type
    return (message if ours else f"{kind}: {message}")[:limit]


def training_job(ctx: StageContext, p: TrainParams, model: ViTConfig, optimizer: OptimizerSpec, data_uri: str,
                 shards: list[ShardInfo], class_names: list[str], task: Task) -> TrainJob:
    """The job a training stage runs: its params, model and optimizer, and where it reads and writes."""
    return TrainJob(
        label=ctx.name, seed=ctx.seed, model=model, optimizer=optimizer,
        schedule=ScheduleSpec(p.steps, p.warmup_steps, p.decay),
        batch=BatchGeometry(p.global_batch, p.micro_batch),
        data=DataSpec(data_uri, tuple(shards), (p.crop_scale_min, 1.0), p.hflip, p.loader_workers, p.order_streams,
                      p.open_shards, p.shuffle_buffer, tuple(class_names)),
        distributed=DistributedSpec(p.zero_stage, p.precision, p.grad_comm_fp32, p.offload_optimizer, p.offload_params,
                                    p.use_gpu, ACCELERATORS[p.gpu].peak_flops if p.use_gpu else None),
        checkpoints=CheckpointPolicy(p.checkpoint_every, p.keep_checkpoints),
        output=OutputSpec(ctx.out.uri, ctx.run_storage_settings or StorageSettings()),
        telemetry=TelemetrySpec(p.log_every, p.tensorboard, ctx.show_progress, p.ledger, ctx.trackers),
        task=task,
    )


def _stopped_by(out: Storage) -> str | None:
    """The error that ended training without retries (see :data:`~stages.train.loop.STOPPED_FILE`)."""
    if not out.exists(STOPPED_FILE):
        return None
    return f"training stopped: {json.loads(out.read_text(STOPPED_FILE))['error']} (not retried: it would happen again)"


def announce_reshard(store: CheckpointStore, workers: int, stage: str) -> None:
    """Say on the console, before any worker starts, that the newest checkpoint was written by
    another number of workers (``workers`` is an execution param, so a resume may change it) and
    will be resharded as it loads (``stages.train.reshard``)."""
    steps = store.steps()
    written_by = store.world_size(steps[-1]) if steps else None
    if written_by is not None and written_by != workers:
        log.info("%s: resuming step %d (written by %d workers) on %d: its state is resharded as it loads", stage,
                 steps[-1], written_by, workers)


# Ray Train reads it in its controller, which copies it from the environment of the process calling fit().
START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@dataclass(frozen=True)
class TrainingOutcome:
    history: list[StepRecord]
    goodput: GoodputRecord


def scaling_config(p: TrainParams) -> Any:
    """Ray Train's ``ScalingConfig`` for the stage: a fixed group of ``workers``, or ``(min, max)``:
    elastic (the group restarts at the size the cluster holds after losing a node, and grows back
    when capacity returns; each restart resumes the newest checkpoint, resharded; sizes that cannot
    split the batch are rounded down: ``stages.train.elastic``)."""
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=(p.min_workers, p.max_workers) if p.elastic else p.workers, use_gpu=p.use_gpu,
                         resources_per_worker={"CPU": p.cpus_per_worker},
                         elastic_resize_monitor_interval_s=p.resize_check_s)


def run_training(ctx: StageContext, p: TrainParams, job: TrainJob) -> TrainingOutcome:
    """Train on ``p.workers`` Ray Train workers (elastic: as many in the range as the cluster holds);
    record the outputs; return the metrics history and where the wall time went."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from stages.train.elastic import ElasticTorchTrainer
    from stages.train.loop import ray_train_entry
    from stages.train.waiting import WaitDeadline, WorkersUnavailableError

    started = time.time()
    first_attempt = attempts_recorded(ctx.out)
    staging = tempfile.mkdtemp(prefix=f"vitpipe-{ctx.name}-")
    if isinstance(p.workers, int):  # an elastic group's size is known once it starts
        announce_reshard(CheckpointStore(ctx.out, Path(staging)), p.workers, ctx.name)
    ctx.out.delete(STOPPED_FILE)  # an earlier attempt's verdict: this one tries again
    trainer_class: Any = partial(ElasticTorchTrainer, sizes=p.world_sizes) if p.elastic else TorchTrainer
    trainer = trainer_class(
        ray_train_entry,
        train_loop_config={"job": replace(job, output=replace(job.output, staging=staging))},
        torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
        scaling_config=scaling_config(p),
        run_config=RunConfig(name=f"{ctx.name}-{ctx.fingerprint[:12]}", storage_path=staging,
                             failure_config=FailureConfig(max_failures=p.max_failures),
                             callbacks=[WaitDeadline(ctx.name, p.wait_for_workers_s, f"{p.workers_label} workers")]),
    )
    try:
        with scoped_environment({START_TIMEOUT_VARIABLE: str(p.worker_start_timeout_s)}):
            trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray wraps the worker's traceback; keep the cause's line
        stopped = _stopped_by(ctx.out)
        if stopped:
            raise DeterministicError(stopped) from None
        cause = getattr(err, "controller_failure", None)  # ray.train.ControllerError: raised in the controller
        if isinstance(cause, WorkersUnavailableError):
            raise VitpipeError(str(cause)) from None
        raise VitpipeError(f"training failed: {worker_error_line(str(err))}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stopped = _stopped_by(ctx.out)
    if stopped:
        raise DeterministicError(stopped)
    evaluated = [EVAL_FILE] if isinstance(job.task, FinetuneTask) else []
    for rel in (*HANDOFF_FILES, METRICS_FILE, WORKERS_FILE, ATTEMPTS_FILE, *evaluated):
        ctx.add_output(rel)
    for folder in ("tensorboard/", f"{GOODPUT_DIR}/"):
        for obj in ctx.out.list(folder):
            ctx.add_output(obj.path)
    goodput = account(started, time.time(), read_snapshots(ctx.out), first_attempt)
    ctx.logger.info("%s: goodput %.0f%% of %s (%s)", ctx.name, 100 * goodput.fraction, format_duration(goodput.wall_s),
                    ", ".join(f"{name} {format_duration(sec)}" for name, sec in goodput.buckets.items() if sec >= 0.5))
    return TrainingOutcome(read_history(ctx.out), goodput)


def train_result(kind: Literal["pretrain", "finetune"], model: ViTConfig, outcome: TrainingOutcome,
                 **extra: Any) -> TrainResult:
    """A training stage's record: the handed-off architecture and how training went."""
    history, goodput = outcome.history, outcome.goodput
    last_window = next((r for r in reversed(history) if r.images_per_s is not None), None)
    return TrainResult(kind=kind, architecture=model.to_dict(), params=count_params(model),
                       steps=history[-1].step if history else 0, first_loss=history[0].loss if history else None,
                       final_loss=history[-1].loss if history else None,
                       images_per_s=last_window.images_per_s if last_window else None,
                       goodput=goodput, **extra)
