"""Top-1 after fine-tuning: on the training device, in the training precision, every held-out
sample scored exactly once, each rank an equal share of the samples.

A plain local model (the consolidated weights) is evaluated rather than the ZeRO engine: its
forward needs no collectives, so ranks whose share ends one batch early never wait on the others.
Counts are summed across ranks on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist

from pipeline.storage import Storage
from stages.data.evalset import iter_eval_batches, split_samples
from stages.data.transforms import to_model_input
from stages.model.vit import ViT
from stages.records import EvalRecord
from stages.train.context import WorkerContext
from stages.train.job import EvalSpec

__all__ = ["evaluate"]

log = logging.getLogger("vitpipe.train")


def evaluate(model: ViT, data: Storage, spec: EvalSpec, batch_size: int, dtype: torch.dtype,
             worker: WorkerContext, class_names: Sequence[str] | None = None) -> EvalRecord:
    """``model`` is on ``worker.device`` in ``dtype``; ``class_names`` for samples labelled by name."""
    device = worker.device
    mine = split_samples(spec.shards, worker.rank, worker.world_size)
    skipped: list[dict[str, str]] = []
    correct = torch.zeros((), dtype=torch.int64, device=device)
    scored = 0
    model.eval()
    with torch.inference_mode():
        for batch in iter_eval_batches(data, mine, batch_size, model.cfg.image_size, class_names, skipped=skipped):
            labels = batch["label"].to(device, non_blocking=True)
            correct += (model(to_model_input(batch["image"], device, dtype)).argmax(-1) == labels).sum()
            scored += len(batch["key"])
    counts = torch.stack([correct, torch.tensor(scored, device=device), torch.tensor(len(skipped), device=device)])
    dist.all_reduce(counts)
    total_correct, total, n_skipped = (int(c) for c in counts.tolist())
    return EvalRecord(split=spec.split, top1=total_correct / total if total else None, correct=total_correct,
                      total=total, skipped=n_skipped)
