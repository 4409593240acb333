"""Reading and writing webdataset shards: plain tar files, one sample = consecutive members
``KEY.EXT`` sharing a key.

Writing is deterministic (fixed mtime, owner and mode), so the same samples always give the same
bytes and checksum. Reading streams (no seeking), groups members by key the way ``webdataset``
does (the key is the member path up to the first dot of its base name), and reports a truncated
or corrupt tar as :class:`BadShard` instead of a traceback.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["ShardInfo", "BadShard", "TarSample", "split_key", "ShardTarWriter", "iter_tar_samples", "iter_tar_spans",
           "refusal"]


@dataclass(frozen=True, slots=True)
class TarSample:
    """A sample and the bytes of the tar it spans: ``[start, end)`` from its first member's header
    (extended headers included) to the end of its last member's padded data, relative to where the
    reader started. Reading just that range gives back the sample (a tar without an end marker)."""

    key: str
    files: dict[str, bytes]
    start: int
    end: int


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the storage it is read from
    samples: int  # as its ingest manifest counts them


class BadShard(ValueError):
    """A shard that cannot be read to the end (truncated, corrupt, not a tar)."""


def split_key(path: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``), webdataset's convention."""
    head, _, base = path.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, ext if dot else ""


class ShardTarWriter:
    """Writes samples to a binary stream as a deterministic tar.

    The bytes are exactly those of ``tarfile`` in stream mode (USTAR headers from
    ``TarInfo.tobuf``, data padded to 512-byte blocks, two zero blocks and padding to a 10240-byte
    record at the end: tested), written directly: ``TarFile.addfile`` copies each header object
    and the data through a file object in chunks, which took about half of ingest's time per image.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._offset = 0
        self.samples = 0

    def write(self, key: str, files: Mapping[str, bytes]) -> None:
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample keys may not contain '.' in their last part: {key!r}")
        for ext in sorted(files):
            data = files[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            padding = -len(data) % tarfile.BLOCKSIZE
            self._stream.write(b"".join((header, data, bytes(padding))))
            self._offset += len(header) + len(data) + padding
        self.samples += 1

    def close(self) -> None:
        end = 2 * tarfile.BLOCKSIZE  # the end-of-archive marker, then zeros to a whole record
        self._stream.write(bytes(end + -(self._offset + end) % tarfile.RECORDSIZE))
        self._offset = -1  # closed

    def __enter__(self) -> ShardTarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refusal(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not become (part of) a sample, or None. Members are read into memory,
    never extracted, so nothing is followed or written outside; but a link or device has no bytes of
    its own, and a name reaching outside its folder would carry on into our shards' names (and bite
    whoever extracts them)."""
    if member.issym() or member.islnk():
        return f"tar member {member.name!r} is a {'symbolic' if member.issym() else 'hard'} link (not followed)"
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return f"tar member {member.name!r} is a device or FIFO entry"
    parts = member.name.replace("\\", "/").split("/")
    if member.name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        return f"tar member {member.name!r} has an unsafe path (absolute or with '..')"
    return None


def iter_tar_samples(stream: BinaryIO, name: str = "shard",
                     refused: Callable[[str, str], None] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample, streaming. Raises BadShard on a damaged tar.

    Members that are not plain files with safe names (:func:`refusal`) are never part of a sample;
    ``refused(member name, reason)`` hears of each (directories are not members, silently)."""
    for sample in iter_tar_spans(stream, name, refused):
        yield sample.key, sample.files


def iter_tar_spans(stream: BinaryIO, name: str = "shard", refused: Callable[[str, str], None] | None = None,
                   wanted: Callable[[str], bool] | None = None) -> Iterator[TarSample]:
    """:func:`iter_tar_samples`, each sample with the byte range it spans in the stream.

    ``wanted(ext)``: whether a member's bytes are read (default: all); the others are left out of
    the sample's files. On a seekable stream (a local file) they are then seeked over, never read:
    a listing that needs only the label members reads the headers and those, not the images (an
    uncompressed tar only, as webdataset shards are: offsets are the file's own). A member cut
    short is still found: tarfile checks that the byte before the next header is there."""
    seekable = wanted is not None and stream.seekable()
    try:
        tar = tarfile.open(fileobj=stream, mode="r:" if seekable else "r|*")  # noqa: SIM115
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BadShard(f"{name}: not a readable tar ({err})") from None
    current: str | None = None
    files: dict[str, bytes] = {}
    start = end = 0
    try:
        for member in tar:
            if member.isdir():
                continue
            reason = refusal(member) or (None if member.isfile() else f"tar member {member.name!r} is not a regular file")
            if reason is not None:
                if refused is not None:
                    refused(member.name, reason)
                continue
            key, ext = split_key(member.name)
            data = None
            if wanted is None or wanted(ext):
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                if len(data) != member.size:
                    raise BadShard(f"{name}: truncated in member {member.name}")
            if key != current:
                if current is not None:
                    yield TarSample(current, files, start, end)
                current, files, start = key, {}, member.offset
            if data is not None:
                files[ext] = data
            end = member.offset_data + member.size + (-member.size % tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BadShard(f"{name}: truncated or corrupt tar ({err})") from None
    finally:
        tar.close()
    if current is not None:
        yield TarSample(current, files, start, end)
