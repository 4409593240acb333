"""Benchmark: our pretraining step (DeepSpeed ZeRO-2, one worker) vs. a plain PyTorch loop, on CPU.

Both train the same ViT (default ViT-Ti/16 at 224 px, 1000 classes), built from the same seed, on
the same fixed batch of random images and labels (the data path is ``bench/loader.py``'s subject;
here only forward + backward + optimizer step is timed), with the same torch thread count:

- ours: the trainer's own pieces, called as the training loop calls them: the engine from
  ``stages.train.engine.build_engine`` (``ViT`` wrapped by ``deepspeed.initialize`` with AdamW over
  ``param_groups``, the model's decay split, and the DeepSpeed config the workers build: ZeRO-2,
  fp32, clipping at 1.0, no accumulation), on a single-rank gloo process group as Ray Train sets
  up on CPU; a step is ``set_lr`` + ``stages.train.step.train_step`` (forward, cross-entropy,
  ``engine.backward``, ``engine.step``, the loss kept on the device), then ``loss.item()`` to end
  the step (the loop reads it only at log steps; here every step, like the baseline).
- baseline: the same model and ``torch.optim.AdamW`` over the same groups in a hand-written loop:
  set the LR, ``zero_grad``, forward, cross-entropy, ``backward``, ``clip_grad_norm_(1.0)``,
  ``step``, ``loss.item()``.

Both loops first take the same untimed warm-up steps from identical weights and the losses are
compared (the first one is ln(classes) for both, as the head is zero-initialised; the later ones
check that the two updates agree). Then rounds alternate the loops (baseline first in even rounds,
ours first in odd ones) so drifts in machine speed hit both alike; each round times ``--steps``
steps of each (default: one, so the two loops alternate step by step, seconds apart). Reported:
median step time and images/s of each loop, and the main ratio ours / baseline of median step
times (goal from the issue: <= 1.05). Also reported: the share of the CPUs that other processes
used during the timed rounds (on a shared 2-core machine, the figures mean little when it is high).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from corpus import _cpu_jiffies, cpu_busy_before_start, emit_result, free_port, log, machine_info

from stages.model.vit import ViT, ViTConfig, count_params, decode_variant, flops_per_image
from stages.train.context import current_worker
from stages.train.engine import build_engine, param_groups, set_lr
from stages.train.geometry import BatchGeometry
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
from stages.train.step import Batch, train_step

GOAL = 1.05  # ours / baseline step time
# The pretrain stage's defaults (PretrainParams): AdamW betas, weight decay, peak LR, clipping.
BETAS, WEIGHT_DECAY, LR, GRAD_CLIP = (0.9, 0.999), 0.1, 8e-4, 1.0
LOSS_RTOL = 1e-4  # fp32 on both sides: the updates differ only in summation order

Step = Callable[[], float]  # one training step; returns the loss


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Ti/16",
                        help="ViT variant SIZE/PATCH, e.g. Ti/16, S/16, Ti/32 (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="input resolution (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=1000, help="head size (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=32,
                        help="images per step, the pretrain stage's default micro-batch (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1,
                        help="timed steps of each loop per round (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=16,
                        help="rounds; each times both loops, in alternating order (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps of each loop first, whose losses are compared (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads, the same for both loops (default: torch's, %(default)s here)")
    parser.add_argument("--seed", type=int, default=0, help="model-init and batch seed (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny smoke run (64 px, batch 4, 2 warm-up steps, 1 round of 2 steps)")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.batch, args.warmup, args.repeats, args.steps = 64, 4, 2, 1, 2
    for name in ("batch", "steps", "repeats", "warmup", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def init_single_rank() -> None:
    """A one-process gloo group, as Ray Train's TorchConfig(backend="gloo") gives each CPU worker.
    The environment must be set before deepspeed is imported: its accelerator is chosen at import."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    # Forced (not setdefault): this is a CPU benchmark, and the baseline runs on the CPU too.
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1)


def build_model(cfg: ViTConfig, seed: int) -> ViT:
    torch.manual_seed(seed)  # build_engine seeds right before building the model too
    return ViT(cfg).train()


def deepspeed_step(cfg: ViTConfig, seed: int, images: torch.Tensor, labels: torch.Tensor) -> Step:
    """Our step: the trainer's engine builder and step function, on a job like the pretrain stage's."""
    batch = images.shape[0]
    job = TrainJob(label="bench", seed=seed, model=cfg,
                   optimizer=OptimizerSpec("adamw", LR, weight_decay=WEIGHT_DECAY, betas=BETAS, grad_clip=GRAD_CLIP),
                   schedule=ScheduleSpec(10**6, 0, "linear"), batch=BatchGeometry(batch, batch),
                   data=DataSpec("unused", (), (0.08, 1.0), True, 0), distributed=DistributedSpec(2, "fp32"),
                   checkpoints=CheckpointPolicy(10**6, 1), output=OutputSpec("unused"), telemetry=TelemetrySpec(10**6))
    # DeepSpeed prints its set-up on stdout (its logger, and a bare print when it loads the
    # shared-memory comm op it JIT-builds on CPU); stdout is for the result line only.
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        engine, geometry = build_engine(job, current_worker(torch.device("cpu")))
    if engine.device.type != "cpu":
        raise RuntimeError(f"DeepSpeed chose {engine.device}; this benchmark compares CPU loops")
    fixed = Batch(images, labels)  # the data path is bench/loader.py's subject

    def step() -> float:
        set_lr(engine.optimizer, LR)  # the loop sets the schedule's LR here every step
        return train_step(engine, lambda: fixed, geometry.accumulation).item()

    return step


def plain_step(cfg: ViTConfig, seed: int, images: torch.Tensor, labels: torch.Tensor) -> Step:
    """The baseline: a hand-written fp32 loop with the same optimizer, groups and clipping."""
    model = build_model(cfg, seed)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=1e-8)

    def step() -> float:
        for group in optimizer.param_groups:
            group["lr"] = LR
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        return loss.item()

    return step


def timed_steps(label: str, step: Step, count: int) -> list[float]:
    """Seconds of each of ``count`` steps (a CPU step is synchronous: loss.item() ends it)."""
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        loss = step()
        seconds.append(time.perf_counter() - started)
        if not math.isfinite(loss):
            raise RuntimeError(f"{label}: non-finite loss {loss}")
    return seconds


class OtherLoad:
    """The share of all CPUs that other processes use while it is open (Linux; None elsewhere):
    all busy CPU time (/proc/stat) minus this process's own, over elapsed time x cores."""

    def __enter__(self) -> OtherLoad:
        self.share: float | None = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return
        busy, own, wall = (b - a for a, b in zip(self._start, end))
        self.share = max(0.0, busy - own) / (wall * (os.cpu_count() or 1))

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        if not os.path.exists("/proc/stat"):
            return None
        times = os.times()
        return _cpu_jiffies()[0] / os.sysconf("SC_CLK_TCK"), times.user + times.system, time.perf_counter()


def check_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        raise RuntimeError(f"torch threads changed to {torch.get_num_threads()} (expected {threads})")


def main() -> None:
    args = parse_args()
    cpu_busy = cpu_busy_before_start()
    torch.set_num_threads(args.threads)
    cfg = decode_variant(args.model, image_size=args.image_size, num_classes=args.classes)
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.batch, cfg.channels, cfg.image_size, cfg.image_size, generator=generator)
    labels = torch.randint(0, cfg.num_classes, (args.batch,), generator=generator)
    log(f"train-step benchmark: ViT-{args.model} at {cfg.image_size} px ({count_params(cfg) / 1e6:.2f}M params), "
        f"batch {args.batch}, fp32, {args.threads} torch thread(s), {args.warmup} warm-up + "
        f"{args.repeats} round(s) x {args.steps} timed step(s) per loop")

    init_single_rank()
    started = time.perf_counter()
    steps = {"baseline": plain_step(cfg, args.seed, images, labels),
             "ours": deepspeed_step(cfg, args.seed, images, labels)}
    torch.set_num_threads(args.threads)  # in case DeepSpeed's set-up changed it; checked below
    check_threads(args.threads)
    log(f"  set-up (models, DeepSpeed engine) {time.perf_counter() - started:.1f} s")

    # Warm-up from identical weights: the same losses, step by step, or the comparison is void.
    losses = {name: [step() for _ in range(args.warmup)] for name, step in steps.items()}
    for k, (a, b) in enumerate(zip(losses["ours"], losses["baseline"]), 1):
        log(f"  warm-up step {k} loss: ours {a:.6f}, baseline {b:.6f}")
    losses_match = all(math.isclose(a, b, rel_tol=LOSS_RTOL) for a, b in zip(losses["ours"], losses["baseline"]))
    if not math.isclose(losses["ours"][0], losses["baseline"][0], rel_tol=1e-6):
        raise RuntimeError(f"first-step losses differ: {losses}; the two loops do not train the same model")
    if not losses_match:
        log(f"warning: warm-up losses differ by more than {LOSS_RTOL:g} relative: the updates disagree")

    samples: dict[str, list[float]] = {name: [] for name in steps}
    with OtherLoad() as other:
        for r in range(args.repeats):
            order = ("baseline", "ours") if r % 2 == 0 else ("ours", "baseline")
            timings = {name: timed_steps(name, steps[name], args.steps) for name in order}
            for name, seconds in timings.items():
                samples[name].extend(seconds)
            log(f"  round {r + 1:>2}/{args.repeats}: " + ", ".join(
                f"{name} {statistics.median(seconds):.3f} s/step" for name, seconds in timings.items()))
    check_threads(args.threads)
    if other.share is not None and other.share > 0.1:
        log(f"warning: other processes used {other.share:.0%} of the CPUs during the timed rounds")
    import torch.distributed as dist

    dist.destroy_process_group()

    median = {name: statistics.median(values) for name, values in samples.items()}
    rate = {name: args.batch / seconds for name, seconds in median.items()}
    ratio = median["ours"] / median["baseline"]
    per_round = [statistics.median(samples["ours"][i:i + args.steps]) /
                 statistics.median(samples["baseline"][i:i + args.steps])
                 for i in range(0, len(samples["ours"]), args.steps)]
    log(f"  medians: ours {median['ours']:.3f} s/step ({rate['ours']:.1f} images/s), "
        f"baseline {median['baseline']:.3f} s/step ({rate['baseline']:.1f} images/s)")
    log(f"  ratio ours/baseline step time = {ratio:.3f} (goal <= {GOAL}: {'met' if ratio <= GOAL else 'not met'}); "
        f"per-round ratios {', '.join(f'{x:.3f}' for x in per_round)}")
    extra: dict[str, Any] = {
        "baseline_name": "plain PyTorch loop: torch.optim.AdamW + clip_grad_norm_(1.0), fp32",
        "ours_name": "the trainer's build_engine + train_step (DeepSpeed ZeRO-2), 1 rank, gloo, fp32",
        "ours_images_per_s": round(rate["ours"], 2),
        "baseline_images_per_s": round(rate["baseline"], 2),
        "goal": GOAL,
        "goal_met": ratio <= GOAL,
        "per_round_ratios": [round(x, 4) for x in per_round],
        "first_step_loss": {name: round(values[0], 6) for name, values in losses.items()},
        "warmup_losses": {name: [round(v, 6) for v in values] for name, values in losses.items()},
        "warmup_losses_match": losses_match,
        "samples": {name: [round(v, 4) for v in values] for name, values in samples.items()},
        "statistic": f"median of {args.repeats} rounds x {args.steps} step(s), alternating order",
        "cpu_share_used_by_others_while_timing": None if other.share is None else round(other.share, 3),
        "model": args.model,
        "params": count_params(cfg),
        "image_size": cfg.image_size,
        "classes": cfg.num_classes,
        "batch_size": args.batch,
        "warmup_steps": args.warmup,
        "gflops_per_step": round(flops_per_image(cfg, training=True) * args.batch / 1e9, 2),
        "torch_threads": args.threads,
        "torch": torch.__version__,
    }
    emit_result({
        "name": "train_step",
        "ours": round(median["ours"], 4),
        "baseline": round(median["baseline"], 4),
        "unit": "s/step (lower is better)",
        "ratio": round(ratio, 4),
        "extra": extra,
        "machine": machine_info(cpu_busy),
    })


if __name__ == "__main__":
    main()
