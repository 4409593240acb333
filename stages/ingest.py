"""The ``ingest`` stage: images from a source -> verified webdataset shards, written in parallel.

Output (under the stage folder)::

    shards/train-000000.tar   KEY.png|jpg, KEY.cls (class index), KEY.json (source path, size)
    shards/train-000000.json  the shard's stats; written after the tar, so it marks it complete (for a
                              resumed ingest; not a manifest output: the manifest stays small)
    classes.json              {"classes": [names in index order]}
    skipped.jsonl             every skipped input: {"origin", "kind", "reason"} per line
    listing/                  the listing, saved as Parquet while it is made: a resumed ingest reads
                              it back and lists only the parts it had not (:mod:`stages.data.saved_listing`)

Copying from webdataset shards on S3, each listing task keeps the source shard it streams on its
node's disk and the writing tasks are sent where those copies are (:mod:`stages.data.shard_cache`):
the corpus is read from S3 once.

With ``mode: index`` (a ``webdataset`` source) no shard is written: ``index/NAME.json`` holds each
source shard's stats (:mod:`stages.data.shard_index`) and the result names the source folder as
the root the shard paths are relative to. Listing runs in Ray tasks, one per part of the source
(class folder, source shard, Parquet file: :func:`list_source`), which send back compact columns
(:mod:`stages.data.listing`); planning works on row numbers of those columns.

Shard contents are planned before any image is read (keys sorted, then put in an order seeded by
the run's seed so that every shard mixes classes; fixed shard boundaries), so the same input and
config give the same shards, byte for byte, however many workers write them. A
re-run of an interrupted ingest keeps every shard whose stats file exists and writes only the rest.
Bad inputs are skipped with a reason: every one in ``skipped.jsonl`` (origin, kind, reason), the
counts by kind and the first 20 in the manifest, which stays O(shards); the stage fails when more
than ``max_skip_fraction`` of the inputs are skipped.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from pipeline.config import StageResources
from pipeline.errors import VitpipeError
from pipeline.preflight import ResourceDemand
from pipeline.registry import register_stage
from pipeline.stage import Stage, StageContext, StageParams
from pipeline.storage import Storage
from stages.data.images import EXTENSION_OF, BadImage, Validation, inspect_image, reencode
from stages.data.listing import (
    Listing,
    ListingBuilder,
    ListingChunk,
    ListingRows,
    encode_chunk,
    screen_items,
    skip_record,
    unique_key_order,
)
from stages.data.order import derived_seed
from stages.data.saved_listing import LISTING_DIR, SavedListing
from stages.data.shard_cache import KEEP_FREE, ShardCache, clear_on_nodes, held_on_nodes, preferred_node
from stages.data.shard_index import INDEX_DIR, ShardIndex, class_list, index_shard, index_stats_path
from stages.data.skips import SkipLog
from stages.data.sources import (
    SPLIT_NAMES,
    ListingPart,
    Source,
    SourceItem,
    WebDatasetSource,
    make_source,
    sort_labels,
)
from stages.data.tarshards import ShardTarWriter
from stages.records import IngestResult, ShardRecord, SplitRecord

__all__ = ["IngestParams", "Ingest", "ShardCut", "ShardPlan", "ShardResult", "plan_digests", "write_listed_shard", "SKIPPED_FILE", "finished_shards", "ingest_record",
           "plan_shards", "screen_items", "write_shard"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_SHARD_TASK_CPUS = 1.0  # each shard-writing task decodes and encodes on one core


class IngestParams(StageParams):
    # ``validate`` in configs; the attribute is ``validation`` (``validate`` is pydantic's own name).
    model_config = ConfigDict(populate_by_name=True)

    source: Literal["digits", "imagefolder", "list", "webdataset", "parquet"]
    path: str | None = Field(default=None, description="folder / list file / shard folder / Parquet folder "
                                                       "(local or s3://)")
    image_column: str = Field(default="image", description="parquet: the column of encoded images (bytes or "
                                                           "{bytes, path})")
    label_column: str = Field(default="label", description="parquet: the column of labels (ClassLabel index or name)")
    image_size: int = Field(default=32, ge=8, le=1024, description="digits only: rendered size")
    shard_samples: int = Field(default=1000, ge=1)
    shard_bytes: int | None = Field(default=None, ge=1 << 16, description="also cut shards at this many bytes")
    mode: Literal["copy", "reencode", "index"] = Field(default="copy", description=(
        "copy: image bytes into new shards; reencode: resized to max_side and JPEG-encoded; index (webdataset "
        "source only): the source shards are used in place, each streamed once to count and check it"))
    max_side: int = Field(default=512, ge=16, description="reencode: shorter side at most this")
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    validation: Validation = Field(default="structure", alias="validate", description=(
        "how deeply each input is checked before it is written: structure (header and container: JPEG markers "
        "through EOI, PNG chunk CRCs, ...; no pixels decoded), decode (every pixel) or none (header only, for "
        "trusted corpora); the README's table lists what each catches"))
    shuffle: bool = Field(default=True, description="cut shards from a seeded permutation of the listing, so each "
                                                    "mixes classes (not for sources read in order: webdataset, parquet)")
    max_skip_fraction: float = Field(default=0.01, ge=0, le=1)
    workers: int = Field(default=2, ge=1, description="shard-writing Ray tasks in flight")
    cache_sources: bool = Field(default=True, description=(
        "copy from remote webdataset shards (S3): each listing task keeps the source shard it streams on its "
        "node's local disk (TMPDIR) and each writing task is sent where its bytes are, so the corpus is read "
        "from S3 once, not twice; the copies are removed when the ingest ends"))
    cache_keep_free: float = Field(default=KEEP_FREE, ge=0, le=1, description=(
        "cache_sources: the share of each node's TMPDIR disk left free (a source shard that would take more is "
        "not kept, and read from S3 again)"))

    # The shards are a pure function of the listing and the other params: how they are made is not.
    execution_params: ClassVar[frozenset[str]] = frozenset({"workers", "cache_sources", "cache_keep_free"})

    @model_validator(mode="before")
    @classmethod
    def _former_validate_images(cls, data: Any) -> Any:
        """``validate_images: true|false`` (before ``validate``) keeps its meaning: decode or none."""
        if isinstance(data, dict) and "validate_images" in data and "validate" not in data:
            data = dict(data)
            data["validate"] = "decode" if data.pop("validate_images") else "none"
        return data

    @model_validator(mode="after")
    def _path_needed(self) -> IngestParams:
        if self.source != "digits" and not self.path:
            raise ValueError(f"source {self.source!r} needs a path")
        if self.mode == "index" and self.source != "webdataset":
            raise ValueError(f"mode 'index' uses existing webdataset shards in place; source {self.source!r} has none "
                             "(use mode: copy)")
        return self


class _ShardFiles:
    name: str  # e.g. "train-000003"

    @property
    def tar_path(self) -> str:
        return f"shards/{self.name}.tar"

    @property
    def stats_path(self) -> str:
        return f"shards/{self.name}.json"  # written after the tar: marks it finished


@dataclass
class ShardCut(_ShardFiles):
    """A planned shard as the coordinator holds it: rows of the listing (4 bytes an input)."""

    name: str
    split: str
    rows: np.ndarray

    def plan(self, listing: Listing) -> ShardPlan:
        return ShardPlan(self.name, self.split, listing.items(self.rows))


@dataclass
class ShardPlan(_ShardFiles):
    """A planned shard with its items (made in the task that writes it: :func:`write_listed_shard`)."""

    name: str
    split: str
    items: list[SourceItem]


@dataclass
class ShardResult:
    name: str
    split: str
    path: str
    samples: int
    bytes: int
    sha256: str
    class_counts: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    plan_digest: str = ""


SKIPPED_FILE = "skipped.jsonl"  # every skipped input, one JSON object per line (origin, kind, reason)
SKIPPED_SHOWN = 20  # the manifest keeps the first few and the counts by kind: it stays O(shards)


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_NAMES.index(split) if split in SPLIT_NAMES else len(SPLIT_NAMES), split)


def plan_shards(listing: Listing, order: np.ndarray, shard_samples: int, shard_bytes: int | None = None,
                shuffle_seed: int | None = None) -> list[ShardCut]:
    """Fixed shard boundaries: per split (train, val, test, others), the listing's rows in
    ``order`` (key order, duplicates dropped: :func:`unique_key_order`) — then, with
    ``shuffle_seed``, in a permutation seeded by it and the split — and a new shard every
    ``shard_samples`` rows or when known sizes would pass ``shard_bytes``.

    Shuffling matters because listings sort by key, which for class folders means by class: cut in
    that order, every shard holds one class. Seeded, the same input and config still give the
    same shards, byte for byte. Works on row numbers only: 4 bytes an input.
    """
    codes, names = listing.codes("split")
    split_of_row = codes[order]
    cuts = []
    for code, split in sorted(enumerate(names), key=lambda pair: _split_rank(pair[1])):
        rows = order[split_of_row == code]
        if not len(rows):
            continue
        if shuffle_seed is not None:  # in place: ``rows`` is this split's own copy
            np.random.Generator(np.random.PCG64(derived_seed("ingest", shuffle_seed, split))).shuffle(rows)
        bounds = _shard_bounds(len(rows), shard_samples, listing.sizes(rows) if shard_bytes else None, shard_bytes)
        cuts.extend(ShardCut(f"{split}-{n:06d}", split, rows[start:end])
                    for n, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)))
    return cuts


def _shard_bounds(count: int, shard_samples: int, sizes: np.ndarray | None, shard_bytes: int | None) -> list[int]:
    """Where shards start (and the last ends): every ``shard_samples``, or earlier where the next
    item would take the shard's known bytes past ``shard_bytes`` (a shard holds at least one)."""
    if sizes is None or not shard_bytes:
        return [*range(0, count, shard_samples), count]
    total = np.cumsum(sizes)
    bounds, start = [0], 0
    while start < count:
        before = int(total[start - 1]) if start else 0
        fits = int(np.searchsorted(total, before + shard_bytes, side="right"))
        start = min(max(fits, start + 1), start + shard_samples, count)
        bounds.append(start)
    return bounds


def _encode(data: bytes, mode: str, max_side: int, quality: int,
            validate: Validation) -> tuple[str, bytes, tuple[int, int]]:
    width, height, fmt = inspect_image(data, validate)
    if mode == "copy":
        return EXTENSION_OF[fmt], data, (width, height)
    encoded, _ = reencode(data, max_side, quality)  # decodes every pixel, whatever ``validate`` says
    return "jpg", encoded, (width, height)


def write_shard(source: Source, plan: ShardPlan, out: Storage, class_index: dict[str, int], mode: str,
                max_side: int, quality: int, validate: Validation = "structure", digest: str = "") -> ShardResult:
    """Read, check and convert one shard's items and write the shard, then its stats file."""
    skipped: list[dict[str, str]] = []
    counts: dict[str, int] = {}
    samples = 0
    with out.open_write(plan.tar_path) as stream, ShardTarWriter(stream) as tar:
        for item, data in source.read_many(plan.items):
            try:
                if isinstance(data, Exception):
                    raise data
                if not data:
                    raise BadImage("zero-byte file")
                ext, payload, (width, height) = _encode(data, mode, max_side, quality, validate)
            except BadImage as err:
                skipped.append(skip_record(item, "bad image", str(err)))
                continue
            except Exception as err:  # noqa: BLE001 - unreadable input: recorded, not fatal
                reason = " ".join(str(err).split()) or type(err).__name__
                skipped.append(skip_record(item, "unreadable", f"unreadable: {reason}"))
                continue
            meta = {"source": item.origin, "width": width, "height": height, "label": item.label}
            tar.write(item.key, {ext: payload, "cls": str(class_index[item.label]).encode(),
                                 "json": json.dumps(meta, sort_keys=True).encode()})
            counts[item.label] = counts.get(item.label, 0) + 1
            samples += 1
    written = stream.written  # type: ignore[attr-defined]
    # No list of keys: the coordinator gathers every shard's result, and 300M keys are ~20 GB.
    result = ShardResult(plan.name, plan.split, plan.tar_path, samples, written.size, written.sha256, counts,
                         skipped, digest)
    out.write_text(plan.stats_path, json.dumps(asdict(result), sort_keys=True))
    return result


def write_listed_shard(source: Source, copies: ShardCache | None, name: str, split: str, rows: ListingRows,
                       *args: Any) -> ShardResult:
    """:func:`write_shard`, the shard's items made here from its rows' columns — not in the
    coordinator, which at ~10 us an item could make only ~100k a second for all writing tasks.
    ``copies``: where the listing kept this shard's source shards (a webdataset source)."""
    if copies is not None:
        assert isinstance(source, WebDatasetSource)
        source = source.with_cache(copies)
    return write_shard(source, ShardPlan(name, split, rows.items(source)), *args)


def ingest_record(shards: list[ShardResult], classes: list[str], inputs: int, skipped: int) -> IngestResult:
    """The stage's result record from its shards' stats, in plan order (pure)."""
    splits: dict[str, SplitRecord] = {}
    for split in dict.fromkeys(r.split for r in shards):
        mine = [r for r in shards if r.split == split]
        counts: dict[str, int] = {}
        for r in mine:
            for label, n in r.class_counts.items():
                counts[label] = counts.get(label, 0) + n
        splits[split] = SplitRecord(samples=sum(r.samples for r in mine), class_counts=counts, shards=[
            ShardRecord(path=r.path, samples=r.samples) for r in mine])
    return IngestResult(classes=classes, splits=splits, inputs=inputs, samples=sum(r.samples for r in shards),
                        skipped=skipped)


def plan_digests(listing: Listing, cuts: list[ShardCut], class_index: dict[str, int], settings: tuple) -> dict[str, str]:
    """What each shard's bytes depend on besides the source files: its rows' keys, locators and
    classes, and the encoding settings (:meth:`Listing.digest`), by shard name."""
    class_of_label = class_of_labels(listing, class_index)
    return {cut.name: listing.digest(cut.rows, class_of_label, settings) for cut in cuts}


def class_of_labels(listing: Listing, class_index: dict[str, int]) -> np.ndarray:
    """The class index of each of the listing's label codes (-1: none)."""
    return np.array([class_index.get(label, -1) for label in listing.values("label")], dtype=np.int64)


def finished_shards(out: Storage, plans: list[ShardCut] | list[ShardPlan], digests: dict[str, str],
                    readers: int = 16) -> dict[str, ShardResult]:
    """The shards an earlier, interrupted attempt finished (stats file present, tar of the size it
    records, planned from the same listing and encoding), by name.

    One listing of ``shards/`` (a LIST per 1000 objects on S3) says which stats files and tars
    exist and their sizes; only the stats files found are read, ``readers`` at a time: one request
    per finished shard, none for the others (at 300k shards and ~20 ms a request, ~6 minutes
    instead of 5 hours of three sequential requests per shard)."""
    sizes = {o.path: o.size for o in out.list("shards")}
    found = [plan for plan in plans if plan.stats_path in sizes and plan.tar_path in sizes]
    results = _read_stats(out, [plan.stats_path for plan in found], ShardResult, readers)

    def usable(plan: ShardPlan, result: ShardResult | None) -> bool:
        # Planned from the same listing and class list, and its tar whole.
        return result is not None and result.plan_digest == digests[plan.name] and sizes[plan.tar_path] == result.bytes

    return {plan.name: result for plan, result in zip(found, results, strict=True) if usable(plan, result)}


def _read_stats(out: Storage, paths: list[str], record: type[T], readers: int = 16) -> list[T | None]:
    """The stats files at ``paths`` (JSON of a ``record`` dataclass), ``readers`` at a time; None
    for one that is unreadable (a torn write of an attempt that died: it is redone)."""
    from concurrent.futures import ThreadPoolExecutor

    known = {f.name for f in fields(record)}  # type: ignore[arg-type]

    def read(path: str) -> T | None:
        try:
            # Fields of older versions are dropped (stats files listed each shard's keys until
            # 2026-12-03), so that an ingest resumed across the upgrade keeps its finished shards.
            return record(**{k: v for k, v in json.loads(out.read_text(path)).items() if k in known})
        except (ValueError, TypeError, AttributeError):
            return None

    with ThreadPoolExecutor(max_workers=readers) as pool:
        return list(pool.map(read, paths))


@register_stage("ingest")
class Ingest(Stage):
    Params = IngestParams
    working_dirs = (LISTING_DIR,)  # the saved listing: for a resume before the commit, dead weight after

    @classmethod
    def default_resources(cls) -> StageResources:
        # The coordinator joins the listing and plans before any shard task starts: CPU-bound work
        # (bench/ingest_scale.py), so it declares a CPU and is not squeezed onto a full node (the
        # head beside the GCS). Ray lends that CPU back while it waits on the shard tasks, so they
        # lose nothing. Its heap grows with the listing: the columns (~51 B an input) are spilled
        # to memory-mapped files in the node's TMPDIR (local disk; the kernel's page cache), and
        # the plan's row numbers and scratch peak at ~33 B an input: 2 GB covers ~60M inputs;
        # `resources: {memory_gb: ...}` for more (300M: ~10 GB, and ~15 GB of local disk).
        return StageResources(cpus=1, memory_gb=2)

    @classmethod
    def resource_demand(cls, params: StageParams) -> ResourceDemand:
        return ResourceDemand(bundles=({"CPU": _SHARD_TASK_CPUS},), label="shard-writing task")

    def run(self, ctx: StageContext) -> None:
        p: IngestParams = ctx.params  # type: ignore[assignment]
        source = make_source(p.source, p.path, p.image_size, ctx.run_storage_settings, (p.image_column, p.label_column))
        if p.mode == "index":
            assert isinstance(source, WebDatasetSource)
            self._index(ctx, p, source)
        else:
            self._copy(ctx, p, source)

    def _copy(self, ctx: StageContext, p: IngestParams, source: Source) -> None:
        if not isinstance(source, WebDatasetSource) or source.storage.local_path() is not None:
            self._copy_listed(ctx, p, source, None)
            return
        cache = ShardCache.for_stage(ctx.out.uri, keep_free=p.cache_keep_free)
        # A resumed ingest writes from what the attempt it resumes kept (the bytes its saved listing
        # was made from); any other start removes what an earlier ingest to this stage folder left.
        if not (p.cache_sources and ctx.resumed):
            clear_on_nodes(cache)
        if p.cache_sources:
            source.cache = cache
        try:
            self._copy_listed(ctx, p, source, cache if p.cache_sources else None)
        finally:  # the copies are the corpus: never left behind on a node's disk
            clear_on_nodes(cache)

    def _copy_listed(self, ctx: StageContext, p: IngestParams, source: Source, cache: ShardCache | None) -> None:
        import ray

        # Spilled to the node's local temporary folder (TMPDIR): the columns leave the heap.
        listing = list_source(ctx, source, p.workers, saved=ctx.out.child(LISTING_DIR), resume=ctx.resumed,
                              spill_dir=tempfile.gettempdir())
        ctx.metrics["listing"] = {"inputs": listing.inputs, "columns_bytes": listing.table.nbytes,
                                  "spilled_to": listing.spilled_to}
        order, duplicates = unique_key_order(listing)
        skipped = listing.skipped
        skipped.add(duplicates)
        _check_skips(p, skipped, listing.inputs, len(skipped))  # now, not after every shard is written
        label_codes, labels = listing.codes("label")
        used = [labels[code] for code in np.unique(label_codes[order])]
        del label_codes
        names = source.class_names() or sort_labels(used)
        unknown = sorted(set(used) - set(names))
        if unknown:
            raise VitpipeError(f"labels {unknown[:5]} are not in the source's class list")
        class_index = {name: i for i, name in enumerate(names)}
        shuffle = ctx.seed if p.shuffle and source.random_access else None
        cuts = plan_shards(listing, order, p.shard_samples, p.shard_bytes, shuffle_seed=shuffle)
        del order
        ctx.logger.info("%d inputs -> %d shards (%d skipped before reading)", listing.inputs, len(cuts), len(skipped))

        encoding = (p.mode, p.max_side, p.jpeg_quality, p.validation)
        if ctx.resumed:  # a finished shard is kept only if planned alike: every shard's digest now
            digests = plan_digests(listing, cuts, class_index, encoding)
            results = finished_shards(ctx.out, cuts, digests)
        else:  # each shard digested as its task is sent: no pass over every input before the first
            digests, results = {}, {}
        class_of_label = class_of_labels(listing, class_index)
        todo = {cut.name: cut for cut in cuts if cut.name not in results}
        if results:
            ctx.logger.info("resuming: %d shards already written, %d to go", len(results), len(todo))

        remote = ray.remote(num_cpus=_SHARD_TASK_CPUS, max_retries=2)(write_listed_shard)
        source_ref = ray.put(source)
        node_of_copy: dict[str, str] = {}
        if cache is not None:
            node_of_copy = held_on_nodes(cache)
            shards = listing.values("shard")  # the source shards with samples (one dictionary: unified)
            kept = sum(ShardCache.name_of(shard) in node_of_copy for shard in shards)
            nodes = len(set(node_of_copy.values()))
            ctx.metrics["source_cache"] = {"folder": cache.root, "shards": len(shards), "copies": kept, "nodes": nodes}
            ctx.logger.info("%d of %d source shards kept on %d nodes' disks for the writing tasks", kept, len(shards),
                            nodes)
            if kept < len(shards):
                ctx.logger.warning("%d source shards were not kept (less than cache_keep_free=%g of their listing "
                                   "node's disk would be left, or it is memory, or the node is lost): they are read "
                                   "from the source again", len(shards) - kept, p.cache_keep_free)

        near: dict[str, str] = {}  # a cut's preferred node, from its arguments to its options

        def copies(cut: ShardCut) -> ShardCache | None:
            """The cache as the cut's task sees it, with the nodes holding its source shards; the node
            holding most of its bytes noted for :func:`placement`."""
            if cache is None:
                return None
            spans = _bytes_by_shard(listing, cut.rows)
            node = preferred_node(spans, node_of_copy)
            if node is not None:
                near[cut.name] = node
            held = {shard: node_of_copy.get(ShardCache.name_of(shard)) for shard in spans}
            return replace(cache, peers={shard: node for shard, node in held.items() if node is not None})

        def placement(name: str) -> dict[str, Any]:
            node = near.pop(name, None)
            return {} if node is None else {"scheduling_strategy": _near(node)}

        def call(name: str) -> tuple:  # a shard's rows are taken when its task is sent, not before
            cut = todo[name]
            digest = digests.get(name) or listing.digest(cut.rows, class_of_label, encoding)
            return (source_ref, copies(cut), cut.name, cut.split, listing.rows(cut.rows), ctx.out, class_index, p.mode,
                    p.max_side, p.jpeg_quality, p.validation, digest)

        results.update(_run_tasks(ctx, remote, list(todo), call, p.workers, len(cuts), "shards",
                                  options=placement if cache is not None else None))

        ordered = [results[cut.name] for cut in cuts]
        for r in ordered:  # the stats files only mark finished shards for a resumed ingest: not outputs
            skipped.extend(r.skipped)
            ctx.record_output(r.path, r.bytes, r.sha256)
        _check_skips(p, skipped, listing.inputs, len(skipped))
        ctx.write_json("classes.json", {"classes": names})
        ctx.result = ingest_record(ordered, names, listing.inputs, len(skipped))
        _record_skips(ctx, skipped)
        ctx.logger.info("wrote %d samples in %d shards; skipped %d", ctx.result.samples, len(ordered), len(skipped))

    def _index(self, ctx: StageContext, p: IngestParams, source: WebDatasetSource) -> None:
        """``mode: index``: one task per source shard streams it once (:mod:`stages.data.shard_index`);
        the shards stay where they are and the result names their folder as its ``root``."""
        import ray

        shards = source.shards()
        digests = {o.path: f"{o.size}:{p.validation}" for o in shards}
        paths = [o.path for o in shards]
        stats = [index_stats_path(rel) for rel in paths]
        if len(set(stats)) < len(stats):
            raise VitpipeError(f"{p.path}: two shards map to one index entry (names differing only in odd characters)")
        results: dict[str, ShardIndex] = {}
        if ctx.resumed:  # one listing of index/, then one read per stats file found
            present = {o.path for o in ctx.out.list(INDEX_DIR)}
            found = [(rel, path) for rel, path in zip(paths, stats, strict=True) if path in present]
            read = _read_stats(ctx.out, [path for _, path in found], ShardIndex)
            results = {rel: index for (rel, _), index in zip(found, read, strict=True)
                       if index is not None and index.digest == digests[rel]}
        if results:
            ctx.logger.info("resuming: %d shards already indexed, %d to go", len(results), len(paths) - len(results))
        remote = ray.remote(num_cpus=_SHARD_TASK_CPUS, max_retries=2)(index_shard)
        todo = [rel for rel in paths if rel not in results]
        results.update(_run_tasks(ctx, remote, todo, lambda rel: (source.storage, rel, ctx.out, p.validation, digests[rel]),
                                  p.workers, len(paths), "shards indexed"))

        ordered = [results[rel] for rel in paths]
        kept = [index for index in ordered if not index.damaged]
        names, counts = class_list(kept, source.class_names(), source.storage.uri)
        skipped = SkipLog(record for index in ordered for record in index.skipped)
        unusable = sum(index.unusable for index in kept) + sum(index.lost for index in ordered)
        samples = sum(index.samples for index in kept)
        _check_skips(p, skipped, samples + sum(index.lost for index in ordered), unusable)
        splits: dict[str, SplitRecord] = {}
        for split in sorted({index.split for index in kept}, key=_split_rank):
            mine = [index for index in kept if index.split == split]
            splits[split] = SplitRecord(samples=sum(i.samples for i in mine), class_counts=counts[split],
                                        shards=[ShardRecord(path=i.path, samples=i.samples) for i in mine])
        ctx.write_json("classes.json", {"classes": names})
        ctx.result = IngestResult(classes=names, splits=splits, inputs=samples + sum(i.lost for i in ordered),
                                  samples=samples, skipped=unusable, root=source.storage.uri)
        _record_skips(ctx, skipped)
        ctx.logger.info("indexed %d samples in %d shards in place (%s); %d unusable, %d shards left out", samples,
                        len(kept), source.storage.uri, unusable, len(ordered) - len(kept))


# The coordinator's peak heap from listing to plan over what the joined listing columns hold
# (bench/ingest_scale.py at 10M inputs): held in the heap, the columns and the sort's row numbers,
# the plan's, a window of keys (measured ~1.7); spilled to memory-mapped files, the latter and the
# label codes rebuilt against one dictionary (~0.65).
PLANNING_OVERHEAD = 2.0
SPILLED_PLANNING_OVERHEAD = 1.0


def check_listing_fits(listed_bytes: int, parts_done: int, parts: int, available: int, where: str,
                       spill_free: int | None = None) -> None:
    """Fail now, in one line, when the listing is on course (projected from the parts listed so
    far) to need more than ``available`` bytes of heap in the coordinator — or, spilled, more disk
    than the ``spill_free`` bytes left in the spill folder: better than the coordinator killed for
    memory (or out of disk) after listing for an hour, and retried to fail again (pure)."""
    projected = listed_bytes * parts / max(parts_done, 1)
    progress = f"{where}: the listing, projected from {parts_done} of {parts} parts,"
    if spill_free is not None and projected - listed_bytes > spill_free:
        raise VitpipeError(
            f"{progress} needs ~{(projected - listed_bytes) / 1e9:.1f} GB more of local disk in the ingest "
            f"coordinator's temporary folder, {spill_free / 1e9:.1f} GB free: point TMPDIR at a larger local disk "
            "on the coordinator's node, ingest the corpus in pieces, or use mode: index for webdataset shards")
    needed = int(projected * (PLANNING_OVERHEAD if spill_free is None else SPILLED_PLANNING_OVERHEAD))
    if needed > available:
        raise VitpipeError(
            f"{progress} needs ~{needed / 1e9:.1f} GB in the "
            f"ingest coordinator, {available / 1e9:.1f} GB available: give the stage more (resources: {{memory_gb: ...}}, "
            "on a node that has it), ingest the corpus in pieces, or use mode: index for webdataset shards")


def list_source(ctx: StageContext | None, source: Source, workers: int, available_bytes: int | None = None,
                saved: Storage | None = None, resume: bool = False, spill_dir: str | None = None) -> Listing:
    """The source's listing, as columns: its parts (class folders, source shards, Parquet files)
    listed and screened by ``workers`` Ray tasks at a time and joined in part order — the rows one
    process listing it all would find (``bench/ingest_scale.py --listing`` measures 1 against 2
    tasks). ``ctx``: for a progress bar.

    ``saved``: a folder where each joined batch is saved as it is made (also the batch joined when
    a part fails); with ``resume``, the batches saved there before are read back and only the
    parts after them listed (:mod:`stages.data.saved_listing`).

    ``spill_dir``: a local folder where each joined batch is moved out of the heap, into a
    memory-mapped file (:func:`~stages.data.listing.spill`).

    After the first parts (2%, at least 16) and at every tenth of them, the memory (and spill
    disk) the whole listing will take is projected and checked against ``available_bytes``
    (default: what the machine has available now, plus what the listing holds in the heap)."""
    parts = source.parts()
    if len(parts) <= 1:
        builder = ListingBuilder(source)
        builder.add(encode_chunk(source, source.items()))
        return builder.finish()
    store = SavedListing(saved, source, parts) if saved is not None else None
    builder = ListingBuilder(source, on_batch=store.save if store else None, spill_dir=spill_dir)
    try:
        for batch in store.start(resume) if store else []:
            builder.add_batch(batch)
        _list_parts(ctx, source, parts, builder, workers, available_bytes, spill_dir)
    except Exception:
        if store:  # what was joined is saved, so that a resumed ingest lists from the failed part
            builder.flush()
            try:
                store.close()
            except Exception as err:  # noqa: BLE001 - the listing's own failure is the one to report
                log.warning("could not save the listing so far: %s", err)
        raise
    listing = builder.finish()
    if store:
        store.close()
    return listing


def _list_parts(ctx: StageContext | None, source: Source, parts: list[ListingPart], builder: ListingBuilder,
                workers: int, available_bytes: int | None, spill_dir: str | None) -> None:
    """List ``parts`` after those ``builder`` has joined already, into ``builder``."""
    import shutil

    import psutil
    import ray

    start = builder.parts
    first = min(len(parts), max(16, len(parts) // 50))  # enough parts for a projection to mean something
    checks = {first, *(n for n in (len(parts) * k // 10 for k in range(1, 10)) if n > first)}
    waiting: dict[int, ListingChunk] = {}  # chunks that came before an earlier part's: joined in part order
    remote = ray.remote(num_cpus=_SHARD_TASK_CPUS, max_retries=2)(_list_part)
    source_ref = ray.put(source)
    next_part, record_end = start, builder.record_end

    def on_part(done: int, name: str, chunk: ListingChunk) -> None:
        nonlocal next_part, record_end
        waiting[int(name)] = chunk
        while next_part in waiting:
            chunk = waiting.pop(next_part)
            if chunk.span is not None and record_end is not None and chunk.span[0] != record_end:
                # The part before ran on past this one's start (a CSV record with a quoted newline
                # across the cut), so this one began inside that record: listed again from its end.
                again = replace(parts[next_part], start=record_end, exact=True)
                chunk = ray.get(remote.remote(source_ref, again))
            builder.add(chunk)
            record_end = chunk.span and chunk.span[1]
            next_part += 1
        if start + done in checks:
            unjoined = sum(len(c.data) for c in waiting.values())
            in_heap = unjoined + (builder.pending_bytes if spill_dir else builder.nbytes)
            available = available_bytes or psutil.virtual_memory().available + in_heap
            check_listing_fits(builder.nbytes + unjoined, start + done, len(parts), available,
                               getattr(source, "root", type(source).__name__),
                               shutil.disk_usage(spill_dir).free if spill_dir else None)

    _run_tasks(ctx, remote, [str(n) for n in range(start, len(parts))], lambda name: (source_ref, parts[int(name)]),
               workers, len(parts), "listing", on_result=on_part, keep=False)


def _list_part(source: Source, part: ListingPart) -> ListingChunk:
    return encode_chunk(source, *source.list_part(part))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _bytes_by_shard(listing: Listing, rows: np.ndarray) -> dict[str, int]:
    """How many bytes of each source shard the samples at ``rows`` span (webdataset listings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    shards = listing.take("shard", rows)
    if pa.types.is_dictionary(shards.type):
        shards = shards.dictionary_decode()
    spans = pc.subtract(listing.take("end", rows), listing.take("start", rows))
    totals = pa.table({"shard": shards, "bytes": spans}).group_by("shard").aggregate([("bytes", "sum")])
    return dict(zip(totals.column("shard").to_pylist(), totals.column("bytes_sum").to_pylist(), strict=True))


def _near(node: str) -> Any:
    """Run on ``node`` when it has a free core, else elsewhere (Ray's soft affinity alone waits for
    a busy node's cores: the tasks in flight would queue on the nodes holding the most copies)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node, soft=True, _spill_on_unavailable=True)


def _run_tasks(ctx: StageContext | None, remote: Any, names: list[str], args: Callable[[str], tuple], workers: int,
               total: int, what: str, on_result: Callable[[int, str, Any], None] | None = None,
               keep: bool = True, options: Callable[[str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run ``remote(*args(name))`` for each of ``names``, ``workers`` at a time (arguments made as
    each task is sent; ``options(name)``, asked after them: its Ray options, e.g. where to run), with a progress bar
    over ``total`` (those done before count as done); results by name (unless not ``keep``).
    ``on_result(n, name, result)`` hears of the n-th result as it comes."""
    import contextlib

    import ray

    results: dict[str, Any] = {}
    pending: dict[object, str] = {}
    queue = deque(names)  # popped from the left: 300k entries (shards) is a common size
    done = 0
    progress = ctx.progress(total, desc=f"{ctx.name}: {what}") if ctx else contextlib.nullcontext(_NoBar())
    with progress as bar:
        bar.update(total - len(names))
        try:
            while queue or pending:
                while queue and len(pending) < workers:
                    name = queue.popleft()
                    arguments = args(name)
                    task = remote.options(**options(name)) if options is not None else remote
                    pending[task.remote(*arguments)] = name
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    name = pending.pop(ref)
                    result = ray.get(ref)
                    done += 1
                    if keep:
                        results[name] = result
                    bar.update()
                    if on_result is not None:
                        on_result(done, name, result)
        except BaseException:
            # The tasks still in flight are stopped, and waited for (a while), before the failure goes
            # on: what they would still write (a listing task's copy of its shard) must not land
            # after the stage has cleaned up.
            for ref in pending:
                ray.cancel(ref)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=_CANCEL_WAIT_S)
            raise
    return results


_CANCEL_WAIT_S = 30.0


def _check_skips(p: IngestParams, skipped: SkipLog, total: int, count: int) -> None:
    """Fail when more than ``max_skip_fraction`` of the inputs are skipped, naming the first."""
    if total == 0:
        raise VitpipeError(f"source {p.source!r} at {p.path} has no inputs")
    fraction = count / total
    if fraction > p.max_skip_fraction:
        first = skipped.first(1)[0]
        raise VitpipeError(
            f"{count} of {total} inputs skipped ({fraction:.1%}, above max_skip_fraction="
            f"{p.max_skip_fraction:g}); first: {first['origin']}: {first['reason']}"
        )


def _record_skips(ctx: StageContext, skipped: SkipLog) -> None:
    with ctx.open_write(SKIPPED_FILE) as f:  # the whole list, outside the manifest
        for record in skipped.records():
            f.write((json.dumps(record, sort_keys=True) + "\n").encode())
    ctx.metrics["skipped_by_kind"] = skipped.counts_by_kind()
    ctx.metrics["skipped_first"] = skipped.first(SKIPPED_SHOWN)
