"""``parquet``: a Hugging Face-style dataset of Parquet files, local or on S3.

Layout: every ``*.parquet`` under the path, in name order; the split from the file's name or
folder (``train-00000-of-00004.parquet``, ``data/validation-....parquet``, ``test/0000.parquet``;
``validation`` and ``valid`` mean ``val``; anything else is ``train``). The image column holds
encoded bytes, or Hugging Face's ``Image`` struct ``{bytes, path}``; the label column an integer
(a ``ClassLabel``: its names come from the ``huggingface`` schema metadata when present) or a
string. A missing label or image is a recorded skip.

Reads are by row group, through the file's footer: listing reads the label column only, and a
shard-writing task reads the image column of each row group it needs once. On S3 every read is a
ranged GET (:meth:`~pipeline.storage.Storage.read_range`), so nobody downloads a whole file.
Rows come in file order (``random_access`` is False), as for a ``webdataset`` source: gathering a
shard's rows from everywhere would read every row group many times over.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterator
from typing import Any

from pipeline.errors import VitpipeError
from stages.data.images import BadImage
from stages.data.sources import ListingPart, SourceItem, StorageSource, sanitize_key, split_of_path

__all__ = ["ParquetSource"]

class _RangeFile(io.RawIOBase):
    """A seekable, read-only file over ranged reads of one object: how pyarrow reads a Parquet
    file on S3 (its footer, then the column chunks it wants) through our storage and its retries."""

    def __init__(self, storage: Any, rel: str, size: int) -> None:
        self._storage, self._rel, self._size, self._pos = storage, rel, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._storage.read_range(self._rel, self._pos, min(len(view), max(0, self._size - self._pos)))
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


class ParquetSource(StorageSource):
    random_access = False  # rows are read by row group: see the module's docstring

    def __init__(self, root: str, storage_settings: Any = None, image_column: str = "image",
                 label_column: str = "label") -> None:
        super().__init__(root, storage_settings)
        self.image_column = image_column
        self.label_column = label_column
        self._sizes: dict[str, int] = {}

    def _files(self) -> list[str]:
        found = {o.path: o.size for o in self.storage.list() if o.path.endswith(".parquet")}
        if not found:
            raise VitpipeError(f"{self.root}: no .parquet files found")
        self._sizes.update(found)
        return sorted(found)

    def _open(self, rel: str) -> Any:
        import pyarrow.parquet as pq

        local = self.storage.local_path(rel)
        if local is not None:
            return pq.ParquetFile(str(local))
        size = self._sizes.get(rel)
        if size is None:
            size = self.storage.size(rel) or 0
        return pq.ParquetFile(_RangeFile(self.storage, rel, size))

    def _check_columns(self, rel: str, names: list[str]) -> None:
        missing = [c for c in (self.image_column, self.label_column) if c not in names]
        if missing:
            raise VitpipeError(f"{self.storage.uri_of(rel)}: no column {', '.join(map(repr, missing))} (it has "
                               f"{', '.join(names)}); set image_column / label_column")

    _names: list[str] | None | bool = False  # read once (False: not yet)

    def class_names(self) -> list[str] | None:
        """A ``ClassLabel``'s names from the first file's ``huggingface`` schema metadata, if any."""
        if self._names is False:
            self._names = self._read_class_names()
        return self._names  # type: ignore[return-value]

    def _read_class_names(self) -> list[str] | None:
        metadata = self._open(self._files()[0]).schema_arrow.metadata or {}
        try:
            info = json.loads(metadata[b"huggingface"])
            feature = info["info"]["features"][self.label_column]
        except (KeyError, ValueError, TypeError):
            return None
        names = feature.get("names") if isinstance(feature, dict) else None
        return [str(n) for n in names] if isinstance(names, list) else None

    def items(self) -> list[SourceItem]:
        return [item for part in self.parts() for item in self.items_of(part)]

    def parts(self) -> list[ListingPart]:
        """One per file: its footer and label column read by its own task."""
        self.class_names()  # read here, so that the tasks get it (and the files' sizes) with the source
        return [ListingPart(rel) for rel in self._files()]

    def items_of(self, part: ListingPart) -> list[SourceItem]:
        rel, names, items = part.path, self.class_names(), []
        parquet = self._open(rel)
        self._check_columns(rel, parquet.schema_arrow.names)
        labels = parquet.read(columns=[self.label_column]).column(0).to_pylist()
        split, stem, row = split_of_path(rel), posixpath.splitext(rel)[0], 0
        for group in range(parquet.num_row_groups):
            for index in range(parquet.metadata.row_group(group).num_rows):
                items.append(SourceItem(key=sanitize_key(f"{stem}/{row:09d}"), split=split,
                                        label=_label_name(labels[row], names), locator=(rel, group, index),
                                        origin=f"{self.storage.uri_of(rel)}#row={row}"))
                row += 1
        return items

    def locator_columns(self, items: list[SourceItem]) -> dict[str, Any]:
        import pyarrow as pa

        return {"file": pa.array([item.locator[0] for item in items], pa.string()).dictionary_encode(),
                "group": pa.array([item.locator[1] for item in items], pa.int32()),
                "index": pa.array([item.locator[2] for item in items], pa.int32()),
                "row": pa.array([int(item.origin.rsplit("#row=", 1)[1]) for item in items], pa.int64())}

    def item_from(self, key: str, split: str, label: str, size: int | None, loc: dict[str, Any]) -> SourceItem:
        return SourceItem(key=key, split=split, label=label, size=size, locator=(loc["file"], loc["group"], loc["index"]),
                          origin=f"{self.storage.uri_of(loc['file'])}#row={loc['row']}")

    def read(self, item: SourceItem) -> bytes:
        found = next(self.read_many([item]))[1]
        if isinstance(found, Exception):
            raise found
        return found

    def read_many(self, items: list[SourceItem]) -> Iterator[tuple[SourceItem, bytes | Exception]]:
        # Each row group's image column is read once for all the items wanted from it.
        files: dict[str, Any] = {}
        groups: dict[tuple[str, int], list[Any] | Exception] = {}
        for item in items:
            rel, group, index = item.locator
            if (rel, group) not in groups:
                try:
                    parquet = files.get(rel) or files.setdefault(rel, self._open(rel))
                    groups[(rel, group)] = parquet.read_row_group(group, columns=[self.image_column]).column(
                        0).to_pylist()
                except Exception as err:  # noqa: BLE001 - every item of the group is skipped with the reason
                    groups[(rel, group)] = err
            values = groups[(rel, group)]
            yield item, values if isinstance(values, Exception) else _image_bytes(values[index])


def _label_name(value: Any, names: list[str] | None) -> str | None:
    if value is None:
        return None
    if names is not None and isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    return str(value)


def _image_bytes(value: Any) -> bytes | Exception:
    """An image cell's bytes: plain binary, or Hugging Face's ``{bytes, path}`` struct."""
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, bytes | bytearray) and value:
        return bytes(value)
    return BadImage("no image bytes in the row")
