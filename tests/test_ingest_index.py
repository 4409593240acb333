"""Ingest ``mode: index``: an existing webdataset corpus used in place (#12 point 2)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from cluster.executor import RayExecutor
from pipeline.config import parse_config
from pipeline.engine import run_pipeline
from pipeline.errors import VitpipeError
from pipeline.storage import open_storage
from stages.data.evalset import iter_eval_batches
from stages.data.loader import ShardLoader
from stages.data.order import OrderSpec
from stages.data.shard_index import ShardIndex, class_list
from stages.ingest import IngestParams
from tests.test_ingest import as_if_killed, record, run_ingest

pytestmark = pytest.mark.usefixtures("ray_instance")

NAMES = ["cat", "dog", "eel"]


def _png(seed: int, size: int = 12) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 37 % 256, seed * 91 % 256, 80)).save(out, format="PNG")
    return out.getvalue()


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (12, 12), (seed * 53 % 256, 40, seed * 17 % 256)).save(out, format="JPEG")
    return out.getvalue()


def write_shardwriter_corpus(root: Path) -> dict[str, int | None]:
    """webdataset.ShardWriter shards: train (3 x 4 samples) and val (3), labelled by KEY.cls with a
    classes.json beside. train sample 5 is a truncated PNG, train sample 9 has no label. Returns
    each key's class index (None: no label)."""
    root.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"classes": NAMES}))
    labels: dict[str, int | None] = {}
    for split, count in (("train", 12), ("val", 3)):
        with wds.ShardWriter(str(root / f"{split}-%06d.tar"), maxcount=4, verbose=0) as sink:
            for i in range(count):
                key = f"{split}{i:04d}"
                sample = {"__key__": key, "png": _png(i)}
                if split == "train" and i == 5:
                    sample["png"] = sample["png"][:40]
                label = None if (split == "train" and i == 9) else i % 3
                if label is not None:
                    sample["cls"] = str(label).encode()
                labels[key] = label
                sink.write(sample)
    return labels


def test_a_shardwriter_corpus_is_indexed_in_place_and_read_by_the_loader(tmp_path):
    corpus = tmp_path / "corpus"
    labels = write_shardwriter_corpus(corpus)
    with open(corpus / "train-000001.tar", "ab") as f:  # zero blocks past the end marker: still a tar,
        f.write(bytes(64 * 512))  # and still part of the file its checksum is of
    before = {p.name: p.stat().st_mtime_ns for p in corpus.iterdir()}
    store, m = run_ingest(str(tmp_path / "run"), {"source": "webdataset", "path": str(corpus), "mode": "index",
                                                   "max_skip_fraction": 0.2})
    result = record(m)
    assert result.root == str(corpus) and result.classes == NAMES
    assert {split: [(s.path, s.samples) for s in r.shards] for split, r in result.splits.items()} == {
        "train": [("train-000000.tar", 4), ("train-000001.tar", 4), ("train-000002.tar", 4)],
        "val": [("val-000000.tar", 3)]}
    assert (result.inputs, result.samples, result.skipped) == (15, 15, 2)
    # Class counts of usable samples: train 0..11 minus 5 (bad image: label 2) and 9 (no label).
    assert result.splits["train"].class_counts == {"cat": 3, "dog": 4, "eel": 3}
    assert result.splits["val"].class_counts == {"cat": 1, "dog": 1, "eel": 1}
    assert m.metrics["skipped_by_kind"] == {"bad image": 1, "missing label": 1}
    # Nothing copied: the stage folder holds small stats files, no shard; the corpus is untouched.
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert not [p for p in written if p.suffix == ".tar"]
    assert {p.name: p.stat().st_mtime_ns for p in corpus.iterdir()} == before
    stats = ShardIndex(**json.loads(store.read_text("index/train-000001.json")))
    data = (corpus / "train-000001.tar").read_bytes()
    assert (stats.bytes, stats.sha256) == (len(data), hashlib.sha256(data).hexdigest())

    # The loader and the evaluation reader read the index where it points, like ingest's own shards.
    shards_store = open_storage(result.root)
    train = result.shards("train")
    batches = list(ShardLoader(shards_store, train, OrderSpec(0, streams=2), global_batch=4, micro_batch=4,
                               image_size=8, class_names=result.classes))
    seen = {k: int(label) for b in batches for k, label in zip(b["key"], b["label"], strict=True)}
    assert seen == {k: (-1 if k in ("train0005", "train0009") else v) for k, v in labels.items() if k.startswith("train")}
    skipped: list[dict[str, str]] = []
    val = {k: int(label) for b in iter_eval_batches(shards_store, result.shards("val"), 8, 8, result.classes,
                                                   skipped=skipped) for k, label in zip(b["key"], b["label"],
                                                                                        strict=True)}
    assert val == {"val0000": 0, "val0001": 1, "val0002": 2} and not skipped


def write_img2dataset_corpus(root: Path) -> dict[str, str]:
    """img2dataset's layout: 00000.tar ... with 9-digit keys, KEY.jpg + KEY.txt + KEY.json, and a
    .parquet and _stats.json per shard beside them (ignored). Labels are names in KEY.txt (a
    caption, in img2dataset's own use). Returns each key's label."""
    root.mkdir(parents=True)
    labels = {}
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * 8, shard * 8 + 8):
                key = f"{i:09d}"
                labels[key] = ("zebra", "horse", "okapi")[i % 3]
                members = {f"{key}.jpg": _jpeg(i), f"{key}.txt": labels[key].encode(),
                           f"{key}.json": json.dumps({"key": key, "status": "success", "width": 12}).encode()}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (root / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 8}))
    return labels


def test_an_img2dataset_corpus_indexed_in_place_feeds_pretrain_and_fewshot(tmp_path):
    corpus = tmp_path / "laion"
    labels = write_img2dataset_corpus(corpus)
    tiny = {"model": "Ti/4", "width": 32, "depth": 1, "heads": 2, "mlp_dim": 64, "image_size": 8, "steps": 2,
            "global_batch": 8, "micro_batch": 8, "workers": 1, "zero_stage": 0, "warmup_steps": 1, "log_every": 1}
    raw = {"name": "idx", "seed": 3, "ray": {"include_dashboard": False}, "stages": {
        "ingest": {"type": "ingest", "params": {"source": "webdataset", "path": str(corpus), "mode": "index"}},
        "pretrain": {"type": "pretrain", "inputs": {"data": "ingest"}, "params": tiny},
        "fewshot": {"type": "fewshot", "inputs": {"model": "pretrain", "data": "ingest"},
                    "params": {"shots": [1], "draws": 1, "workers": 1, "eval_split": "train", "batch_size": 8}}}}
    run = tmp_path / "run"
    run_pipeline(parse_config(raw), str(run), RayExecutor())
    result = record(_manifest(run, "ingest"))
    assert result.classes == ["horse", "okapi", "zebra"] and result.root == str(corpus)
    assert [(s.path, s.samples) for s in result.shards("train")] == [("00000.tar", 8), ("00001.tar", 8)]
    assert result.splits["train"].class_counts == {"horse": 5, "okapi": 5, "zebra": 6}
    # Pretrain read its 16 samples from the corpus by name (a wrong root or no class names: every
    # sample unreadable, the stage fails); the few-shot features came from there too.
    pretrain = _manifest(run, "pretrain").result
    assert pretrain["steps"] == 2
    fewshot = json.loads((run / "stages/fewshot/fewshot.json").read_text())
    assert fewshot["pretrained"]["skipped_samples"] == []
    assert len(labels) == 16


def _manifest(run: Path, stage: str):
    from pipeline.manifest import read_manifest

    return read_manifest(open_storage(str(run)).child(f"stages/{stage}"))


def test_a_resumed_index_reads_only_the_shards_it_had_not_finished(tmp_path):
    corpus = tmp_path / "corpus"
    write_shardwriter_corpus(corpus)
    params = {"source": "webdataset", "path": str(corpus), "mode": "index", "max_skip_fraction": 0.2}
    uri = str(tmp_path / "run")
    store, m = run_ingest(uri, params)
    # What a kill mid-ingest leaves: some stats files written, one not, no manifest, stage running.
    store.delete("index/train-000001.json")
    as_if_killed(uri, store)
    kept = {p.name: p.stat().st_mtime_ns for p in store.local_path("index").iterdir()}
    store2, m2 = run_ingest(uri, params)
    assert {name: (store2.local_path("index") / name).stat().st_mtime_ns for name in kept} == kept  # not re-read
    assert (store2.local_path("index") / "train-000001.json").exists()
    assert record(m2) == record(m)


def test_a_damaged_shard_is_left_out_and_hostile_members_are_recorded(tmp_path):
    corpus = tmp_path / "corpus"
    write_shardwriter_corpus(corpus)
    whole = (corpus / "train-000002.tar").read_bytes()
    with tarfile.open(corpus / "train-000002.tar") as tar:
        cut = tar.getmembers()[4].offset_data + 5  # in the third sample's first member: two read before
    (corpus / "train-000002.tar").write_bytes(whole[:cut])
    with tarfile.open(corpus / "val-000000.tar", "a") as tar:
        link = tarfile.TarInfo("../escape.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    store, m = run_ingest(str(tmp_path / "run"), {"source": "webdataset", "path": str(corpus), "mode": "index",
                                                   "max_skip_fraction": 0.5})
    result = record(m)
    assert [s.path for s in result.shards("train")] == ["train-000000.tar", "train-000001.tar"]
    assert result.shards("val")[0].samples == 3  # the link is no sample
    lines = [json.loads(line) for line in store.read_text("skipped.jsonl").splitlines()]
    assert [r["kind"] for r in lines] == ["bad image", "damaged shard", "refused"]  # no label: in the damaged one
    assert lines[1]["reason"].endswith("left out of the index (2 samples read before)")
    assert "symbolic link" in lines[2]["reason"]
    # Unusable: the bad image in a kept shard and the 2 samples the damaged shard lost.
    assert (result.inputs, result.samples, result.skipped) == (13, 11, 3)


def test_class_list_from_indices_names_or_classes_json():
    def index(by_index=None, by_name=None, split="train"):
        return ShardIndex("s.tar", split, 1, 1, "", by_index=by_index or {}, by_name=by_name or {})

    assert class_list([index({"0": 2, "2": 1})], None, "c") == (["0", "1", "2"], {"train": {"0": 2, "2": 1}})
    assert class_list([index(by_name={"10": 1, "9": 2})], None, "c")[0] == ["9", "10"]
    names, counts = class_list([index({"1": 2}), index(by_name={"a": 1}, split="val")], ["a", "b"], "c")
    assert names == ["a", "b"] and counts == {"train": {"b": 2}, "val": {"a": 1}}
    with pytest.raises(VitpipeError, match="add a classes.json"):
        class_list([index({"0": 1}, {"a": 1})], None, "c")
    with pytest.raises(VitpipeError, match=r"class indices \[3\] are not in classes.json"):
        class_list([index({"3": 1})], ["a", "b"], "c")


def test_index_mode_needs_a_webdataset_source():
    with pytest.raises(ValueError, match="mode 'index' uses existing webdataset shards in place"):
        IngestParams.model_validate({"source": "imagefolder", "path": "x", "mode": "index"})
