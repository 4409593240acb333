"""Index mode: existing webdataset shards used in place, each streamed once to describe it.

A trusted corpus already sharded (by ``webdataset.ShardWriter``, img2dataset, an earlier pipeline)
need not be copied: ingest with ``mode: index`` reads every shard once, in a task of its own, and
records what the loader and the planner need — the number of samples (grouped the way the loader
groups them), the shard's size and sha256, and its labels — without writing a byte of image data.
The loader then reads the shards where they are, exactly as it reads ingest's own.

Labels come as ``KEY.cls`` (an index; names from a ``classes.json`` beside the shards when there
is one) or as a name (``KEY.txt``, ``KEY.json``'s ``label``); :func:`class_list` turns the counts of
all shards into one class list. A sample that cannot be used (no image member, no label, an image
failing ``validate``) stays in its shard — the loader skips it and counts it, as it does any
undecodable sample — and is recorded here with its reason. A shard that cannot be read to the end
is left out of the index, with a record saying how many samples it lost.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from pipeline.errors import VitpipeError
from pipeline.storage import Storage
from stages.data.images import BadImage, Validation, image_member, inspect_image
from stages.data.sources import label_name, sanitize_key, sort_labels, split_of_path
from stages.data.tarshards import BadShard, iter_tar_samples

__all__ = ["ShardIndex", "index_shard", "index_stats_path", "class_list", "INDEX_DIR"]

INDEX_DIR = "index"  # under the ingest stage's folder: one stats file per indexed shard


@dataclass
class ShardIndex:
    """What one pass over a source shard found. ``samples`` counts every sample the loader will
    meet, ``unusable`` of them recorded in ``skipped`` (with members refused, which are no sample)."""

    path: str  # relative to the corpus root
    split: str
    samples: int
    bytes: int
    sha256: str
    by_index: dict[str, int] = field(default_factory=dict)  # KEY.cls value -> samples
    by_name: dict[str, int] = field(default_factory=dict)  # KEY.txt / KEY.json label -> samples
    skipped: list[dict[str, str]] = field(default_factory=list)
    unusable: int = 0
    lost: int = 0  # samples of a damaged shard, left out of the index with it
    digest: str = ""  # the shard's listed size and the validation depth: a resumed ingest reuses it if equal

    @property
    def damaged(self) -> bool:
        return self.lost > 0


def index_stats_path(rel: str) -> str:
    """Where the stats of the shard at ``rel`` are kept in the stage folder (written last: present
    means indexed)."""
    return f"{INDEX_DIR}/{sanitize_key(posixpath.splitext(rel)[0])}.json"


class _HashingReader:
    """Passes a stream through, counting and hashing every byte read (tarfile streams through it)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> tuple[int, str]:
        """Read what the tar reader left (end blocks, padding) and return (size, sha256) of it all."""
        while self.read(1 << 20):
            pass
        return self.size, self._hash.hexdigest()


def index_shard(storage: Storage, rel: str, out: Storage, validation: Validation, digest: str) -> ShardIndex:
    """Stream the shard at ``rel`` once and write its stats to ``out`` (a Ray task: one per shard)."""
    uri = storage.uri_of(rel)
    index = ShardIndex(path=rel, split=split_of_path(rel), samples=0, bytes=0, sha256="", digest=digest)

    def refuse(member: str, reason: str) -> None:
        index.skipped.append({"origin": f"{uri}#{member}", "kind": "refused", "reason": reason})

    def skip(origin: str, kind: str, reason: str) -> None:
        index.skipped.append({"origin": origin, "kind": kind, "reason": reason})
        index.unusable += 1

    with storage.open_read(rel) as raw:
        stream = _HashingReader(raw)
        try:
            for key, files in iter_tar_samples(stream, name=uri, refused=refuse):  # type: ignore[arg-type]
                index.samples += 1
                _describe(index, f"{uri}#{key}", files, validation, skip)
        except BadShard as err:
            index.lost, index.samples, index.unusable = max(index.samples, 1), 0, 0
            index.by_index, index.by_name = {}, {}
            index.skipped = [{"origin": uri, "kind": "damaged shard",
                              "reason": f"{err}; left out of the index ({index.lost} samples read before)"}]
        index.bytes, index.sha256 = stream.drain() if not index.damaged else (stream.size, "")
    out.write_text(index_stats_path(rel), json.dumps(asdict(index), sort_keys=True))
    return index


def _describe(index: ShardIndex, origin: str, files: dict[str, bytes], validation: Validation, skip: Any) -> None:
    try:
        image = image_member(files)
    except ValueError as err:
        skip(origin, "no image", f"sample has {err}")
        return
    if validation != "none":
        try:
            inspect_image(image, validation)
        except BadImage as err:
            skip(origin, "bad image", str(err))
            return
    if "cls" in files:
        try:
            value = str(int(files["cls"].decode().strip()))
        except (ValueError, UnicodeDecodeError):
            skip(origin, "missing label", "KEY.cls is not an integer")
            return
        index.by_index[value] = index.by_index.get(value, 0) + 1
        return
    name = label_name(files, None)
    if name is None:
        skip(origin, "missing label", "no label (.cls, .txt or .json)")
        return
    index.by_name[name] = index.by_name.get(name, 0) + 1


def class_list(indexes: Iterable[ShardIndex], names: list[str] | None, corpus: str) -> tuple[list[str], dict[str, dict[str, int]]]:
    """The corpus's class names in index order and each split's samples per class name (pure).

    ``names`` (a ``classes.json`` beside the shards) fixes the order when present; otherwise
    ``KEY.cls`` labels ``0..max`` are named by their number, or name labels are sorted
    (:func:`~stages.data.sources.sort_labels`). The loader maps a ``.cls`` index straight to the
    model's output and a name through this list, so a corpus mixing the two needs the file."""
    indexes = list(indexes)
    by_index: dict[int, int] = {}
    by_name: set[str] = set()
    for index in indexes:
        for value, n in index.by_index.items():
            by_index[int(value)] = by_index.get(int(value), 0) + n
        by_name.update(index.by_name)
    if names is None:
        if by_index and by_name:
            raise VitpipeError(f"{corpus}: some samples are labelled by index (.cls), others by name (.txt/.json); "
                               "add a classes.json (the names in index order) beside the shards")
        if min(by_index, default=0) < 0:
            raise VitpipeError(f"{corpus}: negative class index {min(by_index)} in a .cls member")
        names = [str(i) for i in range(max(by_index) + 1)] if by_index else sort_labels(by_name)
    outside = sorted(v for v in by_index if not 0 <= v < len(names))
    unknown = sorted(by_name - set(names))
    if outside or unknown:
        what = f"class indices {outside[:5]}" if outside else f"labels {unknown[:5]}"
        raise VitpipeError(f"{corpus}: {what} are not in classes.json ({len(names)} classes)")
    counts: dict[str, dict[str, int]] = {}
    for index in indexes:
        split = counts.setdefault(index.split, {})
        for value, n in index.by_index.items():
            split[names[int(value)]] = split.get(names[int(value)], 0) + n
        for name, n in index.by_name.items():
            split[name] = split.get(name, 0) + n
    return names, counts
