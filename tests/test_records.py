"""Typed stage records: what a stage publishes in its manifest and how downstream stages read it."""

from __future__ import annotations

import pytest

from pipeline.errors import VitpipeError
from pipeline.manifest import Manifest, OutputEntry
from pipeline.stage import StageInput
from pipeline.storage import LocalStorage
from stages.records import (
    IngestResult,
    ShardRecord,
    SplitRecord,
    TrainResult,
    handoff_of,
    read_result,
    result_of,
)

INGEST = IngestResult(classes=["cat", "dog"], inputs=3, samples=3, skipped=0, splits={
    "train": SplitRecord(samples=3, class_counts={"cat": 2, "dog": 1},
                         shards=[ShardRecord(path="shards/train-000000.tar", samples=3)])})
ARCH = {"image_size": 32, "patch_size": 4, "width": 32, "depth": 2, "mlp_dim": 64, "heads": 2, "num_classes": 2}


def stage_input(tmp_path, kind: str, result, outputs=()) -> StageInput:
    manifest = Manifest(stage=kind, type=kind, fingerprint="f", params={}, outputs=list(outputs),
                        result=None if result is None else result.model_dump(mode="json"))
    return StageInput(kind, Manifest.model_validate_json(manifest.to_json()), LocalStorage(tmp_path / kind))


def test_records_survive_the_manifest_round_trip(tmp_path):
    record = read_result(stage_input(tmp_path, "ingest", INGEST), IngestResult, "an ingest stage")
    assert record == INGEST
    assert [(s.path, s.samples) for s in record.shards("train")] == [("shards/train-000000.tar", 3)]
    with pytest.raises(VitpipeError, match=r"^the ingest output has no split 'test' \(has: train\)$"):
        record.shards("test")


def test_shard_records_of_older_manifests_still_read_and_are_written_compact():
    old = {"path": "shards/train-000000.tar", "samples": 3, "bytes": 10, "sha256": "ab"}  # before: size and
    record = ShardRecord.model_validate(old)  # checksum here too (the outputs list has them)
    assert (record.path, record.samples) == ("shards/train-000000.tar", 3)
    assert record.model_dump(mode="json") == {"path": "shards/train-000000.tar", "samples": 3}


def test_reading_the_wrong_kind_is_one_line_naming_the_input(tmp_path):
    ingest = stage_input(tmp_path, "ingest", INGEST)
    with pytest.raises(VitpipeError, match=r"^input 'ingest' \(type ingest\) has no TrainResult record; "
                                           r"is it a pretrain or finetune stage\?$"):
        handoff_of(ingest)
    plugin = stage_input(tmp_path, "custom", None)  # a plugin stage that publishes no record
    assert result_of(plugin) is None
    with pytest.raises(VitpipeError, match="has no IngestResult record"):
        read_result(plugin, IngestResult, "an ingest stage")


def test_a_handoff_is_located_with_the_checksums_its_manifest_committed(tmp_path):
    trained = TrainResult(kind="pretrain", architecture=ARCH, params=1, steps=1, first_loss=1.0, final_loss=0.5,
                          images_per_s=None)
    outputs = [OutputEntry(path="model.safetensors", size=1, sha256="aa"),
               OutputEntry(path="model_config.json", size=1, sha256="bb")]
    record, ref = handoff_of(stage_input(tmp_path, "pretrain", trained, outputs))
    assert record.vit_config().width == 32
    assert ref.uri == str(tmp_path / "pretrain") and ref.sha256 == {"model.safetensors": "aa", "model_config.json": "bb"}
    with pytest.raises(VitpipeError, match=r"^input 'pretrain': handoff at .* records no checksum for model.safetensors$"):
        handoff_of(stage_input(tmp_path, "pretrain", trained, outputs[1:]))
