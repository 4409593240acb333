"""Source shards kept on the local disk of the node that listed them, so that ``mode: copy`` reads
a remote webdataset corpus once.

Copy mode must list every source shard before it writes any new one: the class list written into
each ``KEY.cls``, the duplicate keys across source shards (the first in source order is kept) and
the shard boundaries all depend on the whole listing. On S3, listing a tar means streaming it
(its member headers sit between the images), and the writing tasks then read each sample's bytes
again: twice the corpus. Here the listing task copies what it streams to its node's disk
(:meth:`ShardCache.tee`), the coordinator asks each node which copies it holds
(:func:`held_on_nodes`), and each writing task is sent to the node holding most of its bytes
(:func:`preferred_node`; to another when that node has no free core), where it reads them from the
copy — and what another node holds from that node (:meth:`ShardCache.open_anywhere`). A source
shard is read from S3 again only where no copy answers: a node lost since, a disk without room
(:attr:`ShardCache.keep_free`), on a memory file system. Like the listing's byte offsets, the
copies assume the source objects are not rewritten while the ingest runs.

A copy appears under its final name only once the whole object has been read through it (written
in ``.writing/``, renamed): a listing task killed mid-shard leaves a file in ``.writing/``, never a short copy.
The copies are removed when the ingest ends, however it ends (:func:`clear_on_nodes`); a
coordinator killed outright leaves them to the resumed ingest, which uses them (they hold the
bytes the saved listing was made from) and then removes them. The folder is
``$TMPDIR/vitpipe-source-cache/<stage>`` on every node.
"""

from __future__ import annotations

import contextlib
import fcntl
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
from stages.data.listing import memory_backed

__all__ = ["KEEP_FREE", "ShardCache", "clear_on_nodes", "held_on_nodes", "preferred_node"]

log = logging.getLogger(__name__)

KEEP_FREE = 0.20  # of a node's disk, left free by default: Ray spills its object store there, the ingest
# coordinator its listing, the writing tasks spool each shard they upload (ingest's ``cache_keep_free``)
_DRAIN_LIMIT = 1 << 20  # after the last sample, at most this is read through to complete a copy
_PART = ".part"  # a copy being written: ``.writing/<random>.<expected size>.part``
_WRITING = ".writing"  # apart from the copies: the room check scans only the copies being written


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
    def for_stage(cls, stage_uri: str, keep_free: float = KEEP_FREE) -> ShardCache:
        """The copies of the ingest writing to ``stage_uri``."""
        return cls(hashlib.sha256(stage_uri.encode()).hexdigest()[:16], keep_free=keep_free)

    @property
    def root(self) -> str:
        """This node's folder of copies (each node's TMPDIR: GPU and CPU nodes may differ)."""
        return os.path.join(self.folder or os.path.join(tempfile.gettempdir(), "vitpipe-source-cache"), self.stage)

    @staticmethod
    def name_of(shard: str) -> str:
        """The copy's file name: a hash of the shard's path (paths may nest and hold any character)."""
        return hashlib.sha256(shard.encode()).hexdigest()[:32] + ".tar"

    @contextlib.contextmanager
    def tee(self, stream: BinaryIO, shard: str, size: int | None) -> Iterator[BinaryIO]:
        """``stream``, copying what is read from it to this node's copy of ``shard`` (``size``
        bytes). When the block ends without an error, the little left unread (a tar's end
        padding) is read through too, and the copy kept if it has every byte. The copy never fails
        the reading: a disk error, or more than ``_DRAIN_LIMIT`` left unread (the rest of a damaged
        shard), drops it. Without room for it, or a size to check it by, ``stream`` itself."""
        temp = self._reserve(size) if size is not None else None
        try:
            tee = _Tee(stream, temp) if temp is not None else None
        except OSError as err:  # the folder cleared under it, or no file to be had: no copy
            log.info("%s: not kept on this node (%s)", shard, err)
            tee = None
        if tee is None:
            if temp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
            yield stream
            return
        kept = False
        try:
            reader = io.BufferedReader(tee, buffer_size=1 << 20)
            yield reader  # type: ignore[misc]
            kept = self._finish(reader, tee, shard, size)  # type: ignore[arg-type]
        finally:
            tee.close_copy()
            if not kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)

    def _finish(self, reader: BinaryIO, tee: _Tee, shard: str, size: int) -> bool:
        """Read the end of the stream through and rename the copy into place if it is whole."""
        try:
            left = _DRAIN_LIMIT
            while left > 0 and (data := reader.read(min(left, 1 << 16))):
                left -= len(data)
            if left <= 0 and reader.read(1):
                log.info("%s: more than %d bytes after the last sample; not kept on this node", shard, _DRAIN_LIMIT)
                return False
        except Exception as err:  # noqa: BLE001 - the listing has what it needs: the copy is only a saving
            log.info("%s: not kept on this node (reading its end: %s)", shard, " ".join(str(err).split())[:200])
            return False
        tee.close_copy()
        if tee.failed or tee.written != size:
            log.warning("%s: %s; not kept on this node", shard,
                        tee.failed or f"read {tee.written} bytes of {size}")
            return False
        try:
            os.replace(tee.path, os.path.join(self.root, self.name_of(shard)))
        except OSError as err:  # the folder cleared under it (a slow clear still running): no copy
            log.info("%s: not kept on this node (%s)", shard, err)
            return False
        return True

    def _reserve(self, size: int) -> str | None:
        """A new file in ``.writing/`` for a copy of ``size`` bytes, if it leaves ``keep_free`` of the disk free
        counting what the copies being written still need (each one's name says its full size;
        they sit apart, so that this scans a few files, not the node's thousands of copies):
        checked and made under a lock, so that the listing tasks of a node do not all take the
        same free space. None on a memory file system (the copies would be RAM)."""
        writing = os.path.join(self.root, _WRITING)
        try:
            os.makedirs(writing, exist_ok=True)
            if memory_backed(self.root):
                return None
            with open(os.path.join(self.root, ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                usage = shutil.disk_usage(self.root)
                owed = 0
                for entry in os.scandir(writing):
                    if entry.name.endswith(_PART):
                        with contextlib.suppress(ValueError, IndexError, FileNotFoundError):
                            owed += max(0, int(entry.name[:-len(_PART)].rsplit(".", 1)[1]) - entry.stat().st_size)
                if usage.free - owed - size < self.keep_free * usage.total:
                    return None
                fd, temp = tempfile.mkstemp(dir=writing, suffix=f".{size}{_PART}")
                os.close(fd)
                return temp
        except OSError as err:  # no folder to be had: read the source again, as without copies
            log.info("no copy of source shards in %s: %s", self.root, err)
            return None

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

    def held(self) -> list[str]:
        """The names of the whole copies on this node."""
        try:
            return sorted(e.name for e in os.scandir(self.root) if not e.name.startswith(".") and e.is_file())
        except FileNotFoundError:
            return []

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class _Tee(io.RawIOBase):
    """A reader of ``stream`` that writes every byte it reads to the file at ``path``, until a
    write fails (``failed`` says why): the reading goes on, the copy is dropped."""

    def __init__(self, stream: BinaryIO, path: str) -> None:
        self._stream, self.path = stream, path
        self._copy: BinaryIO | None = open(path, "wb")  # noqa: SIM115 - closed by close_copy
        self.written = 0
        self.failed: str | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        if self._copy is not None:
            try:
                self._copy.write(data)
                self.written += n
            except OSError as err:  # a full disk: this copy is dropped, the listing goes on
                self.failed = f"writing the copy: {err}"
                self.close_copy()
        return n

    def close_copy(self) -> None:
        if self._copy is not None:
            copy, self._copy = self._copy, None
            try:
                copy.close()
            except OSError as err:
                self.failed = self.failed or f"closing the copy: {err}"


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
            piece = ray.get(task.remote(self._cache, self._shard, start, end), timeout=PEER_TIMEOUT_S)
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
    for a busy node's cores), by node id; a node lost meanwhile, or silent for ``NODE_TIMEOUT_S``
    (wedged, or slow to delete), is left out with a warning."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    global _remote_call
    if _remote_call is None:
        _remote_call = ray.remote(num_cpus=0, max_retries=0)(_call)
    refs = {_remote_call.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
        cache, method): node for node in _alive_nodes()}
    ready, silent = ray.wait(list(refs), num_returns=len(refs), timeout=NODE_TIMEOUT_S)
    found: dict[str, object] = {}
    for ref in ready:
        try:
            found[refs[ref]] = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a node gone: its disk (and copies) with it
            log.warning("source cache: node %s did not answer (%s)", refs[ref][:12], " ".join(str(err).split())[:200])
    for ref in silent:  # not cancelled: a clear of a terabyte of copies may just be slow, and finishes
        log.warning("source cache: node %s did not answer %s in %d s; going on without it", refs[ref][:12],
                    method, NODE_TIMEOUT_S)
    return found


def _call(cache: ShardCache, method: str) -> object:
    return getattr(cache, method)()


_remote_call: Any = None
NODE_TIMEOUT_S = 120  # a live node's zero-CPU task answers in seconds; past this it is wedged
PEER_TIMEOUT_S = 300  # for one piece from a peer: then the source is read instead


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
