"""Source shards kept on the local disk of the node that listed them, so that ``mode: copy`` reads
a remote webdataset corpus once.

Copy mode must list every source shard before it writes any new one: the class list written into
each ``KEY.cls``, the duplicate keys across source shards (the first in source order is kept) and
the shard boundaries all depend on the whole listing. On S3, listing a tar means streaming it
(its member headers sit between the images), and the writing tasks then read each sample's bytes
again: twice the corpus. Here the listing task copies what it streams to its node's disk
(:meth:`ShardCache.tee`), the coordinator asks each node which copies it holds
(:func:`held_on_nodes`), and each writing task is sent, where it can, to the node holding most of
its bytes (:func:`preferred_node`), where it reads them from the copy. A source shard is read from
S3 again only where its copy is missing: a writing task placed elsewhere (its node was full), a
node lost since, a disk without room (:attr:`ShardCache.keep_free`).

A copy appears under its final name only once the whole object has been read through it (written
to a dot-file, renamed): a listing task killed mid-shard leaves a dot-file, never a short copy.
The copies are removed when the ingest ends, however it ends (:func:`clear_on_nodes`); a
coordinator killed outright leaves them to the resumed ingest, which uses them (they hold the
bytes the saved listing was made from) and then removes them. The folder is
``$TMPDIR/vitpipe-source-cache/<stage>`` on every node.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from pipeline.storage import LocalStorage, StorageError

__all__ = ["KEEP_FREE", "ShardCache", "clear_on_nodes", "held_on_nodes", "preferred_node"]

log = logging.getLogger(__name__)

KEEP_FREE = 0.10  # of a node's disk, left free: Ray spills its object store to the same disk
_PART = ".part"  # a copy being written: ``.<random>.<expected size>.part``


@dataclass(frozen=True)
class ShardCache:
    """One ingest's copies of its source shards on each node's local disk."""

    stage: str  # this ingest's own folder (a hash of its stage folder's URI)
    folder: str | None = None  # the folders' parent; None: $TMPDIR/vitpipe-source-cache, resolved on each node
    keep_free: float = KEEP_FREE
    # For a writing task: the node holding each of its source shards' copies (by shard), read from
    # there when this node holds none (a shard task spans source shards kept on different nodes).
    peers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def for_stage(cls, stage_uri: str) -> ShardCache:
        """The copies of the ingest writing to ``stage_uri``."""
        return cls(hashlib.sha256(stage_uri.encode()).hexdigest()[:16])

    @property
    def root(self) -> str:
        """This node's folder of copies (each node's TMPDIR: GPU and CPU nodes may differ)."""
        return os.path.join(self.folder or os.path.join(tempfile.gettempdir(), "vitpipe-source-cache"), self.stage)

    @staticmethod
    def name_of(shard: str) -> str:
        """The copy's file name: a hash of the shard's path (paths may nest and hold any character)."""
        return hashlib.sha256(shard.encode()).hexdigest()[:32] + ".tar"

    def holds(self, shard: str) -> bool:
        return os.path.isfile(os.path.join(self.root, self.name_of(shard)))

    @contextlib.contextmanager
    def tee(self, stream: BinaryIO, shard: str, size: int | None) -> Iterator[BinaryIO]:
        """``stream``, copying what is read from it to this node's copy of ``shard`` (``size``
        bytes). When the block ends without an error the rest of the stream is read through too
        (a tar's end padding, what follows a damaged member), and the copy is kept if it has every
        byte. Without room for it (or a size to check it by), ``stream`` itself."""
        if size is None or not self._room_for(size):
            yield stream
            return
        os.makedirs(self.root, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=".", suffix=f".{size}{_PART}")
        kept = False
        try:
            with os.fdopen(fd, "wb") as copy:
                reader = io.BufferedReader(_Tee(stream, copy), buffer_size=1 << 20)
                yield reader  # type: ignore[misc]
                while reader.read(1 << 20):
                    pass
            kept = os.path.getsize(temp) == size
            if kept:
                os.replace(temp, os.path.join(self.root, self.name_of(shard)))
            else:
                log.warning("%s: read %d bytes of %d; not kept on this node", shard, os.path.getsize(temp), size)
        finally:
            if not kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)

    def open_range(self, shard: str, start: int, end: int) -> BinaryIO | None:
        """Bytes ``[start, end)`` of this node's copy of ``shard``; None when it holds none."""
        try:
            return LocalStorage(self.root).open_range(self.name_of(shard), start, end)
        except StorageError:  # no copy here (never made, or removed): the caller reads the source
            return None

    def read_range(self, shard: str, start: int, end: int) -> bytes | None:
        """:meth:`open_range`, read (what a peer node's task sends back)."""
        copy = self.open_range(shard, start, end)
        if copy is None:
            return None
        with copy:
            return copy.read()

    def open_anywhere(self, shard: str, start: int, end: int,
                      source: Callable[[int], BinaryIO]) -> BinaryIO:
        """Bytes ``[start, end)`` of ``shard``: from this node's copy; else from the copy on the
        node :attr:`peers` names (over Ray, in pieces); else — or from where a peer stops
        answering — from ``source(position)``, a reader of the source from that byte to ``end``."""
        local = self.open_range(shard, start, end)
        if local is not None:
            return local
        node = self.peers.get(shard)
        if node is None:
            return source(start)
        return io.BufferedReader(_PeerRange(replace(self, peers={}), node, shard, start, end, source),
                                 buffer_size=1 << 20)  # type: ignore[return-value]

    def _room_for(self, size: int) -> bool:
        """Whether a copy of ``size`` bytes leaves ``keep_free`` of the disk free, counting what the
        copies being written beside it still need (each dot-file's name says its full size)."""
        os.makedirs(self.root, exist_ok=True)
        usage = shutil.disk_usage(self.root)
        owed = 0
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") and entry.name.endswith(_PART):
                with contextlib.suppress(ValueError, FileNotFoundError):
                    owed += max(0, int(entry.name[:-len(_PART)].rsplit(".", 1)[1]) - entry.stat().st_size)
        return usage.free - owed - size >= self.keep_free * usage.total

    def held(self) -> list[str]:
        """The names of the whole copies on this node."""
        try:
            return sorted(e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_file())
        except FileNotFoundError:
            return []

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class _Tee(io.RawIOBase):
    """A reader of ``stream`` that writes every byte it reads to ``copy``."""

    def __init__(self, stream: BinaryIO, copy: BinaryIO) -> None:
        self._stream, self._copy = stream, copy

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._copy.write(data)
        return n


PEER_PIECE = 16 << 20  # bytes a peer node sends back at a time: a writing task's heap holds one


class _PeerRange(io.RawIOBase):
    """Bytes ``[start, end)`` of a copy on another node, ``PEER_PIECE`` at a time, each read by a
    zero-CPU task pinned to that node; from the first piece it cannot send (node lost, copy
    gone), the rest from the source."""

    def __init__(self, cache: ShardCache, node: str, shard: str, start: int, end: int,
                 source: Callable[[int], BinaryIO]) -> None:
        self._cache, self._node, self._shard = cache, node, shard
        self._position, self._end, self._source = start, end, source
        self._piece = memoryview(b"")
        self._fallback: BinaryIO | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._fallback is not None:
            return self._fallback.readinto(buffer)  # type: ignore[attr-defined]
        if not self._piece and self._position < self._end:
            piece = self._fetch(self._position, min(self._position + PEER_PIECE, self._end))
            if piece is None:
                self._fallback = self._source(self._position)
                return self._fallback.readinto(buffer)  # type: ignore[attr-defined]
            self._piece, self._position = memoryview(piece), self._position + len(piece)
        n = min(len(buffer), len(self._piece))
        buffer[:n] = self._piece[:n]
        self._piece = self._piece[n:]
        return n

    def _fetch(self, start: int, end: int) -> bytes | None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        global _remote_read_copy
        if _remote_read_copy is None:
            _remote_read_copy = ray.remote(num_cpus=0, max_retries=0)(_read_copy)
        task = _remote_read_copy.options(scheduling_strategy=NodeAffinitySchedulingStrategy(self._node, soft=False))
        try:
            piece = ray.get(task.remote(self._cache, self._shard, start, end))
        except Exception as err:  # noqa: BLE001 - the node is gone: the source has the bytes
            log.warning("%s: the copy on node %s did not answer (%s); reading the source", self._shard,
                        self._node[:12], " ".join(str(err).split())[:200])
            return None
        if piece is None or len(piece) != end - start:
            log.warning("%s: node %s no longer holds its copy; reading the source", self._shard, self._node[:12])
            return None
        return piece

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
        super().close()


def _read_copy(cache: ShardCache, shard: str, start: int, end: int) -> bytes | None:
    return cache.read_range(shard, start, end)


_remote_read_copy: Any = None  # made once per process: a remote function is exported when made


def preferred_node(bytes_by_shard: Mapping[str, int], node_of_copy: Mapping[str, str]) -> str | None:
    """The node holding copies of the most of a writing task's bytes (``node_of_copy``: by copy
    name, :func:`held_on_nodes`); the lower node id on a tie, so that the choice does not depend
    on dict order; None when no node holds any (pure)."""
    on_node: dict[str, int] = {}
    for shard, size in bytes_by_shard.items():
        node = node_of_copy.get(ShardCache.name_of(shard))
        if node is not None:
            on_node[node] = on_node.get(node, 0) + size
    return min(on_node, key=lambda node: (-on_node[node], node)) if on_node else None


def _alive_nodes() -> list[str]:
    import ray

    return sorted(node["NodeID"] for node in ray.nodes() if node.get("Alive"))


def _on_each_node(cache: ShardCache, method: str) -> dict[str, object]:
    """``cache.<method>()`` run on every live node (a zero-CPU task pinned to it: it does not wait
    for a busy node's cores), by node id; a node lost meanwhile is left out, with a warning."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    call = ray.remote(num_cpus=0, max_retries=0)(_call)
    refs = {node: call.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(cache, method)
            for node in _alive_nodes()}
    found: dict[str, object] = {}
    for node, ref in refs.items():
        try:
            found[node] = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a node gone: its disk (and copies) with it
            log.warning("source cache: node %s did not answer (%s)", node[:12], " ".join(str(err).split())[:200])
    return found


def _call(cache: ShardCache, method: str) -> object:
    return getattr(cache, method)()


def held_on_nodes(cache: ShardCache) -> dict[str, str]:
    """Which live node holds each copy, by the copy's name (:meth:`ShardCache.name_of`)."""
    node_of: dict[str, str] = {}
    for node, names in sorted(_on_each_node(cache, "held").items()):
        for name in names:  # type: ignore[attr-defined]
            node_of.setdefault(name, node)
    return node_of


def clear_on_nodes(cache: ShardCache) -> None:
    """Remove the copies from every live node."""
    _on_each_node(cache, "clear")
