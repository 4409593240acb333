"""The training loop every worker runs, for pretraining and fine-tuning alike.

:func:`train` needs only an initialised torch.distributed group and a :class:`TrainJob`, so it runs
under Ray Train (:func:`ray_train_entry`, what the stages use) and under ``torchrun``
(``bench/gpu_check.py``). Resume is exact: a checkpoint holds the engine's state and each rank's
loader position, RNG states and history, and a restart continues from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import DeterministicError
from pipeline.logsetup import configure_logging
from pipeline.storage import Storage, open_storage
from stages.data.loader import ShardLoader
from stages.model.handoff import save_handoff
from stages.model.vit import ViT, flops_per_image
from stages.train.checkpoint import CheckpointStore
from stages.train.checkpointer import Checkpointer, TrainState
from stages.train.context import WorkerContext, current_worker
from stages.train.engine import build_engine, set_lr, training_dtype
from stages.train.evaluate import evaluate
from stages.train.export import gather_full_state
from stages.train.geometry import StepGeometry
from stages.train.goodput import PhaseClock, write_snapshot
from stages.train.job import FinetuneTask, TrainJob
from stages.train.metrics import MetricsSink, StepMonitor
from stages.train.reshard import partitioned_optimizer_state, reshard_step
from stages.train.step import DataFeed, train_step

__all__ = ["train", "ray_train_entry", "attempts_recorded", "EVAL_FILE", "WORKERS_FILE"]

log = logging.getLogger("vitpipe.train")

EVAL_FILE = "eval.json"
WORKERS_FILE = "workers.json"
ATTEMPTS_FILE = "attempts.jsonl"  # one line per start of the worker group: when, how many, from which step
STOPPED_FILE = "stopped.json"  # written by a worker that met a DeterministicError
LEDGER_DIR = "ledger"  # rankR.json: [step, keys] per optimizer step (``ledger: true``)


def train(job: TrainJob, worker: WorkerContext, clock: PhaseClock | None = None) -> None:
    """Train ``job`` on this rank. ``clock``: where rank 0 accounts its wall time (goodput); the
    worker's entry point starts it, so that its own set-up counts too."""
    clock = clock or PhaseClock()
    mark = clock.origin  # the entry point's set-up (logging, storage) is start-up too
    if worker.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(worker.device)  # the peak reported is this run's, not the process's
    out = open_storage(job.output.uri, job.output.storage)
    staging = Path(job.output.staging)
    store = CheckpointStore(out, staging / f"rank{worker.rank}")
    reshard = reshard_step(store, worker.world_size,
                           partitioned_optimizer_state(job.distributed.zero_stage))
    engine, geometry = build_engine(job, worker, load_universal=reshard is not None and reshard.universal)
    _record_placement(out, worker)
    loader = _make_loader(job, worker, geometry)
    state = TrainState()
    checkpointer = Checkpointer(store, engine, worker,
                                {"loader": loader, "train": state},
                                keep=job.checkpoints.keep, node_store=CheckpointStore(out, staging / "node"))
    mark = clock.charge("startup", mark)
    step = checkpointer.restore(reshard)
    mark = clock.charge("checkpoint_restore", mark)
    attempt = _record_attempt(out, worker, step) if worker.is_main else 0
    sink = MetricsSink(job.label, job.schedule.steps, job.telemetry.log_every, out,
                       staging / "tensorboard" if job.telemetry.tensorboard else None, state.history,
                       job.telemetry.show_progress, job.telemetry.trackers) if worker.is_main else None
    dtype = training_dtype(job.distributed.precision)
    feed = DataFeed(loader, worker.device, dtype, record_keys=job.telemetry.ledger, seed=job.seed)
    monitor = StepMonitor(worker, geometry.global_batch, flops_per_image(job.model, training=True),
                          job.distributed.peak_flops)
    total, every = job.schedule.steps, job.checkpoints.every
    clock.charge("startup", mark)
    if worker.is_main:
        write_snapshot(out, clock.snapshot(attempt, step))
    clock.start_loop()
    while step < total:
        lr = job.schedule.lr(step, job.optimizer.lr)
        set_lr(engine.optimizer, lr)
        loss = train_step(engine, feed, geometry.accumulation)
        step += 1
        if job.telemetry.ledger:
            state.ledger.append((step, feed.take_keys()))
        monitor.add(step, loss, engine.get_global_grad_norm(), lr, loader.epoch)
        checkpoint_now = step % every == 0 or step == total
        if step % job.telemetry.log_every == 0 or checkpoint_now:  # the host waits for the device here only
            waited = feed.take_wait()
            clock.add("data_wait", waited)
            records = monitor.flush(waited)
            if sink is not None:
                sink.write(records)
        if checkpoint_now:
            with clock.phase("checkpoint_save"):
                checkpointer.save(step)
                if sink is not None:
                    sink.publish()
            clock.settle_loop()
            if worker.is_main:  # the work up to here survives a failure
                with clock.phase("checkpoint_save"):
                    write_snapshot(out, clock.snapshot(attempt, step))
            monitor.restart_window()
    clock.settle_loop()

    finetune = job.task if isinstance(job.task, FinetuneTask) else None
    with clock.phase("checkpoint_save"):  # the handoff: the stage's final weights
        weights = gather_full_state(engine, keep=worker.is_main or finetune is not None)
        if sink is not None:
            sink.publish()
            sink.close()
        if job.telemetry.ledger:
            _write_ledger(out, worker, state)
    if finetune is not None:
        with clock.phase("evaluation"):
            _evaluate(job, finetune, weights, worker, out, dtype)
    with clock.phase("checkpoint_save"):
        if worker.is_main:
            save_handoff(out, job.model, weights, {"step": str(step)})
        dist.barrier()
    shutil.rmtree(staging / f"rank{worker.rank}", ignore_errors=True)  # this node's scratch (S3 runs)
    if worker.is_main:
        write_snapshot(out, clock.snapshot(attempt, step, final=True))


def _make_loader(job: TrainJob, worker: WorkerContext, geometry: StepGeometry) -> ShardLoader:
    return ShardLoader(open_storage(job.data.uri, job.output.storage), job.data.shards, job.data.order(job.seed),
                       global_batch=geometry.global_batch, micro_batch=geometry.micro_batch,
                       image_size=job.model.image_size, world_size=worker.world_size, rank=worker.rank,
                       num_workers=job.data.loader_workers, crop_scale=job.data.crop_scale, hflip=job.data.hflip,
                       pin_memory=worker.device.type == "cuda", class_names=job.data.class_names or None)


def _write_ledger(out: Storage, worker: WorkerContext, state: TrainState) -> None:
    """This rank's sample ledger; rank 0 also drops those of ranks a larger group had before a
    resize (their entries live on in this group's ledgers: ``checkpointer.inherited_ranks``)."""
    out.write_text(f"{LEDGER_DIR}/rank{worker.rank}.json", json.dumps(state.ledger))
    if worker.is_main:
        for obj in out.list(f"{LEDGER_DIR}/"):
            if int(Path(obj.path).stem.removeprefix("rank")) >= worker.world_size:
                out.delete(obj.path)


def _record_attempt(out: Storage, worker: WorkerContext, resumed_from: int) -> int:
    """A line per start of the worker group (first start, and every restart after a fault), so that
    restarts and the step each resumed from can be read back (``vitpipe status``, tests); returns
    this attempt's number (0-based)."""
    earlier = attempts_recorded(out)
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "world_size": worker.world_size,
              "resumed_from": resumed_from}
    out.append_text(ATTEMPTS_FILE, json.dumps(record) + "\n")
    return earlier


def attempts_recorded(out: Storage) -> int:
    """How many times a worker group has started training this stage (all runs of it)."""
    return len(out.read_text(ATTEMPTS_FILE).splitlines()) if out.exists(ATTEMPTS_FILE) else 0


def _record_placement(out: Storage, worker: WorkerContext) -> None:
    """Where each rank runs (node, pid): recorded so placement is auditable (one worker per node)."""
    placement: list[Any] = [None] * worker.world_size
    dist.all_gather_object(placement, {"rank": worker.rank, "node_id": worker.node, "pid": os.getpid(),
                                       "device": str(worker.device)})
    if worker.is_main:
        out.write_text(WORKERS_FILE, json.dumps(placement, indent=2))


def _evaluate(job: TrainJob, task: FinetuneTask, weights: dict[str, torch.Tensor] | None, worker: WorkerContext,
              out: Storage, dtype: torch.dtype) -> None:
    assert weights is not None, "every rank keeps the weights before an evaluation"
    model = ViT(job.model)
    model.load_state_dict(weights)
    model.to(worker.device, dtype)
    result = evaluate(model, open_storage(job.data.uri, job.output.storage), task.evaluation,
                      job.batch.micro_batch, dtype, worker, class_names=job.data.class_names or None)
    if worker.is_main:
        out.write_text(EVAL_FILE, result.model_dump_json(indent=2))
        log.info("%s: top-1 %.4f on %d %s samples (%d skipped)", job.label, result.top1 or 0.0, result.total,
                 result.split, result.skipped)


def ray_train_entry(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: ``config["job"]`` is the :class:`TrainJob`."""
    import ray
    import ray.train.torch

    clock = PhaseClock()  # the attempt's set-up counts from here
    configure_logging()
    job: TrainJob = config["job"]
    out = open_storage(job.output.uri, job.output.storage)
    if out.exists(STOPPED_FILE):
        return  # an earlier attempt of this group met an error that would only recur: do not run again
    device = ray.train.torch.get_device() if job.distributed.use_gpu else torch.device("cpu")
    try:
        train(job, current_worker(device, ray.get_runtime_context().get_node_id()), clock)
    except DeterministicError as err:
        # Ray Train retries any worker failure (``max_failures``); this one would fail every retry
        # alike. Record it (the first rank to get here wins) and end the worker normally; the
        # stage reads the record and fails at once with the error's one line.
        out.put_if_absent(STOPPED_FILE, json.dumps({"error": str(err)}).encode())
        log.error("%s: %s (not retried: it would happen again)", job.label, err)
