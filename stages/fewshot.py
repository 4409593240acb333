"""The ``fewshot`` stage: few-shot linear evaluation of a frozen representation (paper §4.1).

Features (the representation before the head: class-token state or mean of patch tokens, after
the final LayerNorm) are extracted from the ``data`` input's train and eval splits by Ray tasks
in parallel, each over its own shards; then :func:`stages.eval.fewshot.few_shot_eval` fits
closed-form regularised least squares onto {-1, 1}^K targets for each k in ``shots`` over
``draws`` random k-shot sets (regularisation chosen on held-out training data). With
``random_init_baseline`` the same architecture at random initialisation is evaluated too, which
is what the representation has to beat.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from pipeline.config import StageResources, StorageSettings
from pipeline.errors import VitpipeError
from pipeline.preflight import ResourceDemand
from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext, StageParams
from stages.data.evalset import ShardSlice, split_samples
from stages.eval.fewshot import DEFAULT_L2_GRID, few_shot_eval
from stages.model.handoff import HandoffRef
from stages.model.vit import ViTConfig
from stages.records import FewshotResult, IngestResult, ShotStats, handoff_of, read_result

__all__ = ["FewshotParams", "Fewshot", "extract_features"]

log = logging.getLogger(__name__)


class FewshotParams(StageParams):
    shots: list[int] = Field(default_factory=lambda: [1, 5, 10, 25], description="k examples per class")
    draws: int = Field(default=5, ge=1, description="random k-shot sets per k (mean and std reported)")
    l2_grid: list[float] = Field(default_factory=lambda: list(DEFAULT_L2_GRID), min_length=1)
    image_size: int | None = Field(default=None, ge=8, description="default: the model's resolution")
    batch_size: int = Field(default=128, ge=1)
    workers: int = Field(default=2, ge=1, description="parallel feature-extraction tasks")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    use_gpu: bool = Field(default=False, description="one GPU per extraction task (bf16 autocast)")
    train_split: str = "train"
    eval_split: str = "test"
    random_init_baseline: bool = Field(default=False, description="also evaluate the architecture at random init")
    dataset: str | None = Field(default=None, description="name in metrics and the report (default: data input)")

    # Features are extracted in eval mode: how many tasks and how large their batches are changes
    # them by float rounding at most (use_gpu does more: it extracts in bf16).
    execution_params: ClassVar[frozenset[str]] = frozenset({"workers", "cpus_per_worker", "batch_size"})


def extract_features(handoff: HandoffRef | None, architecture: ViTConfig, image_size: int, data_uri: str,
                     slices: list[ShardSlice], batch_size: int, settings: dict[str, Any], seed: int,
                     class_names: list[str] | None = None) -> dict[str, Any]:
    """Representations of every sample in ``slices`` (a Ray task; ``handoff`` None: random init)."""
    import torch

    from pipeline.storage import open_storage
    from stages.data.evalset import iter_eval_batches
    from stages.data.transforms import to_model_input
    from stages.model.handoff import read_handoff
    from stages.model.transfer import build_transfer_model
    from stages.model.vit import ViT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # one task per CPU: threads would only contend
    store = StorageSettings(**settings)
    if handoff is None:
        torch.manual_seed(seed)
        source, state = architecture, ViT(architecture).state_dict()
    else:
        loaded = read_handoff(handoff, store)
        source, state = loaded.config, loaded.state
    model = build_transfer_model(source, state, image_size, num_classes=0).eval().to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(dtype)
    feats, labels, keys, skipped = [], [], [], []
    with torch.inference_mode():
        for batch in iter_eval_batches(open_storage(data_uri, store), slices, batch_size, image_size, class_names,
                                       skipped=skipped):
            feats.append(model.representation(to_model_input(batch["image"], device, dtype)).float().cpu().numpy())
            labels.append(batch["label"].numpy())
            keys.extend(batch["key"])
    dim = model.cfg.width
    return {"features": np.concatenate(feats) if feats else np.zeros((0, dim), np.float32),
            "labels": np.concatenate(labels) if labels else np.zeros((0,), np.int64),
            "keys": keys, "skipped": skipped}


def _gather(results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    feats = np.concatenate([r["features"] for r in results])
    labels = np.concatenate([r["labels"] for r in results])
    return feats, labels, [s for r in results for s in r["skipped"]]


@register_stage("fewshot")
class Fewshot(Stage):
    Params = FewshotParams
    input_roles = ("model", "data")

    @classmethod
    def default_resources(cls) -> StageResources:
        return StageResources(cpus=0)  # the extraction tasks take the CPUs

    @classmethod
    def resource_demand(cls, params: StageParams) -> ResourceDemand:
        p: FewshotParams = params  # type: ignore[assignment]
        return ResourceDemand(bundles=({"CPU": p.cpus_per_worker, "GPU": 1.0 if p.use_gpu else 0.0},),
                              label="extraction task")

    def run(self, ctx: StageContext) -> None:
        import ray

        p: FewshotParams = ctx.params  # type: ignore[assignment]
        pretrained, handoff = handoff_of(ctx.input("model"))
        source = pretrained.vit_config()
        data = ctx.input("data")
        ingested = read_result(data, IngestResult, "an ingest stage")
        classes = len(ingested.classes)
        image_size = p.image_size or source.image_size
        if image_size % source.patch_size:
            raise VitpipeError(f"image_size {image_size} is not divisible by the patch size {source.patch_size}")
        splits = {name: ingested.shards(name) for name in (p.train_split, p.eval_split)}
        settings = ctx.run_storage_settings.model_dump() if ctx.run_storage_settings else {}
        remote = ray.remote(num_cpus=p.cpus_per_worker, num_gpus=1 if p.use_gpu else 0,
                            max_retries=2)(extract_features)
        models: dict[str, HandoffRef | None] = {"pretrained": handoff, **({"random_init": None}
                                                                          if p.random_init_baseline else {})}

        # One task per (model, split, share): equal shares of the samples, disjoint, covering all.
        refs: dict[tuple[str, str], list[Any]] = {}
        for tag, ref in models.items():
            for split, shards in splits.items():
                shares = [share for i in range(p.workers) if (share := split_samples(shards, i, p.workers))]
                refs[(tag, split)] = [remote.remote(ref, source, image_size, ingested.shard_uri(data), share,
                                                    p.batch_size, settings, ctx.seed, ingested.classes) for share in shares]
        total = sum(len(v) for v in refs.values())
        with ctx.progress(total, desc=f"{ctx.name}: feature extraction") as bar:
            gathered = {}
            for key, group_refs in refs.items():
                results = []
                for ref in group_refs:
                    results.append(ray.get(ref))
                    bar.update()
                gathered[key] = _gather(results)

        dataset = p.dataset or data.stage
        report: dict[str, Any] = {"dataset": dataset, "image_size": image_size, "classes": classes}
        for tag in models:
            train_x, train_y, skipped_train = gathered[(tag, p.train_split)]
            test_x, test_y, skipped_test = gathered[(tag, p.eval_split)]
            ctx.logger.info("%s features: %d train, %d %s samples, dim %d", tag, len(train_y), len(test_y),
                            p.eval_split, train_x.shape[1])
            report[tag] = few_shot_eval(train_x, train_y, test_x, test_y, shots=p.shots, draws=p.draws,
                                        seed=ctx.seed, l2_grid=p.l2_grid, num_classes=classes)
            report[tag]["skipped_samples"] = skipped_train + skipped_test
        ctx.write_text("fewshot.json", json.dumps(report, indent=2, sort_keys=True))
        ctx.result = FewshotResult(dataset=dataset, image_size=image_size, classes=classes, accuracy={
            tag: {int(k): ShotStats(mean=res["mean"], std=res["std"]) for k, res in report[tag]["shots"].items()}
            for tag in models})
        for tag in models:
            if report[tag]["skipped"]:
                ctx.metrics[f"{tag}_skipped_shots"] = report[tag]["skipped"]
        ctx.logger.info("few-shot on %s: %s", dataset, ", ".join(
            f"{k}-shot {res['mean']:.3f}" for k, res in report["pretrained"]["shots"].items()))
