"""One table of accelerators: memory and dense bf16 peak, shared by the trainer's MFU and the planner."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Accelerator", "ACCELERATORS", "accelerator", "model_flops_utilization"]


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int  # as sold (decimal GB)
    peak_flops: float  # dense bf16 FLOP/s: the MFU denominator


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a for a in (
        Accelerator("h100", 80 * 10**9, 989e12),  # SXM; the PCIe card peaks at 756 TFLOP/s
        Accelerator("h200", 141 * 10**9, 989e12),
        Accelerator("a100", 80 * 10**9, 312e12),
    )
}


def accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r} (known: {', '.join(sorted(ACCELERATORS))})") from None


def model_flops_utilization(global_images_per_s: float, world_size: int, train_flops_per_image: float,
                            peak_flops: float) -> float:
    """MFU of one device: its share of the throughput x training FLOPs per image / its peak.

    Every rank computes ``global / world`` images per second; dividing the *global* rate by one
    device's peak would report MFU x world size.
    """
    if world_size < 1 or peak_flops <= 0:
        raise ValueError(f"need world_size >= 1 and peak_flops > 0, got {world_size} and {peak_flops}")
    return global_images_per_s / world_size * train_flops_per_image / peak_flops
