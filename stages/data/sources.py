"""Where ingestion reads images from.

Every source lists its samples up front as :class:`SourceItem` s (key, split, class name, where
to read the bytes) in a deterministic order, and reads one item's bytes on demand, so shards can
be planned before any image is opened and written in parallel.

- ``digits``: scikit-learn's bundled handwritten digits (1797 8x8 images), rendered to RGB PNG at
  ``image_size`` with fixed train/val/test splits.
- ``imagefolder``: ``ROOT/CLASS/IMAGE`` or ``ROOT/SPLIT/CLASS/IMAGE`` (split folders named
  train/val/test), on disk or under an ``s3://`` prefix.
- ``list``: a CSV (header ``path,label[,split]``) or JSONL file of ``{"path", "label", "split"?}``
  rows; paths are local, ``s3://`` URIs, or relative to the list file.
- ``webdataset``: existing shards (``.tar``), re-sharded; labels from ``KEY.cls`` (an integer
  index, with class names from a ``classes.json`` beside the shards when present), ``KEY.txt``
  or ``KEY.json`` (``label`` field).
- ``parquet``: a Hugging Face-style dataset of Parquet files (``stages.data.parquet_source``).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import json
import logging
import posixpath
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from pipeline.errors import VitpipeError
from pipeline.storage import ObjectInfo, Storage, is_s3_uri, open_storage

if TYPE_CHECKING:
    from stages.data.shard_cache import ShardCache

__all__ = ["SourceItem", "ListingPart", "Source", "StorageSource", "DigitsSource", "ImageFolderSource", "ListSource",
           "WebDatasetSource", "make_source", "label_name", "SPLIT_NAMES", "sanitize_key", "split_of_path",
           "sort_labels"]

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
LIST_PART_BYTES = 64 << 20  # a list file past this is listed by several tasks, a range each
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_/-]")


_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test"}


def split_of_path(rel: str) -> str:
    """The split a file of a sharded dataset (tar shard, Parquet file) belongs to: from its name
    (``train-00000-of-00004.parquet``, ``val-000003.tar``), else its folders (``validation/0000.tar``);
    ``validation`` and ``valid`` mean ``val``; ``train`` by default (img2dataset's ``00000.tar``)."""
    parts = rel.split("/")
    for name in [posixpath.splitext(parts[-1])[0], *reversed(parts[:-1])]:
        token = name.lower().replace("_", "-").split("-")[0]
        if token in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[token]
    return "train"


def sanitize_key(text: str) -> str:
    """A webdataset-safe key: no dots (they separate the extension), no odd characters."""
    return _KEY_CHARS.sub("_", text).strip("/") or "_"


@dataclass(frozen=True, slots=True)  # no __dict__: ~64 bytes less per listed input (bench/ingest_scale.py)
class SourceItem:
    key: str
    split: str
    label: str | None  # class name; None = missing label (skipped with a reason)
    locator: Any  # what read() needs: a path relative to the source's storage, an index, ...
    origin: str  # human-readable source path, recorded in KEY.json and in skip reasons
    size: int | None = None  # bytes, when known without reading (plans shards by bytes)
    filename: str | None = None  # for file-based sources: the file's name (its extension is screened)
    refused: str | None = None  # why it must be skipped whatever its bytes (a link, an unsafe name)


@dataclass(frozen=True)
class ListingPart:
    """A piece of a source's listing that one Ray task lists (:meth:`Source.items_of`)."""

    path: str  # relative to the source's root: a folder, or a shard
    recursive: bool = True  # a folder: everything under it; False: only the objects directly in it
    by_split: bool = False  # imagefolder: the first folder level names the split
    start: int = 0  # list: the records that begin in bytes [start, end) of the list file
    end: int | None = None
    exact: bool = False  # list: a record begins at ``start`` (else at the first line after byte start - 1)
    size: int | None = None  # a source shard: its size (a copy of it is checked against it)


class Source:
    """Lists items and reads their bytes. Subclasses must be picklable (sent to Ray tasks)."""

    # Whether items can be read one by one at no extra cost (files, rows), so that a shard may
    # gather them from anywhere in the listing; a source of tar shards streams each one whole.
    random_access: bool = True

    def items(self) -> list[SourceItem]:
        raise NotImplementedError

    def parts(self) -> list[ListingPart]:
        """Pieces that list independently (folders, shards), in listing order, for parallel
        listing; [] when the source lists in one go (:meth:`items`)."""
        return []

    def items_of(self, part: ListingPart) -> list[SourceItem]:
        """The items of one part: the concatenation over :meth:`parts` is the whole listing."""
        raise NotImplementedError

    def list_part(self, part: ListingPart) -> tuple[list[SourceItem], tuple[int, int] | None]:
        """:meth:`items_of`, and for a part that is a byte range the bytes its records span — where
        the first begins, where the last ends — so that the listing can check that each part
        begins where the one before ended (:class:`ListSource`); None for other parts."""
        return self.items_of(part), None

    def read(self, item: SourceItem) -> bytes:
        raise NotImplementedError

    def read_many(self, items: list[SourceItem]) -> Iterator[tuple[SourceItem, bytes | Exception]]:
        """Each item with its bytes, or the error reading it, in the given order."""
        for item in items:
            try:
                yield item, self.read(item)
            except Exception as err:  # noqa: BLE001 - recorded as that item's skip reason
                yield item, err

    def class_names(self) -> list[str] | None:
        """A fixed class order, when the source defines one (else sorted names are used)."""
        return None

    # The listing codec (stages.data.listing): what of a screened item the coordinator keeps as
    # columns besides key, split, label and size, and the item made again from a row. What can be
    # derived (origin, file name) is not kept: at 300M inputs every byte per item is 300 MB.
    def locator_columns(self, items: list[SourceItem]) -> dict[str, Any]:
        raise NotImplementedError

    def item_from(self, key: str, split: str, label: str, size: int | None, loc: dict[str, Any]) -> SourceItem:
        raise NotImplementedError


class DigitsSource(Source):
    """scikit-learn's handwritten digits as RGB PNGs. Splits: a fixed seeded permutation."""

    def __init__(self, image_size: int = 32, val: int = 200, test: int = 300) -> None:
        self.image_size = image_size
        self.val = val
        self.test = test
        self._images: Any = None

    def _data(self) -> tuple[Any, Any]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target

    def class_names(self) -> list[str]:
        return [str(d) for d in range(10)]

    def items(self) -> list[SourceItem]:
        import numpy as np

        images, targets = self._data()
        order = np.random.default_rng(0).permutation(len(images))  # fixed: splits never move
        split_of = {}
        for rank, idx in enumerate(order):
            split_of[int(idx)] = "test" if rank < self.test else "val" if rank < self.test + self.val else "train"
        return [self.item_from(f"digits-{i:04d}", split_of[i], str(int(targets[i])), None, {"index": i})
                for i in range(len(images))]

    def locator_columns(self, items: list[SourceItem]) -> dict[str, Any]:
        import pyarrow as pa

        return {"index": pa.array([item.locator for item in items], pa.int32())}

    def item_from(self, key: str, split: str, label: str, size: int | None, loc: dict[str, Any]) -> SourceItem:
        return SourceItem(key=key, split=split, label=label, locator=loc["index"],
                          origin=f"sklearn.datasets.load_digits[{loc['index']}]")

    def read(self, item: SourceItem) -> bytes:
        import numpy as np
        from PIL import Image

        if self._images is None:
            self._images = self._data()[0]
        pixels = (self._images[item.locator] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(pixels, mode="L").resize((self.image_size, self.image_size), Image.BILINEAR)
        out = io.BytesIO()
        im.convert("RGB").save(out, format="PNG", optimize=False)
        return out.getvalue()


class StorageSource(Source):
    def __init__(self, root: str, storage_settings: Any = None) -> None:
        self.root = root
        self.storage_settings = storage_settings
        self._storage: Storage | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_storage": None}  # made again (with its own client) per process

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = open_storage(self.root, self.storage_settings)
        return self._storage

    def read(self, item: SourceItem) -> bytes:
        return self.storage.read_bytes(item.locator)


class ImageFolderSource(StorageSource):
    def items(self) -> list[SourceItem]:
        objects = self.storage.list()
        if not objects:
            raise VitpipeError(f"{self.root}: no files found (expected CLASS/IMAGE or SPLIT/CLASS/IMAGE folders)")
        top = {o.path.split("/", 1)[0] for o in objects if "/" in o.path}
        by_split = bool(top) and top <= set(SPLIT_NAMES)
        return [self._item(obj, by_split) for obj in objects]

    def parts(self) -> list[ListingPart]:
        """One part per class folder (per split's class folder), and one per level's loose files:
        on S3 a delimited LIST per level, then each class listed by its own task (ImageNet-21k:
        21k parts shared by the tasks instead of ~14k LIST pages in sequence in one process)."""
        folders, files = self.storage.list_level()
        if not folders and not files:
            raise VitpipeError(f"{self.root}: no files found (expected CLASS/IMAGE or SPLIT/CLASS/IMAGE folders)")
        if any(f in SPLIT_NAMES for f in folders) and not set(folders) <= set(SPLIT_NAMES):
            # Split folders beside others: an empty folder on a disk (lost+found, a checkpoint
            # folder) is no class folder and must not turn the splits into classes (items() never
            # sees it: it lists files).
            folders = [f for f in folders if f in SPLIT_NAMES or self.storage.list(f)]
        by_split = bool(folders) and set(folders) <= set(SPLIT_NAMES)
        parts = [ListingPart("", recursive=False, by_split=by_split)] if files else []
        for folder in sorted(folders, key=lambda name: f"{name}/"):  # the order of the paths under them
            if not by_split:
                parts.append(ListingPart(folder))
                continue
            classes, loose = self.storage.list_level(folder)
            parts.extend([ListingPart(folder, recursive=False, by_split=True)] if loose else [])
            parts.extend(ListingPart(f"{folder}/{name}", by_split=True)
                         for name in sorted(classes, key=lambda name: f"{name}/"))
        return parts

    def items_of(self, part: ListingPart) -> list[SourceItem]:
        objects = self.storage.list(part.path) if part.recursive else self.storage.list_level(part.path)[1]
        return [self._item(obj, part.by_split) for obj in objects]

    def locator_columns(self, items: list[SourceItem]) -> dict[str, Any]:
        import pyarrow as pa

        from stages.data.listing import small_dictionary

        # The path is the key and the extension, but for names the key had to clean: kept then only.
        exts = [posixpath.splitext(item.locator)[1] for item in items]
        return {"ext": small_dictionary(exts), "path": pa.array(
            [None if item.locator == item.key + ext else item.locator for item, ext in zip(items, exts, strict=True)],
            pa.string())}

    def item_from(self, key: str, split: str, label: str, size: int | None, loc: dict[str, Any]) -> SourceItem:
        path = loc["path"] or key + loc["ext"]
        return SourceItem(key=key, split=split, label=label, locator=path, origin=self.storage.uri_of(path),
                          size=size, filename=path.rsplit("/", 1)[-1])

    def _item(self, obj: ObjectInfo, by_split: bool) -> SourceItem:
        parts = obj.path.split("/")
        split, rest = (parts[0], parts[1:]) if by_split else ("train", parts)
        label = rest[0] if len(rest) >= 2 else None  # a file outside any class folder has no label
        return SourceItem(key=sanitize_key(posixpath.splitext(obj.path)[0]), split=split, label=label,
                          locator=obj.path, origin=self.storage.uri_of(obj.path), size=obj.size, filename=parts[-1],
                          refused=self._leaves_root(obj.path))

    def _leaves_root(self, rel: str) -> str | None:
        """On a disk, a symlink whose target lies outside the source folder is not followed."""
        path = self.storage.local_path(rel)
        if path is None or not path.is_symlink():
            return None
        root = self.storage.local_path()
        assert root is not None
        if path.resolve().is_relative_to(root.resolve()):
            return None
        return "symbolic link leading outside the source folder (not followed)"


class ListSource(Source):
    def __init__(self, list_uri: str, storage_settings: Any = None) -> None:
        self.list_uri = list_uri
        self.storage_settings = storage_settings
        self._stores: dict[str, Storage] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_stores": {}}

    def _store(self, parent: str) -> Storage:
        if parent not in self._stores:
            self._stores[parent] = open_storage(parent or ".", self.storage_settings)
        return self._stores[parent]

    @property
    def _where(self) -> tuple[Storage, str]:
        parent, _, name = self.list_uri.rstrip("/").rpartition("/")
        if not name.endswith((".csv", ".jsonl")):
            raise VitpipeError(f"{self.list_uri}: expected a .csv or .jsonl file")
        return self._store(parent), name

    _header: list[str] | None = None  # a CSV's column names, read once (and sent to the listing tasks)

    def _csv_header(self) -> list[str]:
        if self._header is None:
            store, name = self._where
            with store.open_range(name, 0, 1 << 16) as f:
                first = f.readline().decode("utf-8-sig")
            header = next(csv.reader([first]), [])
            if "path" not in header:
                raise VitpipeError(f"{self.list_uri}: CSV needs a header with a 'path' column (and 'label')")
            self._header = header
        return self._header

    def parts(self) -> list[ListingPart]:
        """A list file past ``LIST_PART_BYTES`` is listed in byte ranges by several tasks (each
        takes the lines that begin in its range); a smaller one in one go."""
        store, name = self._where
        size = store.size(name)
        if size is None:
            raise VitpipeError(f"{self.list_uri}: no such file")
        if name.endswith(".csv"):
            self._csv_header()
        if size <= LIST_PART_BYTES:
            return []
        return [ListingPart(name, start=start, end=min(start + LIST_PART_BYTES, size))
                for start in range(0, size, LIST_PART_BYTES)]

    def items(self) -> list[SourceItem]:
        return self.items_of(ListingPart(self._where[1]))

    def items_of(self, part: ListingPart) -> list[SourceItem]:
        return self.list_part(part)[0]

    def list_part(self, part: ListingPart) -> tuple[list[SourceItem], tuple[int, int] | None]:
        parent = self.list_uri.rstrip("/").rpartition("/")[0]
        rows, span = self._rows(part)
        items = []
        for row in rows:
            path = str(row.get("path") or "")
            uri = path if (is_s3_uri(path) or path.startswith("/")) else f"{parent}/{path}" if parent else path
            label = row.get("label")
            label = None if label in (None, "") else str(label)
            stem = posixpath.splitext(path.split("://", 1)[-1])[0]
            items.append(SourceItem(key=sanitize_key(stem), split=str(row.get("split") or "train"), label=label,
                                    locator=uri, origin=uri, filename=uri.rsplit("/", 1)[-1]))
        return items, span

    def _rows(self, part: ListingPart) -> tuple[list[dict[str, Any]], tuple[int, int] | None]:
        """The part's rows; for a CSV, with the bytes its records span (a JSON line holds no raw
        newline, so a JSONL line is a record: its parts need no check)."""
        store, name = self._where
        size = store.size(name) or 0
        if name.endswith(".csv"):
            header = self._csv_header()
            records, span = self._csv_records(part, size)
            return [dict(zip(header, record, strict=False)) for record in records], span
        rows = []
        for at, line in self._lines(part, size):
            if part.end is not None and at >= part.end:
                break
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise VitpipeError(f"{self.list_uri}: the line at byte {at}: not valid JSON") from None
        return rows, None

    def _csv_records(self, part: ListingPart, size: int) -> tuple[list[list[str]], tuple[int, int]]:
        """The CSV records (header aside) that begin in the part's byte range, as the csv module
        reads them — a quoted field may hold newlines, so a record may run on past ``end`` — and
        the bytes they span. A part that began inside such a field is found by its span (it
        begins before the part before ends) and listed again from there (``stages.ingest``)."""
        lines = self._lines(part, size)  # its file closed when the generator is let go, at return
        first = next(lines, None)
        begin = position = size if first is None else first[0]

        def feed() -> Iterator[str]:  # ``position``: where the line the reader takes next begins
            nonlocal position
            for at, line in itertools.chain([first] if first else [], lines):
                position = at + len(line)
                yield line.decode("utf-8-sig")

        reader, records = csv.reader(feed()), []
        while part.end is None or position < part.end:
            at = position
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise VitpipeError(f"{self.list_uri}: the CSV record at byte {at}: {err}") from None
            if at > 0 and record:  # not the header, nor an empty line
                records.append(record)
        return records, (begin, position)

    def _lines(self, part: ListingPart, size: int) -> Iterator[tuple[int, bytes]]:
        """(offset, line) of each line from the first that begins in the part's byte range (the
        line running into ``start`` belongs to the part before) to the end of the file: the
        caller stops."""
        store, name = self._where
        at = part.start if part.exact else max(part.start - 1, 0)
        with store.open_range(name, at, size) as f:
            if part.start > 0 and not part.exact:
                at += len(f.readline())  # to the end of the line that holds byte start - 1
            for line in f:
                yield at, line
                at += len(line)

    def locator_columns(self, items: list[SourceItem]) -> dict[str, Any]:
        import pyarrow as pa

        return {"uri": pa.array([item.locator for item in items], pa.string())}

    def item_from(self, key: str, split: str, label: str, size: int | None, loc: dict[str, Any]) -> SourceItem:
        uri = loc["uri"]
        return SourceItem(key=key, split=split, label=label, locator=uri, origin=uri, size=size,
                          filename=uri.rsplit("/", 1)[-1])

    def read(self, item: SourceItem) -> bytes:
        parent, _, name = str(item.locator).rpartition("/")
        return self._store(parent).read_bytes(name)


@dataclass(frozen=True, slots=True)
class TarLocator:
    """Where a sample of a source shard is: its position among the shard's samples (-1: a member
    refused, or the damage of a damaged shard) and the bytes it spans (``TarSample``)."""

    shard: str
    index: int
    start: int = 0
    end: int = 0


class WebDatasetSource(StorageSource):
    """Existing shards under ``root`` (every ``*.tar``), in name order."""

    random_access = False  # a shard mixing samples of many source shards would stream all of them
    # Where listing tasks keep what they stream and writing tasks look first (mode: copy from S3:
    # stages.data.shard_cache); None: the source is read again.
    cache: ShardCache | None = None

    def shards(self) -> list[ObjectInfo]:
        """Every ``*.tar`` under the root (with sizes), in name order; one listing."""
        shards = sorted((o for o in self.storage.list() if o.path.endswith(".tar")), key=lambda o: o.path)
        if not shards:
            raise VitpipeError(f"{self.root}: no .tar shards found")
        return shards

    _names: list[str] | None | bool = False  # classes.json, read once (False: not yet)

    def class_names(self) -> list[str] | None:
        if self._names is False:
            store = self.storage
            data = json.loads(store.read_text("classes.json")) if store.exists("classes.json") else None
            self._names = None if data is None else list(data["classes"] if isinstance(data, dict) else data)
        return self._names  # type: ignore[return-value]

    def items(self) -> list[SourceItem]:
        return [item for part in self.parts() for item in self.items_of(part)]

    def parts(self) -> list[ListingPart]:
        """One per shard: each streamed by its own task (the listing reads every byte once)."""
        self.class_names()  # read here, so that the tasks get it with the source
        return [ListingPart(o.path, size=o.size) for o in self.shards()]

    def items_of(self, part: ListingPart) -> list[SourceItem]:
        from stages.data.tarshards import BadShard, iter_tar_spans

        shard, names, items = part.path, self.class_names(), []
        split, uri = split_of_path(shard), self.storage.uri_of(shard)

        def refuse(member: str, reason: str) -> None:
            items.append(SourceItem(key=sanitize_key(f"{shard}-refused-{member}"), split=split, label=None,
                                    locator=TarLocator(shard, -1), origin=f"{uri}#{member}", refused=reason))

        with contextlib.ExitStack() as stack:
            f = stack.enter_context(self.storage.open_read(shard))
            if self.cache is not None:  # what is streamed is kept, for the writing tasks to read here
                f = stack.enter_context(self.cache.tee(f, shard, part.size))
            try:
                # Only the label members are read: on a local disk the images are seeked over, so
                # that mode: copy reads each image once, when its new shard is written.
                for index, sample in enumerate(iter_tar_spans(f, name=shard, refused=refuse,
                                                              wanted=LABEL_EXTENSIONS.__contains__)):
                    items.append(SourceItem(key=sanitize_key(sample.key), split=split,
                                            label=label_name(sample.files, names), origin=f"{uri}#{sample.key}",
                                            locator=TarLocator(shard, index, sample.start, sample.end)))
            except BadShard as err:
                log.warning("%s; samples after the damage are skipped", err)
                items.append(SourceItem(key=sanitize_key(f"{shard}-damaged"), split=split, label=None,
                                        locator=TarLocator(shard, -1), origin=f"{uri}: {err}"))
        return items

    def locator_columns(self, items: list[SourceItem]) -> dict[str, Any]:
        import pyarrow as pa

        # The sample's own key only where cleaning changed it (for its origin, ``URI#KEY``).
        members = [item.origin[len(self.storage.uri_of(item.locator.shard)) + 1:] for item in items]
        return {"shard": pa.array([item.locator.shard for item in items], pa.string()).dictionary_encode(),
                "index": pa.array([item.locator.index for item in items], pa.int32()),
                "start": pa.array([item.locator.start for item in items], pa.int64()),
                "end": pa.array([item.locator.end for item in items], pa.int64()),
                "member": pa.array([None if member == item.key else member
                                    for item, member in zip(items, members, strict=True)], pa.string())}

    def item_from(self, key: str, split: str, label: str, size: int | None, loc: dict[str, Any]) -> SourceItem:
        return SourceItem(key=key, split=split, label=label, size=size,
                          locator=TarLocator(loc["shard"], loc["index"], loc["start"], loc["end"]),
                          origin=f"{self.storage.uri_of(loc['shard'])}#{loc['member'] or key}")

    def read_many(self, items: list[SourceItem]) -> Iterator[tuple[SourceItem, bytes | Exception]]:
        # From each source shard, one ranged read from the first wanted sample's first byte to the
        # last one's last: a shard's samples are cut into new shards in order, so a writing task
        # reads its own part of a source shard, never the whole of it (a 10k-sample source shard
        # cut into shards of 1000 was read whole by each of ten tasks).
        from stages.data.images import BadImage, image_member
        from stages.data.tarshards import BadShard, iter_tar_samples

        found: dict[tuple[str, int], bytes | Exception] = {}
        wanted: dict[str, list[TarLocator]] = {}
        for item in items:
            if item.locator.index >= 0:
                wanted.setdefault(item.locator.shard, []).append(item.locator)
        for shard, locators in wanted.items():
            first, last = min(locators, key=lambda loc: loc.index), max(locators, key=lambda loc: loc.index)
            indices = {loc.index for loc in locators}
            try:
                with self._open_range(shard, first.start, last.end) as f:
                    for i, (_key, files) in enumerate(iter_tar_samples(f, name=shard), start=first.index):
                        if i in indices:
                            try:
                                found[(shard, i)] = image_member(files)
                            except ValueError as err:
                                found[(shard, i)] = BadImage(f"sample has {err}")
            except BadShard as err:
                for i in indices:
                    found.setdefault((shard, i), BadImage(str(err)))
        for item in items:
            yield item, found.get((item.locator.shard, item.locator.index), BadImage("shard is truncated or corrupt"))


    def _open_range(self, shard: str, start: int, end: int) -> BinaryIO:
        """Bytes of a source shard: from a copy the listing kept when there is one, else the source."""
        if self.cache is None:
            return self.storage.open_range(shard, start, end)
        return self.cache.open_anywhere(shard, start, end, lambda at: self.storage.open_range(shard, at, end))

    def with_cache(self, cache: ShardCache | None) -> WebDatasetSource:
        """This source reading through ``cache`` (a writing task's, naming its shards' copies)."""
        source = copy.copy(self)
        source.cache = cache
        return source


LABEL_EXTENSIONS = frozenset({"cls", "txt", "json"})  # the members :func:`label_name` reads


def label_name(files: dict[str, bytes], names: list[str] | None) -> str | None:
    """A sample's class name from ``KEY.cls`` (index into ``names``), ``KEY.txt`` or ``KEY.json``."""
    try:
        if "cls" in files:
            index = int(files["cls"].decode().strip())
            return names[index] if names is not None and 0 <= index < len(names) else str(index)
        if "txt" in files:
            return files["txt"].decode().strip() or None
        if "json" in files:
            meta = json.loads(files["json"])
            value = meta.get("label", meta.get("class")) if isinstance(meta, dict) else None
            return None if value is None else str(value)
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def sort_labels(labels: Iterable[str]) -> list[str]:
    """Class order: numeric when every label is an integer ("2" before "10"), else lexicographic."""
    labels = list(labels)
    if labels and all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def make_source(kind: str, path: str | None, image_size: int, storage_settings: Any = None,
                columns: tuple[str, str] = ("image", "label")) -> Source:
    """``columns``: a ``parquet`` source's image and label columns."""
    if kind == "digits":
        return DigitsSource(image_size=image_size)
    if not path:
        raise VitpipeError(f"source {kind!r} needs a path")
    if kind == "imagefolder":
        return ImageFolderSource(path, storage_settings)
    if kind == "list":
        return ListSource(path, storage_settings)
    if kind == "webdataset":
        return WebDatasetSource(path, storage_settings)
    if kind == "parquet":
        from stages.data.parquet_source import ParquetSource

        return ParquetSource(path, storage_settings, *columns)
    raise VitpipeError(f"unknown source {kind!r}")
