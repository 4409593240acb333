"""GPU check of the trainer: its real step, checkpointer and loader under ``torchrun`` with NCCL.

Run by ``bench/gpu_check.sh`` (which installs what is missing and runs the other phases), or by
hand on one node::

    python3 -m torch.distributed.run --standalone --nproc-per-node=NUM_GPUS bench/gpu_check.py
    python3 -m torch.distributed.run --standalone --nproc-per-node=2 bench/gpu_check.py --device cpu

No Ray: every rank calls ``stages.train.loop.train`` itself in the default process group
``torchrun`` set up. What it does:

1. Rank 0 makes synthetic, learnable JPEG shards (``bench/synthetic_shards.py``; cached in the work
   folder) before the process group exists, so its forked writer processes start from a process
   with no communication threads.
2. For each ZeRO stage (default 1 and 3) a ``TrainJob`` (default ViT-B/16 at 224 px, bf16, AdamW
   with a short warmup, global batch 128 x world) trains for ``--steps`` steps with a checkpoint
   every ``--checkpoint-every`` steps, and these are checked:

   - the loss falls: the mean loss of the last 10% of the steps is at most ``--loss-ratio`` (0.5)
     times the mean of the first 10% (at least one step each);
   - a save/restore round trip resumes: the newest checkpoint, the handoff, the sample ledgers and
     the newer metrics are deleted, as a crash after the previous checkpoint would leave the stage
     folder, and the same job is trained again. It must resume from that previous checkpoint (the
     restored history is the first run's, record for record, timings included: a run that started
     afresh would have measured other timings), its history must number the steps 1..N with no gap
     or repeat, every rank must have consumed exactly the same sample keys in the same order, and
     the resumed steps' losses must match the first run's: the first resumed step to within
     ``--resume-rtol`` (relative), all resumed steps to within ``--resume-drift`` (mean absolute
     difference over mean loss). On CUDA the defaults are 1% and 5%, since bf16 GPU kernels (the
     attention backward's atomics, cuBLAS's split-K choices) need not be bitwise deterministic and
     differences compound over the resumed steps; on the CPU both are 0: the losses are exact.

   It records images/s, MFU (the card's dense bf16 peak from ``stages.train.hardware.ACCELERATORS``,
   found by ``torch.cuda.get_device_name()``, or ``--peak-tflops``), the data-wait fraction and the
   step time as medians over the first run's timed windows (the metrics' sync steps) except the first
   (warm-up), and the peak GPU memory.

Rank 0 prints one JSON line per ZeRO stage and writes ``OUT/gpu_check_train.json`` (rewritten after
each stage, ``complete: true`` at the end). A failed check exits non-zero on every rank after the
stages have run, with one line naming it; the JSON's ``reason`` holds the same line.

``--phase ray`` (plain ``python3``, no torchrun; the shell runs it only when Ray is importable) runs
the ``pretrain`` stage through Ray Train instead: a two-stage config (``ingest`` of the same shards
as a ``webdataset`` source without re-validating the images, then ``pretrain`` with one Ray Train
worker per GPU) written to ``OUT/gpu_check_ray.yaml`` and run with ``vitpipe run``; its result goes
to ``OUT/gpu_check_ray.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import socket
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from synthetic_shards import ShardSet, ShardSpec, ensure_shards, load_shards

from pipeline.storage import LocalStorage
from stages.model.vit import ViTConfig, count_params, decode_variant, flops_per_image
from stages.train.checkpoint import CheckpointStore, step_name
from stages.train.geometry import BatchGeometry
from stages.train.hardware import ACCELERATORS
from stages.train.job import (
    CheckpointPolicy,
    DataSpec,
    DistributedSpec,
    OptimizerSpec,
    OutputSpec,
    ScheduleSpec,
    TelemetrySpec,
    TrainJob,
)
from stages.train.metrics import METRICS_FILE, StepRecord, history_lines, read_history

__all__ = ["PROFILES", "parse_args", "card_peak_flops", "loss_check", "resume_check", "throughput_summary",
           "build_job", "ray_config", "main"]

log = logging.getLogger("gpu_check")

BENCH = Path(__file__).resolve().parent
LOSS_WINDOW = 0.1  # the loss rule compares the means of the first and the last 10% of the steps

# Defaults per device. cuda: the check itself; cpu: a tiny smoke run of the same code (gloo).
PROFILES: dict[str, dict[str, Any]] = {
    "cuda": {"model": "B/16", "width": None, "depth": None, "heads": None, "mlp_dim": None, "image_size": 224,
             "classes": 10, "images": 12800, "shard_samples": 128, "steps": 200, "checkpoint_every": 50,
             "warmup_steps": 20, "batch_per_rank": 128, "lr": 3e-4, "log_every": 10, "precision": "bf16",
             "resume_rtol": 0.01, "resume_drift": 0.05, "ray_steps": 50},
    "cpu": {"model": "Ti/8", "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "image_size": 32,
            "classes": 4, "images": 256, "shard_samples": 16, "steps": 12, "checkpoint_every": 4,
            "warmup_steps": 2, "batch_per_rank": 8, "lr": 1e-2, "log_every": 2, "precision": "fp32",
            "resume_rtol": 0.0, "resume_drift": 0.0, "ray_steps": 8},
}
# --quick on a GPU: the same checks in about a third of the time.
QUICK = {"images": 3200, "steps": 60, "checkpoint_every": 20, "warmup_steps": 6, "ray_steps": 20}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu, cpu = PROFILES["cuda"], PROFILES["cpu"]

    def both(key: str) -> str:
        def shown(value: Any) -> str:
            return "the variant's" if value is None else str(value)

        return f"(default: {shown(gpu[key])} on cuda, {shown(cpu[key])} on cpu)"

    parser.add_argument("--phase", choices=("train", "ray"), default="train",
                        help="train: the torchrun check (default); ray: the pretrain stage through Ray Train")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (NCCL, one GPU per rank) or cpu (gloo: a tiny smoke run) (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=BENCH / "out",
                        help="where the result JSON goes (default: bench/out)")
    parser.add_argument("--work", type=Path, default=None,
                        help="shards (cached) and training folders (default: OUT/gpu_check_work)")
    parser.add_argument("--quick", action="store_true",
                        help=f"on cuda, fewer images and steps: {', '.join(f'{k} {v}' for k, v in QUICK.items())} "
                             "(the cpu profile is tiny already)")
    parser.add_argument("--model", help=f"ViT variant SIZE/PATCH {both('model')}")
    for name in ("width", "depth", "heads", "mlp_dim"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override the variant's {name} {both(name)}")
    parser.add_argument("--image-size", type=int, help=f"training resolution {both('image_size')}")
    parser.add_argument("--classes", type=int, help=f"synthetic classes {both('classes')}")
    parser.add_argument("--images", type=int, help=f"synthetic images {both('images')}")
    parser.add_argument("--shard-samples", type=int, help=f"images per shard {both('shard_samples')}")
    parser.add_argument("--steps", type=int, help=f"optimizer steps of the first run {both('steps')}")
    parser.add_argument("--checkpoint-every", type=int,
                        help=f"steps between checkpoints; the resumed run redoes the last interval {both('checkpoint_every')}")
    parser.add_argument("--warmup-steps", type=int, help=f"linear LR warmup {both('warmup_steps')}")
    parser.add_argument("--global-batch", type=int, help="images per optimizer step (default: 128 x world on cuda, "
                                                         "8 x world on cpu)")
    parser.add_argument("--micro-batch", type=int, help="images per rank per micro-step (default: global / world)")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (AdamW, weight decay 0.05) {both('lr')}")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help=f"{both('precision')}")
    parser.add_argument("--log-every", type=int, help=f"steps per metrics window {both('log_every')}")
    parser.add_argument("--zero-stages", default="1,3", help="ZeRO stages to check, in order (default: %(default)s)")
    parser.add_argument("--loader-workers", type=int,
                        help="DataLoader processes per rank (default on cuda: CPUs / ranks - 2, at most 12; on cpu: 0)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the card's dense bf16 peak in TFLOP/s, for MFU (default: from the accelerator table by "
                             "the card's name; no MFU for an unknown card)")
    parser.add_argument("--loss-ratio", type=float, default=0.5,
                        help="the last 10%% of steps' mean loss must be at most this times the first 10%%'s "
                             "(default: %(default)s)")
    parser.add_argument("--resume-rtol", type=float, help=f"first resumed step's loss: relative tolerance {both('resume_rtol')}")
    parser.add_argument("--resume-drift", type=float,
                        help=f"resumed steps: mean |loss difference| / mean loss at most this {both('resume_drift')}")
    parser.add_argument("--ray-steps", type=int, help=f"--phase ray: pretrain steps {both('ray_steps')}")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each stage's checkpoints (by default they are deleted once checked: ~1.2 GB "
                             "each for B/16)")
    parser.add_argument("--seed", type=int, default=0, help="model, data order and images (default: %(default)s)")
    args = parser.parse_args(argv)

    profile = dict(PROFILES[args.device])
    if args.quick and args.device == "cuda":
        profile.update(QUICK)
    if args.model is not None:  # a variant named on the command line is taken whole
        profile.update(width=None, depth=None, heads=None, mlp_dim=None)
    if args.steps is not None:  # a shorter run keeps four checkpoint intervals and a 10% warmup
        profile["checkpoint_every"] = max(1, min(profile["checkpoint_every"], args.steps // 4))
        profile["warmup_steps"] = min(profile["warmup_steps"], args.steps // 10)
    for key, value in profile.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.work = args.work or args.out / "gpu_check_work"
    try:
        args.zero_stages = [int(s) for s in args.zero_stages.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--zero-stages must be comma-separated integers, got {args.zero_stages!r}")
    if not args.zero_stages or any(s not in (0, 1, 2, 3) for s in args.zero_stages):
        parser.error(f"--zero-stages must name stages among 0, 1, 2, 3, got {args.zero_stages}")
    for name in ("steps", "checkpoint_every", "images", "shard_samples", "classes", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps <= args.checkpoint_every:
        parser.error(f"--steps ({args.steps}) must exceed --checkpoint-every ({args.checkpoint_every}): the resume "
                     "check needs two checkpoints")
    if args.warmup_steps > args.steps:
        parser.error("--warmup-steps must not exceed --steps")
    if not 0 < args.loss_ratio <= 1:
        parser.error("--loss-ratio must be in (0, 1]")
    return args


# --- pure pieces ------------------------------------------------------------------------------------------


def card_peak_flops(card: str, override_tflops: float | None = None) -> float | None:
    """The dense bf16 peak FLOP/s of a card named like ``torch.cuda.get_device_name()`` (None: unknown)."""
    if override_tflops:
        return override_tflops * 1e12
    lowered = card.lower()
    for key in ("h200", "h100", "a100"):  # "H200" before "H100": neither name contains the other
        if key in lowered:
            return ACCELERATORS[key].peak_flops
    return None


def _window(n: int) -> int:
    return max(1, math.ceil(LOSS_WINDOW * n))


def loss_check(losses: list[float], ratio: float) -> dict[str, Any]:
    """The loss rule: mean of the last 10% of steps <= ``ratio`` x mean of the first 10%."""
    k = _window(len(losses))
    first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
    return {"first_mean": round(first, 5), "last_mean": round(last, 5), "window_steps": k,
            "ratio": round(last / first, 5) if first else None, "max_ratio": ratio,
            "passed": bool(first > 0 and last <= ratio * first)}


def resume_check(first: list[StepRecord], resumed: list[StepRecord], resumed_from: int, rtol: float,
                 drift: float) -> dict[str, Any]:
    """Compare a resumed run's history with the uninterrupted one (see the module docstring)."""
    steps = [r.step for r in resumed]
    expected = list(range(1, len(first) + 1))
    restored = resumed[:resumed_from] == first[:resumed_from]
    a = [r.loss for r in first[resumed_from:]]
    b = [r.loss for r in resumed[resumed_from:resumed_from + len(a)]]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    complete = steps == expected and len(b) == len(a) > 0
    first_rel = diffs[0] / abs(a[0]) if complete and a[0] else None
    mean_rel = statistics.fmean(diffs) / statistics.fmean(abs(x) for x in a) if complete else None
    failures = []
    if steps != expected:
        failures.append(f"the resumed history numbers steps {_ranges(steps)}, expected 1-{len(first)}")
    if not restored:
        failures.append(f"the history up to step {resumed_from} was not restored from the checkpoint "
                        "(did the run start afresh?)")
    if first_rel is not None and first_rel > rtol:
        failures.append(f"the first resumed step's loss differs by {first_rel:.3g} (relative; tolerance {rtol:g})")
    if mean_rel is not None and mean_rel > drift:
        failures.append(f"the resumed steps' losses differ by {mean_rel:.3g} on average (relative; tolerance {drift:g})")
    return {"resumed_from": resumed_from, "resumed_steps": len(b), "steps_continuous": steps == expected,
            "history_restored": restored, "first_step_rel_diff": first_rel, "mean_rel_diff": mean_rel,
            "max_abs_diff": max(diffs) if diffs else None, "rtol": rtol, "drift": drift,
            "passed": not failures, "failures": failures}


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7, 8] -> "1-3, 7-8"."""
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in runs) or "none"


def throughput_summary(history: list[StepRecord]) -> dict[str, Any]:
    """Medians over the timed windows (sync steps) except the first, which includes the warm-up."""
    windows = [r for r in history if r.images_per_s is not None]
    timed = windows[1:] or windows

    def median(key: str) -> float | None:
        values = [getattr(r, key) for r in timed if getattr(r, key) is not None]
        return round(statistics.median(values), 4) if values else None

    memory = [r.max_memory_gb for r in windows if r.max_memory_gb is not None]
    return {"images_per_s": median("images_per_s"), "step_time_s": median("step_time_s"),
            "mfu": median("mfu"), "data_wait_fraction": median("data_wait_fraction"),
            "max_memory_gb": round(max(memory), 3) if memory else None,
            "windows": len(timed), "warmup_excluded": len(windows) > 1}


# --- the training check ----------------------------------------------------------------------------------


def model_config(args: argparse.Namespace) -> ViTConfig:
    overrides = {k: getattr(args, k) for k in ("width", "depth", "heads", "mlp_dim") if getattr(args, k)}
    return decode_variant(args.model, image_size=args.image_size, num_classes=args.classes, **overrides)


def shard_spec(args: argparse.Namespace) -> ShardSpec:
    # Stored a little larger than the training size (256 for 224), as a resize-256 preprocessing would.
    return ShardSpec(images=args.images, classes=args.classes, image_size=args.image_size * 8 // 7,
                     shard_samples=args.shard_samples, seed=args.seed)


def default_loader_workers(device: str, world: int, shards: int) -> int:
    """A power of two (each reads one stream of the order, and the streams must divide the batch),
    at most 8 per GPU and what the CPUs allow beside the training processes."""
    if device == "cpu":
        return 0
    cpus = os.cpu_count() or 1
    workers = 1
    while workers * 2 <= min(8, cpus // world - 2):
        workers *= 2
    return workers


def streams_for(world: int, loader_workers: int) -> int:
    """One stream of the sample order per loader worker of every rank."""
    return world * max(1, loader_workers)


def build_job(args: argparse.Namespace, zero_stage: int, shards: ShardSet, world: int,
              peak: float | None) -> TrainJob:
    """The ``TrainJob`` of one ZeRO stage's check."""
    global_batch = args.global_batch or args.batch_per_rank * world
    micro = args.micro_batch or global_batch // world
    workers = args.loader_workers if args.loader_workers is not None else \
        default_loader_workers(args.device, world, len(shards.shards))
    stage_dir = args.work / f"zero{zero_stage}"
    return TrainJob(
        label=f"gpu-check-zero{zero_stage}", seed=args.seed, model=model_config(args),
        optimizer=OptimizerSpec("adamw", args.lr, weight_decay=0.05),
        schedule=ScheduleSpec(args.steps, args.warmup_steps, "linear"),
        batch=BatchGeometry(global_batch, micro),
        # Crops keep >= 35% of the image; no flips: they would mirror a class's stripe angle.
        data=DataSpec(str(shards.root.parent), shards.shards, (0.35, 1.0), False, workers,
                      streams=streams_for(world, workers)),
        distributed=DistributedSpec(zero_stage, args.precision, use_gpu=args.device == "cuda", peak_flops=peak),
        checkpoints=CheckpointPolicy(args.checkpoint_every, keep=2),
        output=OutputSpec(str(stage_dir), staging=str(args.work / f"staging-zero{zero_stage}")),
        # The ledger records every sample key each rank consumes: the exact-resume check compares them.
        telemetry=TelemetrySpec(args.log_every, tensorboard=False, show_progress=False, ledger=True),
    )


def _ledgers(stage_dir: Path, world: int) -> list[Any]:
    return [json.loads((stage_dir / "ledger" / f"rank{r}.json").read_text()) for r in range(world)]


def simulate_crash(stage_dir: Path, keep_step: int) -> None:
    """Leave the stage folder as a kill after the checkpoint of ``keep_step`` would: newer checkpoints,
    the handoff and the ledgers (written at the end) gone, the metrics as published at that checkpoint."""
    store = CheckpointStore(LocalStorage(stage_dir), stage_dir / "unused-staging")
    for step in store.steps():
        if step > keep_step:
            shutil.rmtree(stage_dir / "checkpoints" / step_name(step))
    for name in ("model.safetensors", "model_config.json"):
        (stage_dir / name).unlink(missing_ok=True)
    shutil.rmtree(stage_dir / "ledger", ignore_errors=True)
    history = read_history(LocalStorage(stage_dir))
    (stage_dir / METRICS_FILE).write_text(history_lines([r for r in history if r.step <= keep_step]))


def _release_memory(device: torch.device) -> None:
    gc.collect()  # the previous engine and its optimizer states
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def check_stage(args: argparse.Namespace, zero_stage: int, shards: ShardSet, worker: Any,
                peak: float | None) -> dict[str, Any]:
    """Train, crash, resume and check one ZeRO stage (every rank calls it; rank 0 judges)."""
    from stages.train.loop import train

    job = build_job(args, zero_stage, shards, worker.world_size, peak)
    stage_dir = Path(job.output.uri)
    if worker.is_main:  # a fresh start: train() would resume from an earlier check's checkpoints
        shutil.rmtree(stage_dir, ignore_errors=True)
        shutil.rmtree(job.output.staging, ignore_errors=True)
    dist.barrier()
    _release_memory(worker.device)
    geometry = job.batch.resolve(worker.world_size)
    log.info("ZeRO-%d: %d steps of %d images (%d per rank per micro-step, accumulation %d), %s, %d loader "
             "worker(s) per rank", zero_stage, args.steps, geometry.global_batch, geometry.micro_batch,
             geometry.accumulation, args.precision, job.data.loader_workers)

    started = time.perf_counter()
    train(job, worker)
    first_seconds = time.perf_counter() - started
    verdict: dict[str, Any] = {}
    if worker.is_main:
        first = read_history(LocalStorage(stage_dir))
        ledgers = _ledgers(stage_dir, worker.world_size)
        steps = CheckpointStore(LocalStorage(stage_dir), stage_dir).steps()
        resume_from = steps[-2] if len(steps) >= 2 else 0
        simulate_crash(stage_dir, resume_from)
        verdict = {"first": first, "ledgers": ledgers, "resume_from": resume_from}
        log.info("ZeRO-%d: first run %.1f s; deleted the step-%d checkpoint and the handoff, resuming from step %d",
                 zero_stage, first_seconds, steps[-1] if steps else 0, resume_from)
    dist.barrier()

    started = time.perf_counter()
    train(job, worker)
    resumed_seconds = time.perf_counter() - started
    result: dict[str, Any] = {}
    if worker.is_main:
        resumed = read_history(LocalStorage(stage_dir))
        resume = resume_check(verdict["first"], resumed, verdict["resume_from"], args.resume_rtol, args.resume_drift)
        ledger_same = _ledgers(stage_dir, worker.world_size) == verdict["ledgers"]
        resume["ledgers_identical"] = ledger_same
        if not ledger_same:
            resume["failures"].append("the resumed run consumed other samples than the uninterrupted one")
        handoff = (stage_dir / "model.safetensors").is_file()
        resume["handoff_written"] = handoff
        if not handoff:
            resume["failures"].append("the resumed run wrote no model.safetensors")
        resume["passed"] = not resume["failures"]
        loss = loss_check([r.loss for r in verdict["first"]], args.loss_ratio)
        failures = [f"resume: {f}" for f in resume["failures"]]
        if not loss["passed"]:
            failures.insert(0, f"the loss did not fall enough: mean {loss['first_mean']:.4g} over the first "
                               f"{loss['window_steps']} step(s), {loss['last_mean']:.4g} over the last (ratio "
                               f"{loss['ratio']}, at most {args.loss_ratio} required)")
        result = {
            "zero_stage": zero_stage, "passed": not failures, "failures": failures,
            "steps": args.steps, "checkpoint_every": args.checkpoint_every, "global_batch": geometry.global_batch,
            "micro_batch": geometry.micro_batch, "accumulation": geometry.accumulation,
            "world_size": worker.world_size, "precision": args.precision, "loader_workers": job.data.loader_workers,
            "loss": loss, "resume": resume, "throughput": throughput_summary(verdict["first"]),
            "epochs": verdict["first"][-1].epoch + 1,
            "seconds": {"first_run": round(first_seconds, 1), "resumed_run": round(resumed_seconds, 1)},
        }
        if not args.keep_checkpoints:
            shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(job.output.staging, ignore_errors=True)
    return result


def webdataset_reads(shards: ShardSet) -> bool | None:
    """Whether plain ``webdataset`` reads the first shard's samples as ours does (None: not installed)."""
    try:
        import webdataset
    except ImportError:
        return None
    first = shards.shards[0]
    path = shards.root.parent / first.path
    # One shard read in this process: no split over the torchrun ranks webdataset would otherwise ask for.
    samples = list(webdataset.WebDataset(str(path), shardshuffle=False, nodesplitter=lambda urls: urls))
    return len(samples) == first.samples and all({"jpg", "cls"} <= set(s) for s in samples)


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {"python": sys.version.split()[0], "torch": torch.__version__,
                                    "cuda": torch.version.cuda}
    for dist_name in ("deepspeed", "pydantic", "numpy", "pillow"):
        try:
            found[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            found[dist_name] = None
    return found


def train_phase(args: argparse.Namespace) -> int:
    # Plain `python3 bench/gpu_check.py`: a one-rank world, as torchrun would describe it.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = _free_port()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("error: torch.cuda.is_available() is False (torch %s); use --device cpu for a smoke run",
                  torch.__version__)
        return 2
    main_rank = rank == 0
    out_file = args.out / "gpu_check_train.json"
    shards = None
    if main_rank:
        out_file.unlink(missing_ok=True)  # a result left by an earlier run must not pass for this one's
        shards = ensure_shards(args.work / "shards", shard_spec(args))  # before the process group: forked writers
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Every rank waits here until rank 0 has made the shards (it joins the group afterwards).
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)  # bound to its GPU: NCCL connects eagerly
    else:
        dist.init_process_group("gloo")
    from stages.train.context import current_worker

    worker = current_worker(device)
    if shards is None:
        shards = load_shards(args.work / "shards", shard_spec(args))  # the set rank 0 made
        if shards is None:
            raise RuntimeError(f"rank {rank} finds no complete shard set in {args.work / 'shards'}: gpu_check "
                               "runs on one node (its ranks share the work folder)")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = card_peak_flops(card, args.peak_tflops) if device.type == "cuda" else None
    cfg = model_config(args)
    doc: dict[str, Any] = {
        "name": "gpu_check_train", "complete": False, "passed": False, "reason": None,
        "device": args.device, "card": card, "world_size": world, "peak_flops": peak,
        "model": args.model, "model_config": cfg.to_dict(), "params": count_params(cfg),
        "train_tflop_per_image": flops_per_image(cfg, training=True) / 1e12, "image_size": args.image_size,
        "shards": {"root": str(shards.root), "count": len(shards.shards), "images": args.images,
                   "classes": args.classes, "mb": round(shards.bytes / 1e6, 1), "seconds": round(shards.seconds, 1),
                   "cached": shards.cached},
        "versions": _versions(), "stages": [],
    }
    if main_rank:
        doc["shards"]["plain_webdataset_reads"] = webdataset_reads(shards)
        if doc["shards"]["plain_webdataset_reads"] is False:
            raise RuntimeError(f"plain webdataset does not read {shards.shards[0].path} as vitpipe's loader does")
    if main_rank:
        if device.type == "cuda" and peak is None:
            log.warning("unknown card %r: no MFU (pass --peak-tflops)", card)
        log.info("on %d x %s: ViT-%s (%s params) at %d px, ZeRO stages %s", world, card, args.model,
                 f"{count_params(cfg):,}", args.image_size, args.zero_stages)
    if main_rank:
        _write_json(out_file, doc)
    failures: list[str] = []
    for stage in args.zero_stages:
        result = check_stage(args, stage, shards, worker, peak)
        if main_rank:
            doc["stages"].append(result)
            failures += [f"ZeRO-{stage}: {f}" for f in result["failures"]]
            doc["reason"] = "; ".join(failures) or None
            _write_json(out_file, doc)
            print(json.dumps(result), flush=True)
    if main_rank:
        from corpus import machine_info

        doc.update(complete=True, passed=not failures, machine=machine_info(None))
        _write_json(out_file, doc)
    verdict = [doc["reason"] if main_rank else None]
    dist.broadcast_object_list(verdict, src=0)  # every rank exits alike
    dist.destroy_process_group()
    if verdict[0]:
        if not main_rank:
            return 0  # rank 0 reports and fails: were this rank to exit 1 first, torchrun would kill rank 0 mid-report
        log.error("FAILED: %s", verdict[0])
        return 1
    if main_rank:
        log.info("passed: every trainer check (%s)", out_file)
    return 0


# --- the Ray Train phase -----------------------------------------------------------------------------------


def ray_config(args: argparse.Namespace, shards: ShardSet, gpus: int, card: str, run_dir: Path) -> dict[str, Any]:
    """A two-stage run config: ``ingest`` of the synthetic shards, ``pretrain`` on one worker per GPU."""
    cuda = args.device == "cuda"
    workers = gpus if cuda else 2
    gpu_key = next((k for k in ("h200", "h100", "a100") if k in card.lower()), "h100")
    model = {"model": args.model, **{k: getattr(args, k) for k in ("width", "depth", "heads", "mlp_dim")
                                     if getattr(args, k)}}
    loader_workers = args.loader_workers if args.loader_workers is not None else \
        default_loader_workers(args.device, workers, len(shards.shards))
    pretrain = {
        **model, "image_size": args.image_size, "steps": args.ray_steps,
        "warmup_steps": max(1, args.ray_steps // 10), "global_batch": args.batch_per_rank * workers,
        "micro_batch": args.batch_per_rank, "lr": args.lr, "weight_decay": 0.05, "crop_scale_min": 0.35,
        "hflip": False, "workers": workers, "use_gpu": cuda, "gpu": gpu_key, "precision": args.precision,
        "zero_stage": 1, "loader_workers": loader_workers, "streams": streams_for(workers, loader_workers),
        "checkpoint_every": args.ray_steps,
        "log_every": args.log_every, "tensorboard": False,
    }
    return {
        "name": "gpu-check-ray",
        "description": "bench/gpu_check.py --phase ray: the pretrain stage through Ray Train",
        "seed": args.seed, "run_dir": str(run_dir),
        "ray": {"num_gpus": gpus if cuda else 0, "include_dashboard": False},
        "stages": {
            "ingest": {"type": "ingest", "params": {"source": "webdataset", "path": str(shards.root),
                                                    "shard_samples": args.shard_samples, "validate": "none",
                                                    "workers": 4}},
            "pretrain": {"type": "pretrain", "inputs": {"data": "ingest"}, "params": pretrain},
        },
    }


def ray_phase(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.cli import main as vitpipe

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        log.error("error: torch.cuda.is_available() is False; use --device cpu")
        return 2
    shards = ensure_shards(args.work / "shards", shard_spec(args))
    gpus = torch.cuda.device_count() if cuda else 0
    card = torch.cuda.get_device_name() if cuda else "cpu"
    run_dir = args.work / "ray_run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a finished run would be skipped as up to date
    config = ray_config(args, shards, gpus, card, run_dir)
    config_path = args.out / "gpu_check_ray.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log.info("running %s through Ray Train (%d worker(s))", config_path, config["stages"]["pretrain"]["params"]["workers"])
    started = time.perf_counter()
    rc = vitpipe(["run", str(config_path)])
    seconds = time.perf_counter() - started
    stage = run_dir / "stages" / "pretrain"
    history = read_history(LocalStorage(stage)) if stage.exists() else []
    failures = []
    if rc != 0:
        failures.append(f"vitpipe run exited with {rc}")
    elif [r.step for r in history] != list(range(1, args.ray_steps + 1)):
        failures.append(f"the pretrain history has {len(history)} step(s), expected {args.ray_steps}")
    elif not (stage / "model.safetensors").is_file():
        failures.append("the pretrain stage wrote no model.safetensors")
    doc = {"name": "gpu_check_ray", "passed": not failures, "reason": "; ".join(failures) or None,
           "config": str(config_path), "run_dir": str(run_dir), "card": card, "workers": gpus if cuda else 2,
           "steps": len(history), "seconds": round(seconds, 1),
           "loss": loss_check([r.loss for r in history], 1.0) if history else None,
           "throughput": throughput_summary(history)}
    _write_json(args.out / "gpu_check_ray.json", doc)
    print(json.dumps(doc), flush=True)
    if failures:
        log.error("FAILED: Ray Train: %s", doc["reason"])
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # DeepSpeed 0.19.8 calls the collectives torch renamed, which warns at every call: at every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    try:
        return ray_phase(args) if args.phase == "ray" else train_phase(args)
    except Exception as err:  # noqa: BLE001 - one line for the shell's summary, then the traceback
        reason = f"{type(err).__name__}: {' '.join(str(err).split())}"[:400]
        log.exception("FAILED: %s", reason)
        if rank == 0 and args.phase == "train":
            path = args.out / "gpu_check_train.json"
            doc = json.loads(path.read_text()) if path.exists() else {"name": "gpu_check_train", "stages": []}
            doc.update(complete=False, passed=False, reason=reason)
            _write_json(path, doc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
