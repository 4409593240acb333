"""Smoke stages: small, deterministic stages that exercise the whole engine without ML.

Use them to check a cluster's plumbing (``configs/smoke.yaml``: storage, Ray scheduling, resume)
before spending GPU hours. Their outputs depend only on their params, seed and inputs, so two runs
give byte-identical files. ``work_s`` simulates work, spread over ``steps`` progress steps.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from typing import ClassVar

from pydantic import Field

from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext, StageParams

__all__ = ["Generate", "Transform", "Combine"]


class GenerateParams(StageParams):
    records: int = Field(default=1000, ge=1, le=10_000_000)
    work_s: float = Field(default=0.0, ge=0)
    steps: int = Field(default=10, ge=1)


class TransformParams(StageParams):
    factor: int = Field(default=3, ge=1)
    offset: int = 0
    work_s: float = Field(default=0.0, ge=0)
    steps: int = Field(default=10, ge=1)


class CombineParams(StageParams):
    work_s: float = Field(default=0.0, ge=0)

    execution_params: ClassVar[frozenset[str]] = frozenset({"work_s"})  # how long it takes, not what it makes


def _simulate_work(ctx: StageContext, seconds: float, steps: int) -> None:
    with ctx.progress(steps, desc=f"{ctx.name}") as bar:
        for _ in range(steps):
            time.sleep(seconds / steps)
            bar.update()


def _read_numbers(ctx: StageContext, role: str) -> list[int]:
    inp = ctx.input(role)
    return [int(line) for line in inp.storage.read_text("numbers.txt").split()]


@register_stage("smoke.generate")
class Generate(Stage):
    """Writes ``records`` pseudo-random integers drawn from the run seed."""

    Params = GenerateParams

    def run(self, ctx: StageContext) -> None:
        p: GenerateParams = ctx.params  # type: ignore[assignment]
        _simulate_work(ctx, p.work_s, p.steps)
        rng = random.Random(ctx.seed)
        numbers = [rng.randrange(1_000_000) for _ in range(p.records)]
        ctx.write_text("numbers.txt", "\n".join(map(str, numbers)) + "\n")
        ctx.metrics["records"] = len(numbers)


@register_stage("smoke.transform")
class Transform(Stage):
    """Maps each integer x of its ``source`` input to ``x * factor + offset``."""

    Params = TransformParams
    input_roles = ("source",)

    def run(self, ctx: StageContext) -> None:
        p: TransformParams = ctx.params  # type: ignore[assignment]
        numbers = _read_numbers(ctx, "source")
        _simulate_work(ctx, p.work_s, p.steps)
        out = [x * p.factor + p.offset for x in numbers]
        ctx.write_text("numbers.txt", "\n".join(map(str, out)) + "\n")
        ctx.metrics["records"] = len(out)


@register_stage("smoke.combine")
class Combine(Stage):
    """Summarises any number of upstream smoke stages into ``summary.json``."""

    Params = CombineParams
    accepts_extra_inputs = True

    def run(self, ctx: StageContext) -> None:
        p: CombineParams = ctx.params  # type: ignore[assignment]
        _simulate_work(ctx, p.work_s, 1)
        summary = {}
        for role in sorted(ctx.inputs):
            numbers = _read_numbers(ctx, role)
            digest = hashlib.sha256("\n".join(map(str, numbers)).encode()).hexdigest()
            summary[role] = {"count": len(numbers), "sum": sum(numbers), "sha256": digest}
        ctx.write_json("summary.json", summary)
        ctx.metrics["total"] = sum(v["sum"] for v in summary.values())
        ctx.logger.info("summary: %s", json.dumps(ctx.metrics))
