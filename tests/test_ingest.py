"""The ingest stage on a real Ray instance: determinism, bad inputs, resume, S3, interop."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cluster.executor import RayExecutor
from pipeline.config import parse_config
from pipeline.engine import run_pipeline
from pipeline.errors import StageFailedError
from pipeline.manifest import read_manifest
from pipeline.storage import open_storage
from stages.data.images import BadImage, check_image, inspect_image, reencode, to_rgb
from stages.data.listing import Listing, unique_key_order
from stages.data.sources import ImageFolderSource, ListSource, SourceItem, sort_labels
from stages.data.tarshards import ShardTarWriter, iter_tar_samples
from stages.ingest import plan_shards, screen_items
from stages.records import IngestResult

pytestmark = pytest.mark.usefixtures("ray_instance")


def ingest_config(params: dict, name: str = "ing", endpoint: str | None = None) -> dict:
    config = {"name": name, "ray": {"include_dashboard": False},
              "stages": {"ingest": {"type": "ingest", "params": params}}}
    if endpoint:
        config["storage"] = {"endpoint_url": endpoint}
    return config


def run_ingest(uri: str, params: dict, endpoint: str | None = None):
    config = parse_config(ingest_config(params, endpoint=endpoint))
    run_pipeline(config, uri, RayExecutor())
    store = open_storage(uri, config.storage).child("stages/ingest")
    return store, read_manifest(store)


def record(manifest) -> IngestResult:
    """The ingest stage's typed result record, as downstream stages read it."""
    return IngestResult.model_validate(manifest.result)


def as_if_killed(uri: str, store) -> None:
    """What a SIGKILL mid-stage leaves of a finished ingest run: no manifest, the stage recorded as
    running (what the files show besides is up to the caller)."""
    store.delete("manifest.json")
    state_path = Path(uri) / "state.json"
    state = json.loads(state_path.read_text())
    state["stages"]["ingest"]["status"] = "running"
    state_path.write_text(json.dumps(state))


def all_samples(store, manifest) -> dict[str, dict[str, bytes]]:
    found: dict[str, dict[str, bytes]] = {}
    for split in record(manifest).splits.values():
        for shard in split.shards:
            with store.open_read(shard.path) as f:
                for key, files in iter_tar_samples(f):
                    assert key not in found, f"duplicate key {key}"
                    found[key] = files
    return found


# -- pure planning -------------------------------------------------------------------------------

def _item(key, split="train", label="a", size=None, origin=None):
    origin = origin or f"/d/{key}.jpg"
    return SourceItem(key=key, split=split, label=label, locator=origin[len("/d/"):], origin=origin, size=size,
                      filename=origin.rsplit("/", 1)[-1])


def _plans(items, shard_samples, shard_bytes=None, shuffle_seed=None, source=None):
    """Listed as a listing task lists (columns), ordered and cut as the stage does; with items."""
    listing = Listing.of_items(source or ImageFolderSource("/d"), items)
    order, duplicates = unique_key_order(listing)
    assert not len(duplicates)
    return [cut.plan(listing) for cut in plan_shards(listing, order, shard_samples, shard_bytes, shuffle_seed)]


def test_plan_is_sorted_per_split_with_fixed_boundaries():
    items = [_item(f"k{i:02d}", split="val" if i % 4 == 0 else "train") for i in range(20)][::-1]
    plans = _plans(items, shard_samples=6)
    assert [p.name for p in plans] == ["train-000000", "train-000001", "train-000002", "val-000000"]
    assert [len(p.items) for p in plans] == [6, 6, 3, 5]
    assert [i.key for i in plans[0].items] == sorted(i.key for i in plans[0].items)
    by_bytes = _plans([_item(f"k{i}", size=100) for i in range(10)], shard_samples=100, shard_bytes=250)
    assert [len(p.items) for p in by_bytes] == [2, 2, 2, 2, 2]
    uneven = _plans([_item(f"k{i}", size=size) for i, size in enumerate([300, 50, 200, 10, 10, 10, None, 100])],
                    shard_samples=3, shard_bytes=250)
    assert [[i.key for i in p.items] for p in uneven] == [["k0"], ["k1", "k2"], ["k3", "k4", "k5"], ["k6", "k7"]]


def test_shards_of_a_class_sorted_listing_mix_classes_when_shuffled():
    # Ten classes of 20, listed by key (so by class), cut into shards of 20.
    items = [_item(f"c{c}/img{i:02d}", label=str(c)) for c in range(10) for i in range(20)]
    sorted_plans = _plans(items, shard_samples=20)
    assert [len({i.label for i in p.items}) for p in sorted_plans] == [1] * 10  # one class each
    plans = _plans(items, shard_samples=20, shuffle_seed=3)
    assert all(len({i.label for i in p.items}) >= 5 for p in plans), [len({i.label for i in p.items}) for p in plans]
    assert sorted(i.key for p in plans for i in p.items) == sorted(i.key for i in items)  # a permutation
    assert [[i.key for i in p.items] for p in _plans(items[::-1], 20, shuffle_seed=3)] == \
        [[i.key for i in p.items] for p in plans]  # from the keys and the seed alone, not the listing's order
    assert _plans(items, 20, shuffle_seed=4)[0].items != plans[0].items


def test_numeric_labels_keep_numeric_order():
    assert sort_labels({"10", "2", "1"}) == ["1", "2", "10"]
    assert sort_labels({"cat", "10", "2"}) == ["10", "2", "cat"]


def test_screening_records_missing_labels_duplicates_and_non_images():
    kept, skipped = screen_items([_item("a"), _item("a", origin="/d/a.png"), _item("b", label=None),
                                  _item("c", origin="/d/c.txt")])
    assert [i.key for i in kept] == ["a"]
    assert [s["reason"] for s in skipped] == ["duplicate key 'a' (kept /d/a.jpg)", "missing label",
                                              "unsupported file type .txt"]


# -- images ---------------------------------------------------------------------------------------

def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kw)
    return out.getvalue()


def photo(w=40, h=24, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def odd_images() -> dict[str, bytes]:
    rotated = photo(40, 24)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    sixteen = Image.fromarray((np.arange(24 * 40).reshape(24, 40) * 60).astype(np.uint16))
    rgba = Image.new("RGBA", (40, 24), (255, 0, 0, 0))  # fully transparent red
    palette = photo().convert("P", palette=Image.ADAPTIVE, colors=16)
    return {
        "gray.png": encode(photo().convert("L"), "PNG"),
        "cmyk.jpg": encode(photo().convert("CMYK"), "JPEG"),
        "palette.png": encode(palette, "PNG"),
        "alpha.png": encode(rgba, "PNG"),
        "sixteen.png": encode(sixteen, "PNG"),
        "rotated.jpg": encode(rotated, "JPEG", exif=exif.tobytes()),
    }


def bad_images() -> dict[str, tuple[bytes, str]]:
    good = encode(photo(64, 64), "JPEG", quality=90)
    return {
        "truncated.jpg": (good[: len(good) // 2], "corrupt or truncated image"),
        "zero.jpg": (b"", "zero-byte file"),
        "garbage.jpg": (b"\x00\x01 definitely not an image" * 10, "not an image"),
        "vector.jpg": (encode(photo(), "PPM"), "unsupported format PPM"),
    }


def test_odd_but_valid_images_convert_correctly():
    odd = odd_images()
    for data in odd.values():
        check_image(data)  # all valid
    rgb = {name: to_rgb(Image.open(io.BytesIO(data))) for name, data in odd.items()}
    assert all(im.mode == "RGB" for im in rgb.values())
    assert rgb["rotated.jpg"].size == (24, 40)  # EXIF orientation applied
    assert rgb["alpha.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent -> white, not red
    sixteen = np.asarray(rgb["sixteen.png"])[..., 0]
    assert sixteen.min() == 0 and sixteen.max() == 255  # rescaled from 16 bits, not clipped
    data, size = reencode(odd["rotated.jpg"], max_side=12, quality=90)
    assert size == (12, 20) and Image.open(io.BytesIO(data)).format == "JPEG"


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_images_are_rejected_with_a_reason(name):
    data, reason = bad_images()[name]
    with pytest.raises(BadImage, match=reason):
        check_image(data)


def _png_chunks(data: bytes) -> dict[bytes, tuple[int, int]]:
    """{chunk type: (offset of its length field, data length)} (the first of each type)."""
    pos, chunks = 8, {}
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunks.setdefault(data[pos + 4:pos + 8], (pos, length))
        pos += 12 + length
    return chunks


def _png_with_chunk(data: bytes, kind: bytes, change) -> bytes:
    """``data`` with chunk ``kind``'s data changed by ``change`` and its CRC made right again."""
    pos, length = _png_chunks(data)[kind]
    body = bytearray(data[pos + 8:pos + 8 + length])
    change(body)
    chunk = len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    return data[:pos] + chunk + data[pos + 12 + length:]


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def _overwrite(body: bytearray, start: int, count: int) -> None:
    body[start:start + count] = bytes([0x55]) * count


def validation_faults() -> dict[str, tuple[bytes, set[str]]]:
    """Faulty inputs, each with the validation depths that catch it: the README's table."""
    jpg, png, everything = encode(photo(64, 48), "JPEG", quality=90), encode(photo(64, 48), "PNG"), {
        "none", "structure", "decode"}
    idat = _png_chunks(png)[b"IDAT"][0] + 8
    scan = jpg.index(b"\xff\xda") + 20  # inside the entropy-coded data
    return {
        "zero-byte file": (b"", everything),
        "not an image": (b"\x00\x01 definitely not an image" * 10, everything),
        "unsupported format (PPM)": (encode(photo(), "PPM"), everything),
        "more pixels than the limit (15000x15000 PNG header)": (
            _png_with_chunk(png, b"IHDR", lambda b: b.__setitem__(slice(0, 8), (15000).to_bytes(4, "big") * 2)),
            everything),
        "truncated WebP": (encode(photo(), "WEBP")[:-100], everything),  # its header no longer parses
        "truncated JPEG": (jpg[:len(jpg) // 2], {"structure", "decode"}),
        "JPEG without its EOI marker": (jpg[:-2], {"structure", "decode"}),
        "truncated PNG": (png[:len(png) // 2], {"structure", "decode"}),
        "PNG chunk damaged (CRC mismatch)": (_flip(png, idat + 5), {"structure", "decode"}),
        "truncated GIF": (encode(photo(), "GIF")[:-50], {"structure", "decode"}),
        "truncated BMP": (encode(photo(), "BMP")[:-100], {"structure", "decode"}),
        "PNG compressed data damaged, CRC made right": (
            _png_with_chunk(png, b"IDAT", lambda b: _overwrite(b, len(b) // 3, 8)), {"decode"}),
        "truncated TIFF": (encode(photo(), "TIFF")[:-100], {"decode"}),
        "JPEG scan data overwritten, markers intact": (jpg[:scan] + b"\x55" * 40 + jpg[scan + 40:], set()),
    }


@pytest.mark.parametrize("validation", ["none", "structure", "decode"])
def test_each_validation_depth_catches_the_faults_the_readme_lists(validation):
    for name, (data, caught_by) in validation_faults().items():
        if validation in caught_by:
            with pytest.raises(BadImage):
                inspect_image(data, validation)
        else:
            assert inspect_image(data, validation)[2] in {"JPEG", "PNG", "TIFF", "GIF", "BMP"}, name
    for name, data in odd_images().items():  # valid, at every depth
        assert inspect_image(data, validation)[:2] == Image.open(io.BytesIO(data)).size, name
    for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"):
        assert inspect_image(encode(photo(), fmt), validation) == (40, 24, fmt)
    progressive = encode(photo(64, 48), "JPEG", quality=90, progressive=True)  # several scans
    restarts = encode(photo(64, 48), "JPEG", quality=90, restart_marker_blocks=2)  # RSTn inside the scan data
    assert b"\xff\xd0" in restarts
    assert inspect_image(progressive, validation) == inspect_image(restarts, validation) == (64, 48, "JPEG")


def test_validation_defaults_to_structure_and_the_former_switch_keeps_its_meaning():
    from stages.ingest import IngestParams

    assert IngestParams(source="digits").validation == "structure"
    assert IngestParams.model_validate({"source": "digits", "validate": "none"}).validation == "none"
    assert IngestParams.model_validate({"source": "digits", "validate_images": True}).validation == "decode"
    assert IngestParams.model_validate({"source": "digits", "validate_images": False}).validation == "none"


def test_shards_are_written_byte_for_byte_as_tarfile_writes_them():
    samples = [("a/k1", {"jpg": b"x" * 1000, "cls": b"3"}), ("d/" * 10 + "k" * 90, {"json": b"{}"}),
               ("k3", {"png": b"", "txt": b"y" * 512})]
    ours = io.BytesIO()
    with ShardTarWriter(ours) as writer:
        for key, files in samples:
            writer.write(key, files)
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(files[ext]), 0, 0o444, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(files[ext]))
    assert ours.getvalue() == reference.getvalue()


# -- the stage ------------------------------------------------------------------------------------

def test_digits_ingest_is_deterministic_and_readable_by_plain_tools(tmp_path):
    params = {"source": "digits", "image_size": 16, "shard_samples": 250}
    store_a, ma = run_ingest(str(tmp_path / "a"), params)
    store_b, mb = run_ingest(str(tmp_path / "b"), {**params, "workers": 1})
    assert [o.model_dump() for o in ma.outputs] == [o.model_dump() for o in mb.outputs]  # same bytes
    splits = record(ma).splits
    assert {k: v.samples for k, v in splits.items()} == {"train": 1297, "val": 200, "test": 300}
    assert record(ma).classes == [str(d) for d in range(10)] and record(ma).skipped == 0
    assert json.loads(store_a.read_text("classes.json")) == {"classes": [str(d) for d in range(10)]}
    assert sum(splits["train"].class_counts.values()) == 1297

    # plain tarfile
    first = splits["train"].shards[0]
    with tarfile.open(store_a.local_path(first.path)) as tar:
        names = tar.getnames()
    assert len(names) == 3 * first.samples
    triples = [names[i:i + 3] for i in range(0, len(names), 3)]
    keys = [t[0].rsplit(".", 1)[0] for t in triples]
    assert all(t == [f"{k}.cls", f"{k}.json", f"{k}.png"] for k, t in zip(keys, triples))
    assert keys != sorted(keys) and all(k.startswith("digits-") for k in keys)  # a seeded shuffle of the listing
    # plain webdataset
    import webdataset as wds

    urls = [str(store_a.local_path(s.path)) for s in splits["test"].shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 300 and samples[0]["png"].size == (16, 16) and isinstance(samples[0]["cls"], int)
    assert samples[0]["json"]["source"].startswith("sklearn.datasets.load_digits[")
    # Ray Data
    import ray.data

    ds = ray.data.read_webdataset(urls, override_num_blocks=1)
    assert ds.count() == 300


def make_folder(root: Path) -> int:
    """An ImageFolder with train/val splits, odd images, bad inputs; returns the number of inputs."""
    n = 0
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                (d / f"img{i}.jpg").write_bytes(encode(photo(seed=i + 10 * len(cls)), "JPEG"))
                n += 1
    for name, data in odd_images().items():
        (root / "train" / "cat" / name).write_bytes(data)
        n += 1
    for name, (data, _) in bad_images().items():
        (root / "train" / "dog" / name).write_bytes(data)
        n += 1
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "orphan.jpg").write_bytes(encode(photo(), "JPEG"))  # no class folder: no label
    (root / "train" / "cat" / "img0.png").write_bytes(encode(photo(), "PNG"))  # duplicate key of img0.jpg
    return n + 3


def test_imagefolder_with_bad_inputs_skips_with_reasons_and_fails_over_the_limit(tmp_path):
    total = make_folder(tmp_path / "src")
    params = {"source": "imagefolder", "path": str(tmp_path / "src"), "shard_samples": 8, "mode": "reencode",
              "max_side": 16, "max_skip_fraction": 0.5}
    store, manifest = run_ingest(str(tmp_path / "run"), params)
    listed = [json.loads(line) for line in store.read_text("skipped.jsonl").splitlines()]
    reasons = {s["origin"].rsplit("/", 1)[-1]: s["reason"] for s in listed}
    # The manifest keeps the counts by kind and the first records; the file has them all.
    assert manifest.metrics["skipped_by_kind"] == {"bad image": 4, "duplicate key": 1, "missing label": 1,
                                                   "unsupported file type": 1}, manifest.metrics
    assert manifest.metrics["skipped_first"] == listed and manifest.output("skipped.jsonl") is not None
    assert set(reasons) == {"truncated.jpg", "zero.jpg", "garbage.jpg", "vector.jpg", "notes.txt", "orphan.jpg",
                            "img0.png"}
    assert reasons["zero.jpg"] == "zero-byte file" and reasons["orphan.jpg"] == "missing label"
    assert reasons["notes.txt"] == "unsupported file type .txt" and "duplicate key" in reasons["img0.png"]
    assert record(manifest).inputs == total and record(manifest).samples == total - 7
    samples = all_samples(store, manifest)
    assert set(record(manifest).splits) == {"train", "val"}
    rotated = Image.open(io.BytesIO(samples["train/cat/rotated"]["jpg"]))
    assert rotated.size == (16, 27)  # upright (24x40 -> 16x26.7), shorter side 16
    assert all("jpg" in f and f["cls"] in (b"0", b"1") for f in samples.values())

    # Over the limit with what the listing skipped alone: the stage fails before reading an image.
    with pytest.raises(StageFailedError, match=rf"3 of {total} inputs skipped .* above max_skip_fraction=0.01\); "
                                               r"first: .*/orphan.jpg: missing label"):
        run_ingest(str(tmp_path / "strict"), {**params, "max_skip_fraction": 0.01})
    stage = tmp_path / "strict" / "stages" / "ingest"
    assert (stage / "listing").is_dir() and not (stage / "shards").exists()
    # Over it only with the images found bad when written: after the shards.
    with pytest.raises(StageFailedError, match=rf"7 of {total} inputs skipped .* above max_skip_fraction=0.1\)"):
        run_ingest(str(tmp_path / "late"), {**params, "max_skip_fraction": 0.1})


def test_interrupted_ingest_rewrites_only_missing_shards(tmp_path):
    params = {"source": "digits", "image_size": 16, "shard_samples": 200}
    uri = str(tmp_path / "run")
    store, manifest = run_ingest(uri, params)
    shards = [s.path for sp in record(manifest).splits.values() for s in sp.shards]
    # What a SIGKILL mid-ingest leaves: some shards committed (tar + stats), the rest absent, a
    # stray temp file, no manifest, and the stage recorded as running.
    lost = shards[1:4]
    for path in lost:
        store.delete(path)
        store.delete(path.replace(".tar", ".json"))
    (store.local_path("shards") / ".train-000009.tar.tmp-deadbeef").write_bytes(b"partial")
    as_if_killed(uri, store)
    kept_mtimes = {p: store.local_path(p).stat().st_mtime_ns for p in shards if p not in lost}

    store2, manifest2 = run_ingest(uri, params)
    assert {p: store2.local_path(p).stat().st_mtime_ns for p in kept_mtimes} == kept_mtimes  # untouched
    assert [o.model_dump() for o in manifest2.outputs] == [o.model_dump() for o in manifest.outputs]
    keys = all_samples(store2, manifest2)
    assert len(keys) == 1797 and set(keys) == {f"digits-{i:04d}" for i in range(1797)}


def test_a_resumed_ingest_finds_its_finished_shards_with_one_listing_and_one_read_each(tmp_path):
    from pipeline.storage import LocalStorage
    from stages.ingest import ShardPlan, ShardResult, finished_shards

    class Counting(LocalStorage):
        calls: list[str] = []

        def __getattribute__(self, name):
            if name in ("list", "exists", "size", "open_read"):  # each a request on S3 (reads open)
                Counting.calls.append(name)
            return super().__getattribute__(name)

    out = Counting(tmp_path / "stage")
    plans = [ShardPlan(f"train-{n:06d}", "train", []) for n in range(6)]
    digests = {plan.name: f"d{n}" for n, plan in enumerate(plans)}
    for n, plan in enumerate(plans[:4]):  # 0-3 finished; 4 has a tar but no stats (cut); 5 nothing
        out.write_bytes(plan.tar_path, b"x" * (100 + n))
        recorded = 100 + n if n != 2 else 999  # 2: its tar is not the one the stats describe
        digest = digests[plan.name] if n != 3 else "planned from another listing"
        stats = dataclasses.asdict(ShardResult(plan.name, "train", plan.tar_path, 1, recorded, "sha", plan_digest=digest))
        if n == 1:
            stats["keys"] = ["k"]  # written by a version that listed each shard's keys: still finished
        out.write_text(plan.stats_path, json.dumps(stats))
    out.write_bytes(plans[4].tar_path, b"partial")
    Counting.calls.clear()
    found = finished_shards(out, plans, digests)
    assert sorted(found) == ["train-000000", "train-000001"]
    assert sorted(Counting.calls) == ["list"] + ["open_read"] * 4  # one listing; the four stats files found


def _write_lists(folder: Path, rows: list[dict], jsonl_end: str = "\n") -> None:
    """``rows`` as ``list.csv`` and ``list.jsonl`` in ``folder``."""
    with open(folder / "list.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    (folder / "list.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + jsonl_end)


def test_list_sources_and_resharding_other_tools_shards(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    rows = []
    for i in range(6):
        (src / f"p{i}.png").write_bytes(encode(photo(seed=i), "PNG"))
        rows.append({"path": f"imgs/p{i}.png", "label": "even" if i % 2 == 0 else "odd",
                     "split": "val" if i == 5 else "train"})
    rows.append({"path": "imgs/missing.png", "label": "odd", "split": "train"})  # listed, not on disk
    _write_lists(tmp_path, rows)
    for name in ("list.csv", "list.jsonl"):
        _, m = run_ingest(str(tmp_path / f"run-{name}"), {"source": "list", "path": str(tmp_path / name),
                                                           "max_skip_fraction": 0.2})
        assert record(m).samples == 6 and record(m).classes == ["even", "odd"]
        assert [s["reason"] for s in m.metrics["skipped_first"]] == [f"unreadable: {src}/missing.png: no such file"]
        assert {k: v.samples for k, v in record(m).splits.items()} == {"train": 5, "val": 1}

    # img2dataset-style shards written with plain tarfile: KEY.jpg + KEY.txt / KEY.json labels.
    wds_dir = tmp_path / "foreign"
    wds_dir.mkdir()
    with tarfile.open(wds_dir / "00000.tar", "w") as tar:
        for i in range(5):
            members = {f"{i:09d}.jpg": encode(photo(seed=i), "JPEG"),
                       (f"{i:09d}.txt" if i % 2 else f"{i:09d}.json"):
                           (b"zebra" if i % 2 else json.dumps({"label": "horse"}).encode())}
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    store, m = run_ingest(str(tmp_path / "reshard"), {"source": "webdataset", "path": str(wds_dir),
                                                       "shard_samples": 2})
    assert record(m).samples == 5 and record(m).classes == ["horse", "zebra"]
    assert len(record(m).splits["train"].shards) == 3


def test_gif_and_tiff_copied_as_is_are_read_by_the_loader_and_the_evaluation_reader(tmp_path):
    from stages.data.evalset import iter_eval_batches
    from stages.data.loader import ShardLoader
    from stages.data.order import OrderSpec

    src = tmp_path / "src"
    for i, (fmt, ext) in enumerate([("GIF", "gif"), ("TIFF", "tiff"), ("PNG", "png"), ("GIF", "gif"),
                                     ("TIFF", "tif"), ("JPEG", "jpg")]):
        folder = src / "train" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.{ext}").write_bytes(encode(photo(seed=i), fmt))
    store, m = run_ingest(str(tmp_path / "run"), {"source": "imagefolder", "path": str(src), "shard_samples": 2,
                                                   "mode": "copy"})
    members = {k: sorted(f) for k, f in all_samples(store, m).items()}
    assert sorted(e for names in members.values() for e in names if e not in ("cls", "json")) == \
        ["gif", "gif", "jpg", "png", "tiff", "tiff"]  # stored as they came (.tif normalised to .tiff)
    shards = record(m).shards("train")
    batches = list(ShardLoader(store, shards, OrderSpec(0, streams=2), global_batch=2, micro_batch=2, image_size=8))
    assert len(batches) == 3 and all(b["image"].shape == (2, 8, 8, 3) for b in batches)
    assert sorted(k for b in batches for k in b["key"]) == sorted(members)
    skipped: list[dict[str, str]] = []
    keys = [k for b in iter_eval_batches(store, shards, 4, 8, skipped=skipped) for k in b["key"]]
    assert not skipped and sorted(keys) == sorted(members)


def test_ingest_to_and_from_s3_and_resumed_there_from_its_saved_listing(s3_endpoint, s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for cls in ("a", "b"):
        for i in range(4):
            s3.put_object(Bucket=s3_bucket, Key=f"src/{cls}/{i}.jpg", Body=encode(photo(seed=i), "JPEG"))
    uri = f"s3://{s3_bucket}/runs/ing"
    store, m = run_ingest(uri, {"source": "imagefolder", "path": f"s3://{s3_bucket}/src", "shard_samples": 3},
                          endpoint=s3_endpoint)
    assert record(m).samples == 8 and len(record(m).splits["train"].shards) == 3
    assert len(all_samples(store, m)) == 8
    from stages.data.loader import ShardLoader
    from stages.data.order import OrderSpec

    loader = ShardLoader(store, record(m).shards("train"), OrderSpec(0, streams=2), global_batch=4, micro_batch=2,
                         image_size=8, num_workers=1)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == len(set(keys)) == 8

    # Killed after listing: the listing saved on S3 is read back (an object added since is not seen).
    # Once committed, the stage's saved listing is removed: what a killed coordinator would have
    # left is saved again the way it saves it.
    assert store.list("listing") == []
    from pipeline.config import StorageSettings
    from stages.ingest import list_source

    source = ImageFolderSource(f"s3://{s3_bucket}/src", StorageSettings(endpoint_url=s3_endpoint))
    list_source(None, source, 2, saved=store.child("listing"))
    assert any(o.path.endswith(".parquet") for o in store.list("listing"))
    store.delete_prefix("shards")
    store.delete("manifest.json")
    state = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/ing/state.json")["Body"].read())
    state["stages"]["ingest"]["status"] = "running"
    s3.put_object(Bucket=s3_bucket, Key="runs/ing/state.json", Body=json.dumps(state).encode())
    s3.put_object(Bucket=s3_bucket, Key="src/a/9.jpg", Body=encode(photo(seed=9), "JPEG"))
    store2, m2 = run_ingest(uri, {"source": "imagefolder", "path": f"s3://{s3_bucket}/src", "shard_samples": 3},
                            endpoint=s3_endpoint)
    assert record(m2).inputs == 8
    assert [o.model_dump() for o in m2.outputs] == [o.model_dump() for o in m.outputs]


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def test_hostile_tar_members_and_symlinks_are_skipped_with_reasons_never_followed(tmp_path):
    from stages.data.sources import ImageFolderSource, WebDatasetSource

    source = tmp_path / "wds"
    source.mkdir()
    with tarfile.open(source / "train-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        def add(name: str, data: bytes = b"", **fields) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            for key, value in fields.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("ok.jpg", _jpeg(0))
        add("ok.cls", b"1")
        add("sneaky.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add("sneaky.cls", b"1")
        add("twin.jpg", type=tarfile.LNKTYPE, linkname="ok.jpg")
        add("dev.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("../escape.jpg", _jpeg(1))
        add("../escape.cls", b"2")
        add("/abs/path.jpg", _jpeg(2))
    wds_source = WebDatasetSource(str(source))
    kept, skipped = screen_items(wds_source.items())
    assert [item.key for item in kept] == ["ok", "sneaky"]
    read = {item.key: data for item, data in wds_source.read_many(kept)}
    assert read["ok"] == _jpeg(0)
    assert isinstance(read["sneaky"], BadImage)  # its label came without an image: skipped when written
    reasons = sorted(s["reason"] for s in skipped)
    assert reasons == sorted([
        "tar member 'sneaky.jpg' is a symbolic link (not followed)",
        "tar member 'twin.jpg' is a hard link (not followed)",
        "tar member 'dev.jpg' is a device or FIFO entry",
        "tar member '../escape.jpg' has an unsafe path (absolute or with '..')",
        "tar member '../escape.cls' has an unsafe path (absolute or with '..')",
        "tar member '/abs/path.jpg' has an unsafe path (absolute or with '..')",
    ]), reasons

    outside = tmp_path / "secret.jpg"
    outside.write_bytes(_jpeg(3))
    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat/real.jpg").write_bytes(_jpeg(4))
    (folder / "cat/inside.jpg").symlink_to(folder / "cat/real.jpg")  # stays in the folder: fine
    (folder / "cat/leak.jpg").symlink_to(outside)
    kept, skipped = screen_items(ImageFolderSource(str(folder)).items())
    assert sorted(item.key for item in kept) == ["cat/inside", "cat/real"]
    assert skipped == [{"origin": str(folder / "cat/leak.jpg"), "kind": "refused",
                        "reason": "symbolic link leading outside the source folder (not followed)"}]


# -- a Hugging Face-style Parquet source -----------------------------------------------------------

_HF_NAMES = ["cat", "dog", "fish"]


def _write_parquet_dataset(root: Path) -> dict[str, tuple[bytes, str | None]]:
    """Three files as Hugging Face lays them out (row groups of 3): the train files with the
    ``Image`` struct column, the validation file with plain bytes; one row without a label and
    one with bytes that are not an image. Returns {key: (image bytes, class name)} of every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    metadata = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": _HF_NAMES, "_type": "ClassLabel"}}}}).encode()}
    rows, seed = {}, 0
    for name, count, struct in (("train-00000-of-00002", 7, True), ("train-00001-of-00002", 5, True),
                                ("validation-00000-of-00001", 4, False)):
        images, labels = [], []
        for row in range(count):
            data = b"not an image at all" if (name, row) == ("train-00001-of-00002", 4) else encode(
                photo(160, 120, seed=seed), "PNG")  # files past the 64 KiB a Parquet footer read takes
            label = None if (name, row) == ("train-00000-of-00002", 2) else seed % 3
            seed += 1
            images.append({"bytes": data, "path": f"{row}.png"} if struct else data)
            labels.append(label)
            rows[f"data/{name}/{row:09d}"] = (data, None if label is None else _HF_NAMES[label])
        table = pa.table({"image": images, "label": pa.array(labels, pa.int64())}).replace_schema_metadata(metadata)
        (root / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / "data" / f"{name}.parquet", row_group_size=3)
    return rows


def test_a_parquet_dataset_is_listed_by_label_column_and_ingested_row_group_by_row_group(tmp_path):
    from stages.data.parquet_source import ParquetSource
    from stages.data.sources import split_of_path

    assert [split_of_path(p) for p in ("data/train-00000-of-00004.parquet", "validation/0000.parquet",
                                       "x/test_part.parquet", "other.parquet")] == ["train", "val", "test", "train"]
    rows = _write_parquet_dataset(tmp_path / "hf")
    source = ParquetSource(str(tmp_path / "hf"))
    assert source.class_names() == _HF_NAMES
    items = source.items()
    assert {i.key: i.label for i in items} == {key: label for key, (_, label) in rows.items()}
    assert [i.split for i in items] == ["train"] * 12 + ["val"] * 4
    read = dict(source.read_many(items))
    assert all(read[i] == rows[i.key][0] for i in items)

    store, m = run_ingest(str(tmp_path / "run"), {"source": "parquet", "path": str(tmp_path / "hf"),
                                                  "shard_samples": 5, "max_skip_fraction": 0.2})
    result = record(m)
    assert {k: v.samples for k, v in result.splits.items()} == {"train": 10, "val": 4} and result.skipped == 2
    assert result.classes == _HF_NAMES
    samples = all_samples(store, m)
    assert {key: files["png"] for key, files in samples.items()} == {
        key: data for key, (data, label) in rows.items() if label is not None and data.startswith(b"\x89PNG")}
    assert all(result.classes[int(files["cls"])] == rows[key][1] for key, files in samples.items())
    reasons = sorted(json.loads(line)["kind"] for line in store.read_text("skipped.jsonl").splitlines())
    assert reasons == ["bad image", "missing label"]


def test_a_parquet_dataset_on_s3_is_read_by_ranged_gets_through_cuts(tmp_path, s3_endpoint, s3_bucket, monkeypatch):
    from bench.faultproxy import FaultProxy
    from pipeline.config import StorageSettings
    from pipeline.storage import S3Storage
    from stages.data.parquet_source import ParquetSource

    rows = _write_parquet_dataset(tmp_path / "hf")
    bucket = S3Storage(f"s3://{s3_bucket}/hf", endpoint_url=s3_endpoint)
    sizes = {}
    for path in (tmp_path / "hf").rglob("*.parquet"):
        bucket.upload_file(path, path.relative_to(tmp_path / "hf").as_posix())
        sizes[path.relative_to(tmp_path / "hf").as_posix()] = path.stat().st_size
    ranges: list[tuple[str, int, int]] = []
    real_range = S3Storage.read_range

    def recording(self, rel, start, length):
        ranges.append((rel, start, length))
        return real_range(self, rel, start, length)

    def whole(self, rel):
        raise AssertionError(f"{rel} read whole")

    monkeypatch.setattr(S3Storage, "read_range", recording)
    monkeypatch.setattr(S3Storage, "open_read", whole)
    with FaultProxy(s3_endpoint, cut=0.3, seed=5) as proxy:  # cuts 30% of responses mid-body
        source = ParquetSource(bucket.uri, StorageSettings(endpoint_url=proxy.url))
        items = source.items()
        assert {i.key: i.label for i in items} == {key: label for key, (_, label) in rows.items()}
        listed = sum(length for _, _, length in ranges)
        reads = len(ranges)
        assert source.class_names() == _HF_NAMES and len(ranges) == reads  # read once, with the listing
        wanted = [i for i in items if i.locator[:2] == ("data/train-00000-of-00002.parquet", 1)]  # one row group
        assert [data for _, data in source.read_many(wanted)] == [rows[i.key][0] for i in wanted]
    # Listing read footers (pyarrow reads a file's last 64 KiB) and label columns, not the images;
    # reading one row group of three images: its file's footer and those images, not the other four.
    assert listed < sum(sizes.values()) / 2, (listed, sizes)
    images = sum(len(rows[i.key][0]) for i in wanted)
    assert sum(length for _, _, length in ranges) - listed <= 64 * 1024 + images + 1024


def _tree(put) -> None:
    """An ImageFolder by split with loose files at every level and a folder name that sorts
    differently from its paths ("a" / "a-b": '-' sorts before '/')."""
    for path in ("train/a/1.jpg", "train/a/x/2.jpg", "train/a-b/3.jpg", "train/b/4.jpg", "train/loose.jpg",
                 "val/a/5.jpg", "val/b/6.jpg", "top.jpg"):
        put(path, path.encode())


def test_a_tree_lists_level_by_level_and_in_parts_as_in_one_listing(tmp_path, s3_endpoint, s3_bucket):
    from pipeline.config import StorageSettings
    from pipeline.storage import Storage
    from stages.data.sources import ImageFolderSource, ListingPart

    local = tmp_path / "tree"
    _tree(lambda path, data: (local / path).parent.mkdir(parents=True, exist_ok=True) or (local / path).write_bytes(data))
    (local / "train" / ".b.jpg.tmp-123").write_bytes(b"uncommitted")
    (local / "linked").symlink_to(local / "train")  # a linked folder: not listed, as list() does not walk it
    settings = StorageSettings(endpoint_url=s3_endpoint)
    s3 = open_storage(f"s3://{s3_bucket}/tree", settings)
    _tree(s3.write_bytes)
    for root, store in ((str(local), open_storage(str(local))), (s3.uri, s3)):
        for prefix in ("", "train", "train/a"):
            assert store.list_level(prefix) == Storage.list_level(store, prefix), (root, prefix)  # = from list()
        folders, files = store.list_level("train")
        assert folders == ["a", "a-b", "b"] and [(o.path, o.size) for o in files] == [("train/loose.jpg", 15)]
        if not root.startswith("s3://"):
            (local / "lost+found").mkdir()  # an empty folder beside the splits: they stay split folders
        source = ImageFolderSource(root, settings if root.startswith("s3://") else None)
        parts = source.parts()
        assert parts == [ListingPart("", recursive=False, by_split=True),
                         ListingPart("train", recursive=False, by_split=True),
                         ListingPart("train/a-b", by_split=True), ListingPart("train/a", by_split=True),
                         ListingPart("train/b", by_split=True), ListingPart("val/a", by_split=True),
                         ListingPart("val/b", by_split=True)]
        joined = [item for part in parts for item in source.items_of(part)]
        whole = source.items()
        assert sorted(joined, key=lambda i: i.origin) == whole  # the same items; in part order
        assert [i.locator for i in joined if i.split == "train"] == [
            "train/loose.jpg", "train/a-b/3.jpg", "train/a/1.jpg", "train/a/x/2.jpg", "train/b/4.jpg"]



def test_every_source_s_items_come_back_whole_from_the_listing_columns(tmp_path):
    """The coordinator keeps a listing as columns, not items: the items each source lists (kept
    by screening) are made again from them exactly — locators, origins, sizes, file names — odd
    names (cleaned keys) included."""
    from stages.data.parquet_source import ParquetSource
    from stages.data.sources import DigitsSource, ListSource, WebDatasetSource

    folder = tmp_path / "folder"
    for rel in ("cat/a.jpg", "cat/b.JPEG", "cat/odd name.v2.png", "dog/x.jpg", "dog/notes.txt", "loose.jpg"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"x" * len(rel))
    (tmp_path / "list.csv").write_text("path,label,split\nfolder/cat/a.jpg,cat,train\n"
                                       f"{folder}/dog/x.jpg,dog,val\ns3://bucket/p q/r.png,dog,test\n")
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "train-0.tar", "w") as tar:
        for member, data in (("a.b/k 1.jpg", _jpeg(0)), ("a.b/k 1.cls", b"1"), ("plain.jpg", _jpeg(1)),
                             ("plain.txt", b"zebra")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    _write_parquet_dataset(tmp_path / "hf")
    sources = [ImageFolderSource(str(folder)), ListSource(str(tmp_path / "list.csv")), WebDatasetSource(str(shards)),
               ParquetSource(str(tmp_path / "hf")), DigitsSource()]
    for source in sources:
        items = source.items()
        kept, _ = screen_items(items)
        listing = Listing.of_items(source, items)
        assert listing.inputs == len(items) and len(listing) == len(kept) > 0, type(source).__name__
        assert listing.items(range(len(listing))) == kept, type(source).__name__
    assert {i.origin for i in sources[2].items()} >= {f"{shards}/train-0.tar#a.b/k 1", f"{shards}/train-0.tar#plain"}


def test_a_listing_joined_in_batches_gives_the_items_of_any_rows(monkeypatch):
    """Chunks are joined in batches (each copied out of its transport bytes): rows taken across
    batches, in any order, are the items listed there; labels and splits of every batch share one
    dictionary."""
    from stages.data import listing as listing_module
    from stages.data.listing import ListingBuilder, encode_chunk

    monkeypatch.setattr(listing_module, "_COMBINE_BYTES", 1)  # a batch per chunk
    source = ImageFolderSource("/d")
    parts = [[_item(f"{c}/{i}", label=c, split=("val" if i == 0 else "train"), size=i) for i in range(4)]
             for c in ("x", "y", "z")]
    builder = ListingBuilder(source)
    for part in parts:
        builder.add(encode_chunk(source, part))
    listing = builder.finish()
    assert listing.table.column("key").num_chunks == 3 and listing.inputs == 12
    every = [item for part in parts for item in part]
    rows = np.random.default_rng(0).permutation(12)
    assert listing.items(rows) == [every[r] for r in rows]
    assert listing.rows(rows[:5]).items(source) == [every[r] for r in rows[:5]]  # as a writing task makes them
    codes, labels = listing.codes("label")
    assert [labels[c] for c in codes] == [item.label for item in every]
    assert list(listing.sizes(rows)) == [every[r].size for r in rows]


def _mapped_file(address: int) -> str:
    """The file mapped at ``address`` in this process (``/proc/self/maps``), its random part cut."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)  # address range, permissions, offset, device, inode, path
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return re.sub(r"-\w+\.arrow", "", fields[5].strip() if len(fields) > 5 else "")
    return ""


def test_a_spilled_listing_holds_its_columns_in_mapped_files_not_the_heap(monkeypatch, tmp_path):
    """With a spill folder each joined batch (and a batch read back on resume) moves out of Arrow's
    heap into a memory-mapped file, unlinked at once: the listing reads as before, the heap does
    not grow with its columns, and nothing is left in the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.data import listing as listing_module
    from stages.data.listing import ListingBatch, ListingBuilder, encode_chunk

    monkeypatch.setattr(listing_module, "_COMBINE_BYTES", 1)  # a batch per chunk: dictionaries unified at the end
    written, write = [], listing_module._write_ipc

    def write_into_an_unlinked_file(table, sink):  # a kill mid-write leaves nothing in the folder either
        if not isinstance(sink, pa.BufferOutputStream):  # a spill, not a chunk for transport
            written.append(os.listdir(spill_dir))
        write(table, sink)

    monkeypatch.setattr(listing_module, "_write_ipc", write_into_an_unlinked_file)
    source = ImageFolderSource("/d")
    parts = [[_item(f"c{c}/img_{i:06d}", label=f"c{c}", size=i) for i in range(3000)] for c in range(4)]
    chunks = [encode_chunk(source, part) for part in parts]
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    first = ListingBuilder(source)  # what a resumed ingest reads back: the first batch, saved as Parquet
    first.add(chunks[0])
    saved = pa.BufferOutputStream()
    pq.write_table(first.finish().table, saved)
    before = pa.total_allocated_bytes()
    builder = ListingBuilder(source, spill_dir=str(spill_dir))
    builder.add_batch(ListingBatch(0, 1, pq.read_table(saved.getvalue()).combine_chunks(), [], 3000))
    for chunk in chunks[1:]:
        builder.add(chunk)
    listing = builder.finish()
    grown = pa.total_allocated_bytes() - before
    assert grown < listing.table.column("key").nbytes // 2, (grown, listing.table.nbytes)  # dictionary codes only
    keys = listing.table.column("key").chunks
    assert len(keys) == 4 and not list(spill_dir.iterdir()) and written == [[]] * 4
    assert {_mapped_file(chunk.buffers()[2].address) for chunk in keys} == {f"{spill_dir}/vitpipe-listing (deleted)"}
    every = [item for part in parts for item in part]
    rows = np.random.default_rng(0).permutation(len(every))[:500]
    assert listing.items(rows) == [every[r] for r in rows]
    assert len(listing) == listing.inputs == 12000


def test_a_spill_folder_in_memory_is_named_in_a_warning(caplog):
    """The file system a folder is on: the longest mount point holding it. Spilling to a tmpfs
    (a RAM-backed /tmp) would save no memory, so it is warned of."""
    from stages.data.listing import ListingBuilder, filesystem_type

    mounts = ("/dev/sda1 / ext4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n/dev/nvme0n1 /tmp/scratch xfs rw 0 0\n"
              "tmpfs /mnt/my\\040disk tmpfs rw 0 0\n")
    assert [filesystem_type(path, mounts) for path in ("/tmp", "/tmp/x", "/tmp/scratch/y", "/tmpfoo", "/mnt/my disk/z")] \
        == ["tmpfs", "tmpfs", "xfs", "ext4", "tmpfs"]
    ListingBuilder(ImageFolderSource("/d"), spill_dir="/dev/shm")  # a tmpfs on Linux
    assert "/dev/shm is on tmpfs (memory)" in caplog.text
    caplog.clear()
    ListingBuilder(ImageFolderSource("/d"), spill_dir=os.path.dirname(os.path.abspath(__file__)))
    assert "memory" not in caplog.text


def test_a_shard_digest_follows_its_rows_content_not_how_the_listing_is_held(monkeypatch):
    """A resumed ingest keeps a finished shard when its digest matches: the same rows give the
    same digest however the listing was batched; another source path, class index or setting
    gives another."""
    from stages.data import listing as listing_module
    from stages.data.listing import ListingBuilder, encode_chunk
    from stages.ingest import ShardCut, plan_digests

    source = ImageFolderSource("/d")
    items = [_item(f"c/{i}", label="c" if i % 2 else "b") for i in range(6)] + [_item("c/odd", origin="/d/c/odd name.jpg")]

    def digest(items, class_index=None, settings=("copy",), batch_bytes=None, rows=(6, 1, 2)):
        if batch_bytes is not None:
            monkeypatch.setattr(listing_module, "_COMBINE_BYTES", batch_bytes)
        builder = ListingBuilder(source)
        for start in (0, 3, 5):
            builder.add(encode_chunk(source, items[start:{0: 3, 3: 5, 5: 7}[start]]))
        cut = ShardCut("train-000000", "train", np.array(rows, dtype=np.uint32))
        return plan_digests(builder.finish(), [cut], class_index or {"b": 0, "c": 1}, settings)["train-000000"]

    one_batch = digest(items)
    assert digest(items, batch_bytes=1) == one_batch  # three batches: the same
    assert digest(items, {"b": 1, "c": 0}) != one_batch
    assert digest(items, settings=("reencode",)) != one_batch
    assert digest(items, rows=(6, 2, 1)) != one_batch
    moved = items[:6] + [_item("c/odd", origin="/d/c/odd-name.jpg")]  # same key, another file
    assert digest(moved) != one_batch


def test_a_large_list_file_is_listed_in_byte_ranges_as_in_one_go(tmp_path, monkeypatch):
    """Each part takes the lines that begin in its byte range: whatever the cut (mid-line, at a
    line's start, inside the header), the joined parts are the one-go listing; so is the listing
    through Ray tasks."""
    from stages.data import sources
    from stages.data.sources import ListSource
    from stages.ingest import list_source

    rows = [{"path": f"img/{c}/{i}.jpg", "label": c, "split": "val" if i == 3 else "train"}
            for c in ("cat", "dog") for i in range(5)]
    _write_lists(tmp_path, rows, "\n\n")
    for name in ("list.csv", "list.jsonl"):
        whole = ListSource(str(tmp_path / name)).items()
        assert [i.origin for i in whole] == [f"{tmp_path}/{r['path']}" for r in rows]
        size = (tmp_path / name).stat().st_size
        for part_bytes in (1, 2, 3, 7, 22, 23, 24, size - 1):
            monkeypatch.setattr(sources, "LIST_PART_BYTES", part_bytes)
            source = ListSource(str(tmp_path / name))
            parts = source.parts()
            assert len(parts) == -(-size // part_bytes)
            assert [item for part in parts for item in source.items_of(part)] == whole, (name, part_bytes)
        monkeypatch.setattr(sources, "LIST_PART_BYTES", 40)
        source = ListSource(str(tmp_path / name))
        assert list_source(None, source, 2).items(range(10)) == whole


def test_a_key_listed_in_two_parts_is_kept_once_with_a_reason(tmp_path):
    """Class folders are listed by separate tasks; two folders whose names clean to one key
    (``a b`` and ``a_b``) give one key twice: the first in listing order is kept."""
    from stages.data.sources import ImageFolderSource
    from stages.ingest import list_source

    root = tmp_path / "classes"
    for rel in ("a b/q.jpg", "a b/r.jpg", "a_b/q.jpg", "c/q.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    source = ImageFolderSource(str(root))
    assert len(source.parts()) == 3
    listing = list_source(None, source, 2)
    order, duplicates = unique_key_order(listing)
    assert [listing.items([row])[0].origin for row in order] == [f"{root}/a b/q.jpg", f"{root}/a b/r.jpg",
                                                                    f"{root}/c/q.jpg"]
    assert list(duplicates.records()) == [{"origin": f"{root}/a_b/q.jpg", "kind": "duplicate key",
                           "reason": f"duplicate key 'a_b/q' (kept {root}/a b/q.jpg)"}]


@pytest.mark.parametrize("window", [1, 2, 1 << 16])
def test_keys_repeated_across_parts_each_name_the_first_kept_in_listing_order(monkeypatch, window):
    from stages.data import listing as listing_module
    from stages.data.listing import ListingBuilder, encode_chunk

    monkeypatch.setattr(listing_module, "_DUPLICATE_WINDOW", window)  # keys compared this many at a time
    source = ImageFolderSource("/d")
    builder = ListingBuilder(source)
    for part, keys in enumerate((["b", "a"], ["b", "c"], ["a", "b"])):
        builder.add(encode_chunk(source, [_item(key, origin=f"/d/{key}{part}.jpg") for key in keys]))
    listing = builder.finish()
    order, duplicates = unique_key_order(listing)
    assert [listing.items([row])[0].origin for row in order] == ["/d/a0.jpg", "/d/b0.jpg", "/d/c1.jpg"]
    assert [(d["origin"], d["reason"]) for d in duplicates.records()] == [
        ("/d/a2.jpg", "duplicate key 'a' (kept /d/a0.jpg)"), ("/d/b1.jpg", "duplicate key 'b' (kept /d/b0.jpg)"),
        ("/d/b2.jpg", "duplicate key 'b' (kept /d/b0.jpg)")]


def test_a_shard_writer_reads_only_its_own_samples_of_each_source_shard(tmp_path):
    from pipeline.storage import LocalStorage
    from stages.data.sources import WebDatasetSource

    class Counting(LocalStorage):
        read = 0
        ranged = False

        def open_read(self, rel):
            Counting.read += 0 if Counting.ranged else self.size(rel)
            return super().open_read(rel)

        def open_range(self, rel, start, end):
            Counting.read += end - start
            Counting.ranged = True  # its open_read
            try:
                return super().open_range(rel, start, end)
            finally:
                Counting.ranged = False

    root, images = tmp_path / "wds", {}
    root.mkdir()
    for shard in range(2):
        with tarfile.open(root / f"train-{shard:06d}.tar", "w", format=tarfile.PAX_FORMAT) as tar:
            for i in range(10):
                key = f"s{shard}-{i:02d}" + ("x" * 120 if i == 3 else "")  # a long name (extended header) opens a range
                images[key] = _jpeg(shard * 10 + i)
                for ext, data in (("jpg", images[key]), ("cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    source = WebDatasetSource(str(root))
    source._storage = Counting(root)
    plans = _plans(source.items(), shard_samples=3, source=source)
    Counting.read = 0
    got = {item.key: data for plan in plans for item, data in source.read_many(plan.items)}
    assert got == images  # every sample's bytes, the long-named one included
    corpus = sum(p.stat().st_size for p in root.iterdir())
    # Seven shards of <= 3 samples: each source byte read once (the two end markers and record
    # padding not at all); whole source shards per writing task would read 3.5 shards' worth.
    assert Counting.read <= corpus, (Counting.read, corpus)


def test_a_listing_that_will_not_fit_in_memory_fails_early_in_one_line(tmp_path):
    from pipeline.errors import VitpipeError
    from stages.data.sources import ImageFolderSource
    from stages.ingest import (
        PLANNING_OVERHEAD,
        SPILLED_PLANNING_OVERHEAD,
        _list_part,
        check_listing_fits,
        list_source,
    )

    check_listing_fits(1000, 10, 300, int(30_000 * PLANNING_OVERHEAD), "s3://b/c")  # exactly fits
    with pytest.raises(VitpipeError, match=r"^s3://b/c: the listing, projected from 10 of 300 parts, needs ~0.0 GB "
                                           r"in the ingest coordinator"):
        check_listing_fits(1000, 10, 300, int(30_000 * PLANNING_OVERHEAD) - 1, "s3://b/c")
    # Spilled: the heap needs less, and the rest of the columns (29,000 bytes more) must fit on disk.
    check_listing_fits(1000, 10, 300, int(30_000 * SPILLED_PLANNING_OVERHEAD), "s3://b/c", spill_free=29_000)
    with pytest.raises(VitpipeError, match=r"needs ~0.0 GB in the ingest coordinator"):
        check_listing_fits(1000, 10, 300, int(30_000 * SPILLED_PLANNING_OVERHEAD) - 1, "s3://b/c", spill_free=29_000)
    with pytest.raises(VitpipeError, match=r"^s3://b/c: the listing, projected from 10 of 300 parts, needs ~0.0 GB "
                                           r"more of local disk .* point TMPDIR at a larger local disk"):
        check_listing_fits(1000, 10, 300, 10**9, "s3://b/c", spill_free=28_999)
    root = tmp_path / "classes"
    for c in range(20):  # 20 class folders of 3: the first check comes after the 16th part
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(3):
            (root / f"c{c:02d}" / f"{i}.jpg").write_bytes(b"x")
    source = ImageFolderSource(str(root))
    part_bytes = len(_list_part(source, source.parts()[0]).data)  # every part's columns are the same size
    whole = int(20 * part_bytes * PLANNING_OVERHEAD)
    assert len(list_source(None, source, 2, available_bytes=whole)) == 60
    with pytest.raises(VitpipeError, match=r"projected from 16 of 20 parts"):
        list_source(None, source, 2, available_bytes=whole - 1)
    spilled = int(20 * part_bytes * SPILLED_PLANNING_OVERHEAD)  # the columns out of the heap: it needs less
    assert len(list_source(None, source, 2, available_bytes=spilled, spill_dir=str(tmp_path))) == 60
    with pytest.raises(VitpipeError, match=r"projected from 16 of 20 parts"):
        list_source(None, source, 2, available_bytes=spilled - 1, spill_dir=str(tmp_path))


class _FailingFolderSource(ImageFolderSource):
    """An ImageFolder whose listing of one class folder fails (a lost node, a LIST out of retries)."""

    fail_at: str | None = None

    def items_of(self, part):
        if part.path == self.fail_at:
            raise OSError(f"{part.path}: listing failed")
        return super().items_of(part)


def _folder_corpus(root: Path, classes: int, per_class: int) -> None:
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / f"c{c:02d}" / f"{i}.jpg").write_bytes(b"x" * (i + 1))


def _listed(listing) -> list[tuple]:
    return sorted(zip(*(listing.table.column(n).to_pylist() for n in ("key", "label", "size", "ext")), strict=True))


def test_a_failed_listing_is_resumed_from_its_saved_batches_listing_only_the_rest(tmp_path, monkeypatch, caplog):
    from pipeline.storage import LocalStorage
    from stages.data import listing as listing_module
    from stages.data.saved_listing import SavedListing
    from stages.ingest import _list_part, list_source

    root, saved = tmp_path / "classes", LocalStorage(tmp_path / "saved")
    _folder_corpus(root, 12, 2)
    source = _FailingFolderSource(str(root))
    part_bytes = len(_list_part(source, source.parts()[0]).data)  # every part's columns are the same size
    monkeypatch.setattr(listing_module, "_COMBINE_BYTES", 3 * part_bytes)  # batches (saves) of three parts
    source.fail_at = "c07"
    with pytest.raises(Exception, match="c07: listing failed"):  # one task at a time: parts 0-6 listed first
        list_source(None, source, 1, saved=saved)
    parts = source.parts()
    batches = list(SavedListing(saved, source, parts).start(resume=True))
    # Parts 0-2 and 3-5 saved as batches; part 6, joined but not yet in a batch, saved at the failure.
    assert [(b.first_part, b.end_part) for b in batches] == [(0, 3), (3, 6), (6, 7)]
    assert sum(len(b.table) for b in batches) == 14
    reads = []  # read back one at a time, as the coordinator spills each: never the whole listing in the heap
    with monkeypatch.context() as patch:
        patch.setattr(SavedListing, "_read", lambda self, first, end: reads.append(first) or batches[len(reads) - 1])
        reading = SavedListing(saved, source, parts).start(resume=True)
        assert reads == [] and next(reading).end_part == 3 and reads == [0]
        assert [b.end_part for b in reading] == [6, 7] and reads == [0, 3, 6]

    (root / "c00" / "new.jpg").write_bytes(b"new")  # in a saved part: not seen when resumed
    (root / "c09" / "new.jpg").write_bytes(b"new")  # in a part still to list: seen
    source.fail_at = None
    resumed = list_source(None, source, 2, saved=saved, resume=True)
    assert resumed.inputs == 25 and "c09/new" in resumed.table.column("key").to_pylist()
    (root / "c00" / "new.jpg").unlink()
    assert _listed(resumed) == _listed(list_source(None, ImageFolderSource(str(root)), 2))  # as one listing

    # A saved batch that cannot be read ends what is read back: from there on, listed again.
    damaged = sorted(saved.local_path().glob("parts-*.parquet"))[3]
    damaged.write_bytes(b"not parquet")
    (root / "c00" / "unseen.jpg").write_bytes(b"x")  # before the damage: read back, so not seen
    (root / "c11" / "late.jpg").write_bytes(b"late")  # after it
    again = list_source(None, source, 2, saved=saved, resume=True)
    keys = again.table.column("key").to_pylist()
    assert "c11/late" in keys and "c00/unseen" not in keys and again.inputs == 26
    assert "unreadable" in caplog.text
    sorted(saved.local_path().glob("parts-*.skipped.jsonl"))[1].unlink()  # a batch without its skip records
    again = list_source(None, source, 2, saved=saved, resume=True)
    assert again.inputs == 26 and "c00/unseen" not in again.table.column("key").to_pylist()

    (root / "c12").mkdir()  # another class folder: the parts changed, so everything is listed again
    (root / "c12" / "0.jpg").write_bytes(b"x")
    changed = list_source(None, source, 2, saved=saved, resume=True)
    assert changed.inputs == 28 and "c00/unseen" in changed.table.column("key").to_pylist()
    assert "parts changed since the listing was saved" in caplog.text


def test_a_resumed_ingest_reads_its_listing_back_and_writes_the_same_shards(tmp_path):
    from stages.ingest import list_source

    root = tmp_path / "classes"
    _folder_corpus(root, 4, 3)
    for path in root.rglob("*.jpg"):
        path.write_bytes(_jpeg(len(path.name) + int(path.parent.name[1:])))
    params = {"source": "imagefolder", "path": str(root), "shard_samples": 5}
    uri = str(tmp_path / "run")
    store, manifest = run_ingest(uri, params)
    assert not store.local_path("listing").exists()  # committed: the saved listing is no longer needed
    # What a coordinator that died after listing leaves: the saved listing (saved here the way it
    # saves it), no shard, no manifest.
    list_source(None, ImageFolderSource(str(root)), 2, saved=store.child("listing"))
    assert sorted(p.name for p in store.local_path("listing").iterdir())[-1] == "parts.json"
    store.delete_prefix("shards")
    as_if_killed(uri, store)
    (root / "c01" / "added.jpg").write_bytes(_jpeg(99))  # listed again, it would change every shard

    store2, manifest2 = run_ingest(uri, params)
    assert record(manifest2).inputs == 12
    assert [o.model_dump() for o in manifest2.outputs] == [o.model_dump() for o in manifest.outputs]
    # Both times the coordinator moved the listing's columns out of its heap, to its temporary folder.
    assert [m.metrics["listing"]["spilled_to"] for m in (manifest, manifest2)] == [tempfile.gettempdir()] * 2


def test_mode_copy_reads_each_image_of_a_local_webdataset_source_once(tmp_path):
    """Listing a local source shard reads its headers and label members, seeking over the images;
    writing the new shards reads each sample's span once: ~1x the corpus, where reading it whole
    to list it, then the spans again, was ~2x."""
    import os

    from pipeline.storage import LocalStorage
    from stages.data.sources import WebDatasetSource

    class CountingFile(io.FileIO):
        read = 0

        def readinto(self, buffer):
            n = super().readinto(buffer)
            CountingFile.read += n or 0
            return n

    class Counting(LocalStorage):
        def open_read(self, rel):  # what the disk is asked for: the buffer's reads
            return io.BufferedReader(CountingFile(self.local_path(rel)))

    root, rng = tmp_path / "wds", np.random.default_rng(0)
    root.mkdir()
    for shard in range(2):
        with tarfile.open(root / f"train-{shard:06d}.tar", "w") as tar:
            for i in range(10):
                for ext, data in (("cls", str(i % 3).encode()), ("jpg", rng.bytes(64_000))):
                    info = tarfile.TarInfo(f"s{shard}-{i:02d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    corpus = sum(os.path.getsize(p) for p in root.iterdir())
    source = WebDatasetSource(str(root))
    source._storage = Counting(root)
    items = source.items()
    listed, CountingFile.read = CountingFile.read, 0
    assert [item.label for item in items] == [str(i % 3) for _ in range(2) for i in range(10)]
    # A buffer's worth (from each sample's first header: its .cls, the .jpg's header) a sample.
    assert listed <= 20 * io.DEFAULT_BUFFER_SIZE + 2 * tarfile.RECORDSIZE < corpus / 3, (listed, corpus)
    got = {item.key: data for plan in _plans(items, shard_samples=4, source=source)
           for item, data in source.read_many(plan.items)}
    assert len(got) == 20 and all(len(data) == 64_000 for data in got.values())
    assert CountingFile.read <= corpus, (CountingFile.read, corpus)


def _source_shard(samples: list[tuple[str, int, bytes]]) -> bytes:
    """A webdataset tar of (key, class index, image bytes) samples."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, cls, image in samples:
            for ext, data in (("cls", str(cls).encode()), ("jpg", image)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_mode_copy_reads_each_source_shard_on_s3_once_and_writes_the_same_shards(tmp_path, s3_endpoint, s3_bucket):
    """Listing a source shard on S3 streams all of it; what it streams is kept on the node's disk
    and the writing tasks read their samples from there: each source object's bytes come through
    S3 exactly once, where without the copies they came twice — the same shards either way, and
    no copy left on the disk after."""
    import boto3

    from bench.faultproxy import FaultProxy
    from stages.data.shard_cache import ShardCache

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    sizes = {}
    for shard in range(3):
        body = _source_shard([(f"s{shard}-{i}", i % 3, _jpeg(10 * shard + i)) for i in range(7)])
        s3.put_object(Bucket=s3_bucket, Key=f"src/train-{shard:06d}.tar", Body=body)
        sizes[f"/{s3_bucket}/src/train-{shard:06d}.tar"] = len(body)
    params = {"source": "webdataset", "path": f"s3://{s3_bucket}/src", "shard_samples": 5}  # cuts across shards
    # Without room for copies (none made), and with a wrong copy an earlier ingest left in the folder:
    # removed at the start, never read.
    stale = ShardCache.for_stage(f"s3://{s3_bucket}/runs/twice/stages/ingest")
    os.makedirs(stale.root, exist_ok=True)
    Path(stale.root, ShardCache.name_of("train-000000.tar")).write_bytes(
        _source_shard([(f"s0-{i}", 2, _jpeg(90 + i)) for i in range(7)]))
    with FaultProxy(s3_endpoint) as proxy:
        store0, m0 = run_ingest(f"s3://{s3_bucket}/runs/twice", {**params, "cache_keep_free": 1.0}, endpoint=proxy.url)
        read_twice = {path: proxy.object_bytes[path] for path in sizes}
        proxy.object_bytes.clear()
        store, m = run_ingest(f"s3://{s3_bucket}/runs/once", params, endpoint=proxy.url)
        read_once = {path: proxy.object_bytes[path] for path in sizes}
    assert read_once == sizes, (read_once, sizes)
    assert all(read_twice[path] > 1.5 * size for path, size in sizes.items()), (read_twice, sizes)  # the baseline
    assert record(m).samples == 21 and len(record(m).splits["train"].shards) == 5 and len(m.outputs) == len(m0.outputs)
    assert [(o.path, o.sha256) for o in m.outputs] == [(o.path, o.sha256) for o in m0.outputs]
    assert m.metrics["source_cache"]["copies"] == m.metrics["source_cache"]["shards"] == 3
    assert m0.metrics["source_cache"]["copies"] == 0 and not Path(stale.root).exists()
    cache = ShardCache.for_stage(store.uri)
    assert not Path(cache.root).exists()

    # Killed after listing: the saved listing and the copies made while listing are what it left.
    # The resumed ingest writes every shard from those copies: no byte of the source read again.
    from pipeline.config import StorageSettings
    from stages.data.sources import WebDatasetSource
    from stages.ingest import list_source

    direct = StorageSettings(endpoint_url=s3_endpoint)  # not through the proxy, stopped since
    store = open_storage(store.uri, direct)
    source = WebDatasetSource(params["path"], direct)
    source.cache = cache
    list_source(None, source, 2, saved=store.child("listing"))
    assert len(cache.held()) == 3
    store.delete_prefix("shards")
    store.delete("manifest.json")
    state = json.loads(s3.get_object(Bucket=s3_bucket, Key="runs/once/state.json")["Body"].read())
    state["stages"]["ingest"]["status"] = "running"
    s3.put_object(Bucket=s3_bucket, Key="runs/once/state.json", Body=json.dumps(state).encode())
    with FaultProxy(s3_endpoint) as proxy:
        _, m2 = run_ingest(f"s3://{s3_bucket}/runs/once", params, endpoint=proxy.url)
        assert {path: proxy.object_bytes[path] for path in sizes} == dict.fromkeys(sizes, 0)
    assert [(o.path, o.sha256) for o in m2.outputs] == [(o.path, o.sha256) for o in m.outputs]
    assert not Path(cache.root).exists()


def test_an_ingest_that_fails_while_listing_leaves_no_copy_on_the_disk(s3_endpoint, s3_bucket):
    import boto3

    from bench.faultproxy import FaultProxy
    from stages.data.shard_cache import ShardCache

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    sizes = {}
    for shard in range(3):
        body = _source_shard([(f"s{shard}-{i}", i, _jpeg(i)) for i in range(3)])
        s3.put_object(Bucket=s3_bucket, Key=f"src/train-{shard:06d}.tar", Body=body)
        sizes[f"/{s3_bucket}/src/train-{shard:06d}.tar"] = len(body)
    # One listing task at a time: the first two shards are listed (and kept) before the third fails.
    params = {"source": "webdataset", "path": f"s3://{s3_bucket}/src", "workers": 1}
    with FaultProxy(s3_endpoint, permanent="train-000002") as proxy:
        config = parse_config({**ingest_config(params),
                               "storage": {"endpoint_url": proxy.url, "read_retries": 1, "read_timeout_s": 0.5}})
        with pytest.raises(StageFailedError, match="train-000002.tar: reading failed 2 times in a row"):
            run_pipeline(config, f"s3://{s3_bucket}/runs/failed", RayExecutor())
    assert proxy.counts["permanent"] == 2
    assert [proxy.object_bytes[path] for path in list(sizes)[:2]] == list(sizes.values())[:2]
    assert not Path(ShardCache.for_stage(f"s3://{s3_bucket}/runs/failed/stages/ingest").root).exists()


def test_a_source_shard_copy_is_kept_only_whole_and_only_with_room():
    from stages.data.shard_cache import ShardCache

    body = bytes(range(256)) * 400
    with tempfile.TemporaryDirectory() as parent:
        cache, folder = ShardCache("t", parent, keep_free=0.0), os.path.join(parent, "t")
        with cache.tee(io.BytesIO(body), "a/x.tar", len(body)) as f:
            assert f.read(1000) == body[:1000]  # the rest is read through when the block ends
        assert cache.held() == [ShardCache.name_of("a/x.tar")]
        with cache.open_range("a/x.tar", 5000, 7000) as f:
            assert f.read() == body[5000:7000]
        assert cache.open_range("b.tar", 0, 10) is None

        with pytest.raises(OSError), cache.tee(io.BytesIO(body), "b.tar", len(body)) as f:
            f.read(3000)
            raise OSError("connection reset, out of retries")  # a listing task failing mid-shard
        with cache.tee(io.BytesIO(body[:-1]), "c.tar", len(body)) as f:  # an object shorter than listed
            f.read()

        damaged = io.BytesIO(body + bytes(4 << 20))  # megabytes after the samples (the rest of a damaged shard)
        with cache.tee(damaged, "e.tar", len(body)) as f:
            f.read(len(body))
        assert damaged.tell() < len(body) + (3 << 20)  # not read through (to make a copy it cannot keep)
        # No short copy, nothing left being written.
        assert sorted(os.listdir(folder)) == [".lock", ".writing", ShardCache.name_of("a/x.tar")]
        assert os.listdir(os.path.join(folder, ".writing")) == []

        with open(os.path.join(folder, ".writing", f"w1.{1 << 60}.part"), "wb"):  # being written: room owed to it
            stream = io.BytesIO(body)
            with cache.tee(stream, "d.tar", len(body)) as f:
                assert f is stream
        with ShardCache("t", parent, keep_free=1.0).tee(stream, "d.tar", len(body)) as f:  # the disk's free share kept
            assert f is stream
        if os.path.isdir("/dev/shm"):  # a memory file system: the copies would be RAM
            with ShardCache(f"t-{os.getpid()}", "/dev/shm", keep_free=0.0).tee(stream, "d.tar", len(body)) as f:
                assert f is stream
            shutil.rmtree(f"/dev/shm/t-{os.getpid()}")
        cache.clear()
        assert not os.path.exists(folder) and cache.held() == []


def test_a_full_disk_drops_the_copy_never_the_listing():
    from stages.data.shard_cache import _Tee

    body = os.urandom(300_000)
    tee = _Tee(io.BytesIO(body), "/dev/full")  # every write: ENOSPC
    assert io.BufferedReader(tee).read() == body and tee.failed and "No space left" in tee.failed


def test_a_writing_task_reads_a_source_shard_from_its_node_s_copy_and_the_source_where_it_holds_none(tmp_path):
    from stages.data.shard_cache import ShardCache
    from stages.data.sources import WebDatasetSource

    root = tmp_path / "wds"
    root.mkdir()
    for shard in range(2):
        (root / f"train-{shard:06d}.tar").write_bytes(
            _source_shard([(f"s{shard}-{i}", i, bytes([65 + i]) * 900) for i in range(3)]))
    source = WebDatasetSource(str(root))
    items = source.items()
    source.cache = ShardCache("t", str(tmp_path / "cache"))
    copy = (root / "train-000000.tar").read_bytes().replace(b"A" * 900, b"a" * 900)  # told apart from the source
    os.makedirs(source.cache.root)
    Path(source.cache.root, ShardCache.name_of("train-000000.tar")).write_bytes(copy)
    got = {item.key: data for item, data in source.read_many(items)}
    assert got == {"s0-0": b"a" * 900, "s0-1": b"B" * 900, "s0-2": b"C" * 900,
                   "s1-0": b"A" * 900, "s1-1": b"B" * 900, "s1-2": b"C" * 900}


def test_a_copy_this_node_lacks_is_read_from_the_node_holding_it_else_from_the_source(tmp_path, monkeypatch):
    """A shard task spanning source shards kept on two nodes reads the other node's part from that
    node (a task pinned there), in pieces; a node that cannot answer leaves the rest to the source."""
    import ray

    from stages.data import shard_cache
    from stages.data.shard_cache import ShardCache

    body = os.urandom(50_000)
    held = ShardCache("peer-test").root  # resolved as the Ray workers resolve it: their TMPDIR
    os.makedirs(held, exist_ok=True)
    Path(held, ShardCache.name_of("x.tar")).write_bytes(body)
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this process: another node's disk, no copy
        monkeypatch.setattr(shard_cache, "PEER_PIECE", 7000)  # pieces: several tasks for one range
        reads = []

        def source(at: int) -> io.BytesIO:
            reads.append(at)
            return io.BytesIO(b"S" * (45_000 - at))

        here = ray.get_runtime_context().get_node_id()
        with ShardCache("peer-test", peers={"x.tar": here}).open_anywhere("x.tar", 100, 45_000, source) as f:
            assert f.read() == body[100:45_000] and reads == []
        with ShardCache("peer-test", peers={"x.tar": "ab" * 28}).open_anywhere("x.tar", 100, 45_000, source) as f:
            assert f.read() == b"S" * 44_900 and reads == [100]  # no such node: all from the source
        with ShardCache("peer-test").open_anywhere("x.tar", 100, 45_000, source) as f:  # held nowhere known
            assert f.read() == b"S" * 44_900 and reads == [100, 100]
        Path(held, ShardCache.name_of("y.tar")).write_bytes(body[:20_000])  # a copy that stops short
        with ShardCache("peer-test", peers={"y.tar": here}).open_anywhere("y.tar", 100, 45_000, source) as f:
            # Two whole pieces from the peer, then the source from where the third would have begun.
            assert f.read() == body[100:14_100] + b"S" * 30_900 and reads == [100, 100, 14_100]
    finally:
        shutil.rmtree(held)


def test_a_writing_task_goes_to_the_node_with_most_of_its_bytes():
    from stages.data.shard_cache import ShardCache, preferred_node

    copies = {ShardCache.name_of("s0.tar"): "node-b", ShardCache.name_of("s1.tar"): "node-a",
              ShardCache.name_of("s2.tar"): "node-b"}
    assert preferred_node({"s0.tar": 400, "s1.tar": 700}, copies) == "node-a"
    assert preferred_node({"s0.tar": 400, "s1.tar": 700, "s2.tar": 301}, copies) == "node-b"
    assert preferred_node({"s0.tar": 700, "s1.tar": 700}, copies) == "node-a"  # a tie: the lower id
    assert preferred_node({"s9.tar": 700}, copies) is None


def test_a_local_source_shard_cut_short_inside_an_image_it_seeks_over_is_damaged(tmp_path):
    from stages.data.tarshards import BadShard, iter_tar_spans

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key in ("a", "b"):
            for ext, data in (("cls", b"1"), ("jpg", b"j" * 5000)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "cut.tar"
    path.write_bytes(buffer.getvalue()[:6656 + 3 * 512 + 3000])  # a whole (6656 bytes); b cut inside its jpg
    with open(path, "rb") as f:
        spans = iter_tar_spans(f, "cut.tar", wanted={"cls"}.__contains__)
        assert next(spans).key == "a"
        with pytest.raises(BadShard, match=r"cut.tar: truncated or corrupt tar \(unexpected end of data\)"):
            next(spans)


class _FailingListSource(ListSource):
    """A list file whose byte range from ``fail_at`` fails to list (a lost node, a GET out of retries)."""

    fail_at: int | None = None

    def list_part(self, part):
        if part.start == self.fail_at and not part.exact:
            raise OSError(f"bytes {part.start}-: listing failed")
        return super().list_part(part)


def test_csv_records_with_newlines_in_quoted_fields_are_listed_whole_however_the_file_is_cut(tmp_path, monkeypatch):
    """A byte range that begins inside a quoted field would take the field's tail for records:
    each part reports where its records begin and end, and one that begins before the part
    before ended is listed again from there — also when the part before was read back from a
    saved listing."""
    from pipeline.storage import LocalStorage
    from stages.data import listing as listing_module
    from stages.data import sources
    from stages.ingest import list_source

    rows = [{"path": f"img/{c}/{i}.jpg", "label": c, "caption": "two\nlines, \"quoted\"\n" * (i % 3)}
            for c in ("cat", "dog") for i in range(6)]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    text = (tmp_path / "list.csv").read_bytes()
    assert text.count(b"\n") > 13 + 10  # the quoted newlines: more lines than records
    whole = ListSource(str(tmp_path / "list.csv")).items()
    assert [(i.origin, i.label) for i in whole] == [(f"{tmp_path}/{r['path']}", r["label"]) for r in rows]
    for part_bytes in (5, 23, 40, 64, 97):
        monkeypatch.setattr(sources, "LIST_PART_BYTES", part_bytes)
        listing = list_source(None, ListSource(str(tmp_path / "list.csv")), 2)
        assert listing.inputs == 12 and listing.items(range(len(listing))) == whole, part_bytes

    # Cut and failed inside a caption: the parts before are saved, with where their records end.
    monkeypatch.setattr(sources, "LIST_PART_BYTES", 40)
    monkeypatch.setattr(listing_module, "_COMBINE_BYTES", 1)
    source, saved = _FailingListSource(str(tmp_path / "list.csv")), LocalStorage(tmp_path / "saved")
    inside = next(start for start in range(40, len(text), 40) if text[:start].count(b'"') % 2)
    source.fail_at = inside
    with pytest.raises(Exception, match="listing failed"):
        list_source(None, source, 1, saved=saved)
    source.fail_at = None
    resumed = list_source(None, source, 2, saved=saved, resume=True)
    assert resumed.inputs == 12 and resumed.items(range(len(resumed))) == whole


def test_a_skip_log_keeps_every_record_in_order_as_columns(monkeypatch):
    from stages.data import skips
    from stages.data.skips import SkipLog

    monkeypatch.setattr(skips, "_BATCH", 3)  # columns every three records: the boundaries are crossed
    records = [{"origin": f"/d/{i}.jpg", "kind": "missing label" if i % 3 else "bad image", "reason": f"r{i}"}
               for i in range(8)]
    log = SkipLog(records[:2])
    log.extend(records[2:])
    assert len(log) == 8 and list(log.records()) == records and log.first(5) == records[:5]
    assert log.counts_by_kind() == {"bad image": 3, "missing label": 5}
    assert SkipLog().first(1) == [] and SkipLog().counts_by_kind() == {}
    both = SkipLog(records[:4])
    both.add(SkipLog(records[4:]))  # columns and pending records of the other, after these
    assert list(both.records()) == records and len(both) == 8


def test_a_saved_batch_comes_back_in_one_chunk(tmp_path):
    """A shard's rows are taken with a call per chunk they fall in: a batch read back must be one
    chunk, as it was joined, not one per Parquet row group (1Mi rows by default)."""
    import pyarrow as pa

    from pipeline.storage import LocalStorage
    from stages.data.listing import ListingBatch
    from stages.data.saved_listing import SavedListing
    from stages.data.sources import ListingPart

    source, parts = ImageFolderSource("/d"), [ListingPart("a"), ListingPart("b")]
    rows = (1 << 20) + 1
    table = pa.table({"key": pa.array(np.arange(rows).astype(str)), "size": pa.array(np.arange(rows))})
    saved = SavedListing(LocalStorage(tmp_path / "saved"), source, parts)
    saved.start(resume=False)
    saved.save(ListingBatch(0, 1, table, [], rows))
    saved.close()
    [batch] = SavedListing(LocalStorage(tmp_path / "saved"), source, parts).start(resume=True)
    assert batch.table.equals(table) and batch.table.column("key").num_chunks == 1
