"""Typed result records that stages publish in their manifests, and the one way to read them.

A stage sets ``ctx.result`` to one of these; the engine stores it as the manifest's ``result``.
Downstream stages, the planner and the report read an input's record through :func:`read_result`
(validated, with a one-line error naming the input when it is missing or of another kind) —
never another stage's module, never flat key strings.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import VitpipeError
from pipeline.stage import StageInput
from stages.data.loader import ShardInfo
from stages.model.handoff import HANDOFF_FILES, HandoffRef
from stages.model.vit import ViTConfig

__all__ = ["ShardRecord", "SplitRecord", "IngestResult", "EvalRecord", "GoodputRecord", "TrainResult", "ShotStats",
           "FewshotResult", "ReportResult", "StageResult", "parse_result", "read_result", "result_of", "handoff_of"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardRecord(_Record):
    path: str  # relative to the ingest stage's folder, or to IngestResult.root
    samples: int
    # Read from older manifests, never written: the manifest's outputs list has each shard's size
    # and checksum once (an ingest of 300k shards keeps its manifest O(shards) and small).
    bytes: int | None = Field(default=None, exclude=True)
    sha256: str | None = Field(default=None, exclude=True)


class SplitRecord(_Record):
    samples: int
    shards: list[ShardRecord]
    class_counts: dict[str, int]


class IngestResult(_Record):
    kind: Literal["ingest"] = "ingest"
    classes: list[str]  # names in class-index order
    splits: dict[str, SplitRecord]
    inputs: int
    samples: int
    skipped: int
    # Where the shards are when they are not in the ingest stage's folder: a corpus indexed in
    # place (``mode: index``), read where it lies.
    root: str | None = None

    def shard_uri(self, data: StageInput) -> str:
        """The folder the shards' paths are relative to, for a consumer of ``data`` (this stage)."""
        return self.root or data.storage.uri

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise VitpipeError(f"the ingest output has no split {split!r} (has: {', '.join(self.splits) or 'none'})")
        return [ShardInfo(s.path, s.samples) for s in self.splits[split].shards]


class EvalRecord(_Record):
    split: str
    top1: float | None  # None when no sample could be scored
    correct: int
    total: int
    skipped: int


class GoodputRecord(_Record):
    """Where a training stage's wall time went (``stages.train.goodput``): seconds per bucket."""

    wall_s: float
    buckets: dict[str, float]
    attempts: int  # starts of the worker group in this run of the stage
    fraction: float  # compute / wall


class TrainResult(_Record):
    """A pretrain or finetune stage: the handed-off model and how training went."""

    kind: Literal["pretrain", "finetune"]
    architecture: dict[str, Any]  # ViTConfig.to_dict() of the handed-off model
    params: int
    steps: int
    first_loss: float | None
    final_loss: float | None
    images_per_s: float | None  # over the last log window
    dataset: str | None = None  # finetune: what it was tuned on
    evaluation: EvalRecord | None = None  # finetune: top-1 on the held-out split
    goodput: GoodputRecord | None = None  # None in manifests written before it was measured

    def vit_config(self) -> ViTConfig:
        return ViTConfig(**self.architecture)


class ShotStats(_Record):
    mean: float
    std: float


class FewshotResult(_Record):
    kind: Literal["fewshot"] = "fewshot"
    dataset: str
    image_size: int
    classes: int
    # model ("pretrained", and "random_init" when the baseline ran) -> k -> accuracy over the draws
    accuracy: dict[str, dict[int, ShotStats]]


class ReportResult(_Record):
    kind: Literal["report"] = "report"
    metrics: dict[str, Any]  # what metrics.json holds
    quality_passed: bool | None


StageResult = IngestResult | TrainResult | FewshotResult | ReportResult
_KINDS: dict[str, type[_Record]] = {"ingest": IngestResult, "pretrain": TrainResult, "finetune": TrainResult,
                                    "fewshot": FewshotResult, "report": ReportResult}
R = TypeVar("R", bound=_Record)


def parse_result(raw: dict[str, Any] | None) -> StageResult | None:
    """A manifest's ``result`` as its typed record (None if the stage publishes none, e.g. a plugin);
    raises ``ValidationError`` when a known kind is malformed."""
    cls = _KINDS.get(str(raw.get("kind"))) if raw else None
    return None if cls is None else cls.model_validate(raw)  # type: ignore[return-value]


def result_of(inp: StageInput) -> StageResult | None:
    """The input's record, whatever its kind (None if its stage publishes none, e.g. a plugin)."""
    try:
        return parse_result(inp.manifest.result)
    except ValidationError as err:
        raise VitpipeError(f"input {inp.stage!r}: its manifest's result record is malformed "
                           f"({str(err).splitlines()[0]}); re-run that stage") from None


def read_result(inp: StageInput, kind: type[R], what: str) -> R:
    """The input's record of type ``kind``, or a one-line error (``what``: e.g. "an ingest stage")."""
    record = result_of(inp)
    if not isinstance(record, kind):
        raise VitpipeError(f"input {inp.stage!r} (type {inp.manifest.type}) has no {kind.__name__} record; "
                           f"is it {what}?")
    return record


def handoff_of(inp: StageInput) -> tuple[TrainResult, HandoffRef]:
    """A training stage's record and where its handoff is, with the checksums its manifest committed."""
    record = read_result(inp, TrainResult, "a pretrain or finetune stage")
    sha = {name: entry.sha256 for name in HANDOFF_FILES if (entry := inp.manifest.output(name)) is not None}
    try:
        return record, HandoffRef(inp.storage.uri, sha)
    except ValueError as err:
        raise VitpipeError(f"input {inp.stage!r}: {err}") from None
