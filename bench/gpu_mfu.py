"""Benchmark: bf16 training throughput and MFU of our ViT on one GPU, side by side with timm's ViT.

For each model (default B/16, L/16, H/14 at 224 px, 1000 classes) one training step is timed on a
fixed batch of random images (no data loading), the same way for our ``ViT`` and for timm's
``vit_*_patch*_224`` built from scratch (``pretrained=False``), which has the same architecture
and parameter count:

    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(images), labels)
    loss.backward(); clip_grad_norm_(params, 1.0); optimizer.step(); optimizer.zero_grad()

Why this step: it is standard bf16 mixed-precision pretraining -- fp32 master weights and AdamW
states, bf16 matmuls and attention (SDPA) under autocast, gradient clipping at 1.0 as in our
recipe. Casting the parameters themselves to bf16 would be faster but is not a fair pretraining
step (AdamW updates lost to bf16 rounding). The optimizer is ``torch.optim.AdamW`` (fused on CUDA)
over the same decay split for both models (``stages.train.engine.param_groups``: matrices only). DeepSpeed is not in the loop:
this measures the model's own efficiency; ``bench/train_step.py`` measures DeepSpeed's overhead.

MFU = images/s x ``flops_per_image(cfg, training=True)`` (model FLOPs: 3x the forward's matmuls;
recomputation under ``--checkpoint-activations`` is not counted) / the card's dense bf16 peak from
``stages.train.hardware.ACCELERATORS`` (the card is recognised from ``torch.cuda.get_device_name()``;
``--peak-tflops`` overrides it). Note: the table holds the SXM figure for H100.

Each model's two variants are warmed up (untimed; this is where ``--compile`` compiles), then
``--repeats`` rounds alternate them (ours first in even rounds, timm first in odd ones), each
timing ``--steps`` steps between two CUDA synchronisations; the median per-step time is
reported. Main figures: mean MFU over the models, ours and timm, and their ratio.

Without a CUDA device it prints one line and exits 0. ``--device cpu`` runs a tiny smoke version
on the CPU (default 64 px, batch 2, 1 round; no MFU) to exercise the code; it prints the JSON line but
does not write ``bench/out/gpu_mfu.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.model.vit import ViT, ViTConfig, count_params, decode_variant, flops_per_image
from stages.train.engine import param_groups
from stages.train.hardware import ACCELERATORS

# Our variant -> timm's model of the same architecture (class token, no pre-logits layer).
TIMM_NAMES = {
    "Ti/16": "vit_tiny_patch16_224",
    "S/16": "vit_small_patch16_224",
    "B/16": "vit_base_patch16_224",
    "L/16": "vit_large_patch16_224",
    "H/14": "vit_huge_patch14_224",
}
# Per-model default batch on a GPU: large enough to fill an H100, small enough that both models'
# weights and AdamW states (16 bytes/parameter each) plus one model's activations fit in 80 GB.
GPU_BATCH = {"Ti/16": 256, "S/16": 256, "B/16": 256, "L/16": 128, "H/14": 64}
CPU_BATCH = 2
WEIGHT_DECAY, LR, BETAS, GRAD_CLIP = 0.1, 8e-4, (0.9, 0.999), 1.0  # the pretrain stage's defaults

Step = Callable[[], None]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated variants, of {', '.join(TIMM_NAMES)} (default: B/16,L/16,H/14 on GPU, "
                             "Ti/16 on CPU)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (the benchmark) or cpu (a tiny smoke run of the same code) (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step for every model (default: on GPU "
                             f"{', '.join(f'{m} {b}' for m, b in GPU_BATCH.items())}; on CPU {CPU_BATCH})")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant per round (default: 10 on GPU, 2 on CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds, alternating ours and timm (default: 3 on GPU, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps of each variant first (default: 5 on GPU, 1 on CPU)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="input resolution (default: 224 on GPU, 64 on CPU)")
    parser.add_argument("--classes", type=int, default=1000, help="head size (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (compiled in warm-up)")
    parser.add_argument("--checkpoint-activations", action="store_true",
                        help="recompute each block in the backward pass (ours: ViTConfig.checkpoint_activations, "
                             "timm: set_grad_checkpointing)")
    parser.add_argument("--no-timm", action="store_true", help="skip the timm baseline")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak of the card, TFLOP/s (default: from the accelerator table by the card's name)")
    parser.add_argument("--seed", type=int, default=0, help="init and batch seed (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the result line to this file (bench/gpu_check.sh reads it from there)")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.steps = args.steps or (10 if gpu else 2)
    args.repeats = args.repeats or (3 if gpu else 1)
    args.image_size = args.image_size or (224 if gpu else 64)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.models = [m.strip() for m in (args.models or ("B/16,L/16,H/14" if gpu else "Ti/16")).split(",") if m.strip()]
    for name in args.models:
        if name not in TIMM_NAMES:
            parser.error(f"unknown model {name!r}: choose from {', '.join(TIMM_NAMES)}")
    for name in ("batch", "steps", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    return args


def card_peak(override_tflops: float | None) -> tuple[str, float | None]:
    """The CUDA card's name and dense bf16 peak FLOP/s (None when unknown)."""
    name = torch.cuda.get_device_name()
    if override_tflops:
        return name, override_tflops * 1e12
    lowered = name.lower()
    for key in ("h200", "h100", "a100"):
        if key in lowered:
            return name, ACCELERATORS[key].peak_flops
    return name, None


def timm_model(variant: str, cfg: ViTConfig) -> nn.Module | None:
    """timm's ViT of the same architecture, or None when timm is not installed."""
    try:
        import timm
    except ImportError:
        return None
    model = timm.create_model(TIMM_NAMES[variant], pretrained=False, num_classes=cfg.num_classes,
                              img_size=cfg.image_size)
    if cfg.checkpoint_activations:
        model.set_grad_checkpointing(True)
    return model


def make_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, compile_model: bool) -> Step:
    """One bf16 mixed-precision training step of ``model`` on the fixed batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = images.device.type == "cuda"  # one kernel for the whole update instead of a per-tensor loop
    if not isinstance(model, ViT):  # timm names only its special tensors; exempt its 1-D ones as ours does
        exempt = model.no_weight_decay() | {n for n, p in model.named_parameters() if p.ndim < 2}
        model.no_weight_decay = lambda: exempt  # type: ignore[method-assign]
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=1e-8, fused=fused)
    forward = torch.compile(model) if compile_model else model

    def step() -> None:
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(step: Step, steps: int, device: torch.device) -> float:
    """Mean time of ``steps`` back-to-back steps; GPU work is queued, so time between two syncs."""
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / steps


def warm_up(label: str, step: Step, steps: int, device: torch.device) -> float | None:
    """Untimed steps; returns the peak GPU memory allocated during them (GB), None on CPU. It includes
    what of the other variant is resident: its weights, and its optimizer states once it has stepped."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    log(f"  {label:<6} warm-up {steps} step(s) in {time.perf_counter() - started:.1f} s")
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def bench_model(variant: str, args: argparse.Namespace, device: torch.device, peak: float | None) -> dict[str, Any]:
    """Both variants of one model, warmed up then timed in alternating rounds."""
    gpu = device.type == "cuda"
    batch = args.batch or (GPU_BATCH[variant] if gpu else CPU_BATCH)
    cfg = decode_variant(variant, image_size=args.image_size, num_classes=args.classes,
                         checkpoint_activations=args.checkpoint_activations)
    generator = torch.Generator(device).manual_seed(args.seed + 1)
    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size, device=device, generator=generator)
    labels = torch.randint(0, cfg.num_classes, (batch,), device=device, generator=generator)

    torch.manual_seed(args.seed)
    models: dict[str, nn.Module] = {"ours": ViT(cfg).to(device).train()}
    baseline = None if args.no_timm else timm_model(variant, cfg)
    if baseline is not None:
        models["timm"] = baseline.to(device).train()
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    if params["ours"] != count_params(cfg) or params.get("timm", params["ours"]) != params["ours"]:
        log(f"warning: parameter counts differ: {params} (closed form {count_params(cfg)})")
    flops = flops_per_image(cfg, training=True)
    log(f"ViT-{variant} at {cfg.image_size} px: {params['ours'] / 1e6:.1f}M params, batch {batch}, "
        f"{flops * batch / 1e12:.2f} TFLOP/step, bf16 autocast"
        f"{', compiled' if args.compile else ''}{', activation checkpointing' if args.checkpoint_activations else ''}")

    steps = {name: make_step(model, images, labels, args.compile) for name, model in models.items()}
    memory = {name: warm_up(name, step, args.warmup, device) for name, step in steps.items()}
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            seconds = seconds_per_step(steps[name], args.steps, device)
            samples[name].append(seconds)
            log(f"  round {r + 1}: {name:<5} {seconds * 1e3:8.1f} ms/step = {batch / seconds:8.1f} images/s")

    result: dict[str, Any] = {"batch_size": batch, "params": params["ours"], "tflop_per_image": flops / 1e12}
    for name, values in samples.items():
        rate = batch / statistics.median(values)
        result[name] = {
            "images_per_s": round(rate, 2),
            "mfu": round(rate * flops / peak, 4) if peak else None,
            # Both models are resident, so a peak includes the other's weights (see warm_up).
            "peak_memory_gb": None if memory[name] is None else round(memory[name], 2),
            "ms_per_step": [round(v * 1e3, 2) for v in values],
        }
    if "timm" in result:
        result["ratio"] = round(result["ours"]["images_per_s"] / result["timm"]["images_per_s"], 4)
    summary = []
    for name in samples:
        mfu = result[name]["mfu"]
        summary.append(f"{name} {result[name]['images_per_s']:.1f} images/s" + (f" (MFU {mfu:.3f})" if mfu else ""))
    ratio = f"; ours/timm {result['ratio']:.3f}" if "ratio" in result else ""
    log(f"  ViT-{variant}: {', '.join(summary)}{ratio}")

    # Free this model's memory before the next (larger) one; compiled graphs are dropped too, so
    # the next model compiles afresh rather than as a dynamic-shape recompilation.
    del models, steps, baseline, images, labels
    gc.collect()
    if args.compile:
        torch._dynamo.reset()
    if gpu:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; this benchmark needs a GPU (try --device cpu for a smoke run)", flush=True)
        return
    # The shared helpers are imported only now, so that the no-GPU exit above stays quick.
    from corpus import cpu_busy_before_start, emit_result, machine_info

    cpu_busy = cpu_busy_before_start() if args.device == "cpu" else None
    device = torch.device(args.device)
    card, peak = card_peak(args.peak_tflops) if device.type == "cuda" else ("cpu", None)
    if device.type == "cuda" and peak is None:
        log(f"warning: unknown card {card!r}: no MFU (pass --peak-tflops)")
    if device.type == "cuda" and any(k in card.lower() for k in ("pcie", "nvl")):
        log(f"note: {card} has a lower peak than the SXM figure in ACCELERATORS table; its MFU reads low")
    log(f"gpu_mfu benchmark on {card}: models {', '.join(args.models)}, {args.warmup} warm-up + "
        f"{args.repeats} round(s) x {args.steps} step(s) per variant")

    results = {variant: bench_model(variant, args, device, peak) for variant in args.models}
    with_timm = all("timm" in r for r in results.values())
    # Headline: mean MFU over the models (images/s when the peak is unknown), ours and timm.
    key = "mfu" if peak else "images_per_s"
    ours = statistics.mean(r["ours"][key] for r in results.values())
    baseline = statistics.mean(r["timm"][key] for r in results.values()) if with_timm else None
    ratio = ours / baseline if baseline else None
    if with_timm:
        geomean = math.exp(statistics.mean(math.log(r["ratio"]) for r in results.values()))
        log(f"  mean {key}: ours {ours:.4g}, timm {baseline:.4g}, ratio {ratio:.3f}; "
            f"geometric mean of per-model ours/timm {geomean:.3f}")
    else:
        log(f"  mean {key}: ours {ours:.4g} (no timm baseline)")

    result = {
        "name": "gpu_mfu_compiled" if args.compile else "gpu_mfu",  # one file per mode: neither overwrites the other
        "ours": round(ours, 4),
        "baseline": None if baseline is None else round(baseline, 4),
        "unit": f"{'MFU' if peak else 'images/s'}, mean over {', '.join(args.models)}",
        "ratio": None if ratio is None else round(ratio, 4),
        "extra": {
            "baseline_name": "timm vit_*_patch*_224 (pretrained=False), same step",
            "step": "bf16 autocast, fp32 weights, AdamW (fused on CUDA), clip_grad_norm_(1.0)",
            "models": results,
            "card": card,
            "peak_flops": peak,
            "compile": args.compile,
            "checkpoint_activations": args.checkpoint_activations,
            "image_size": args.image_size,
            "statistic": f"median of {args.repeats} rounds of {args.steps} steps, alternating order",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "machine": machine_info(cpu_busy),
    }
    if device.type == "cuda":
        emit_result(result)
    else:
        log("(CPU smoke run: the result is printed, not written to bench/out)")
        print(json.dumps(result), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result) + "\n")


def log(message: str) -> None:
    # corpus.log's twin: corpus is imported late (see main) and this is needed before that.
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
