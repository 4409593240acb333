"""One small storage interface over local paths and ``s3://`` URIs.

Everything a run writes goes through :class:`Storage`, rooted at the run's URI, with paths
relative to that root (``stages/pretrain/manifest.json``). Two guarantees the engine builds on:

- **Atomic writes.** :meth:`Storage.write_bytes` and :meth:`Storage.open_write` make an object
  visible whole or not at all: a temp file plus ``os.replace`` on disk; a single PUT, or a
  multipart upload completed only at the end, on S3. A reader never sees half an object.
- **Streaming reads.** :meth:`Storage.open_read` returns a file object that reads as it goes
  (an S3 ``GetObject`` body), so shards are never downloaded whole first.

S3 goes through boto3 with the ``standard`` retry mode; the endpoint comes from the run config
or ``AWS_ENDPOINT_URL``; credentials come from boto3's usual chain and are never logged. Errors
a user can fix (no credentials, access denied, no such bucket, unreachable endpoint) become a
one-line :class:`~pipeline.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from pipeline.errors import StorageError

__all__ = [
    "ObjectInfo",
    "UnfinishedWrite",
    "WrittenObject",
    "Storage",
    "LocalStorage",
    "S3Storage",
    "open_storage",
    "is_s3_uri",
    "sha256_stream",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TMP_MARK = ".tmp-"


@dataclass(frozen=True)
class ObjectInfo:
    """An object under a storage root: its path relative to the root and its size in bytes."""

    path: str
    size: int


@dataclass(frozen=True)
class UnfinishedWrite:
    """A write that never committed (its writer died): an S3 multipart upload that was neither
    completed nor aborted (S3 keeps, and bills, its parts until then), or a local temp file."""

    path: str  # the object it was to become, relative to the storage root
    size: int  # bytes held
    started: str  # ISO time, or "" when unknown
    upload_id: str = ""  # S3 only


@dataclass
class WrittenObject:
    """What :meth:`Storage.open_write` reports once the object is committed."""

    path: str
    size: int = 0
    sha256: str = ""


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def sha256_stream(stream: IO[bytes]) -> tuple[str, int]:
    """sha256 hex digest and byte count of a stream, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _clean_rel(rel: str) -> str:
    rel = rel.replace("\\", "/").strip("/")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"storage paths may not contain '..': {rel!r}")
    return "/".join(parts)


class _HashingWriter(io.RawIOBase):
    """Passes writes through to a file while hashing them, so no second read is needed."""

    def __init__(self, sink: IO[bytes], record: WrittenObject) -> None:
        self._sink = sink
        self._digest = hashlib.sha256()
        self._record = record

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._sink.write(view)
        self._digest.update(view)
        self._record.size += len(view)
        return len(view)

    def finish(self) -> None:
        self._record.sha256 = self._digest.hexdigest()


class Storage(ABC):
    """A tree of objects under one root URI. Paths are relative, '/'-separated."""

    uri: str

    @abstractmethod
    def child(self, rel: str) -> Storage:
        """A storage rooted at ``rel`` under this one."""

    def uri_of(self, rel: str = "") -> str:
        rel = _clean_rel(rel)
        return f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when the object does not exist."""

    @abstractmethod
    def open_read(self, rel: str) -> BinaryIO:
        """A streaming binary reader. Raises StorageError when the object is missing."""

    @abstractmethod
    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        """A binary writer whose object appears atomically when the block exits cleanly.

        The yielded file has a ``written`` attribute (:class:`WrittenObject`) filled in with
        size and sha256 after the block exits. On an exception nothing is written.
        """

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every committed object under ``prefix`` (recursive), sorted by path."""

    def list_level(self, prefix: str = "") -> tuple[list[str], list[ObjectInfo]]:
        """One level under ``prefix``: the names of its sub-folders and the objects directly in it,
        each sorted — so that a large tree can be listed folder by folder, in parallel (on S3 a
        delimited LIST). This fallback derives it from the recursive listing."""
        base = f"{_clean_rel(prefix)}/" if _clean_rel(prefix) else ""
        folders, files = set(), []
        for obj in self.list(prefix):
            head, slash, _ = obj.path[len(base):].partition("/")
            if slash:
                folders.add(head)
            else:
                files.append(obj)
        return sorted(folders), files

    @abstractmethod
    def delete(self, rel: str) -> None:
        """Delete one object; a missing object is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str = "") -> int:
        """Delete every object under ``prefix``; returns how many were deleted."""

    @abstractmethod
    def copy_prefix(self, prefix: str, target: str) -> int:
        """Copy every object under ``prefix`` to the same relative path under ``target``, replacing
        objects at those paths (others under ``target`` stay: empty it first for an exact copy);
        returns how many were copied. Cheap where the backend allows it: hard links on a local
        disk, server-side copies on S3 (no byte crosses this machine)."""

    @abstractmethod
    def put_if_absent(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` with ``data`` only if it does not exist; True when this call created it."""

    @abstractmethod
    def upload_file(self, local_path: str | os.PathLike[str], rel: str) -> WrittenObject:
        """Copy a local file in (multipart on S3 for large files), atomically."""

    @abstractmethod
    def download_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        """Copy an object to a local file (atomically replacing it)."""

    @abstractmethod
    def unfinished_writes(self, prefix: str = "") -> list[UnfinishedWrite]:
        """Writes under ``prefix`` that never committed. Only meaningful when no writer is alive
        (the caller holds the run lock): a live writer's upload looks the same."""

    @abstractmethod
    def discard(self, write: UnfinishedWrite) -> None:
        """Remove an unfinished write (abort the upload, delete the temp file)."""

    def local_path(self, rel: str = "") -> Path | None:
        """The filesystem path of ``rel`` when this storage is local, else None."""
        return None

    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        """``rel``'s content and a tag of this version of it (None when absent), for :meth:`put_if_match`."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    def put_if_match(self, rel: str, data: bytes, tag: str) -> bool:
        """Replace ``rel`` only if it is still the version ``tag`` names; True when this call wrote it."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional writes")

    # Conveniences built on the primitives above.

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as f:
            return f.read()

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``rel`` from byte ``start`` (fewer at its end): what a reader of a
        file format with an index (Parquet's footer, then its column chunks) needs, without the rest."""
        with self.open_read(rel) as f:
            f.seek(start)
            return f.read(length)

    def open_range(self, rel: str, start: int, end: int) -> BinaryIO:
        """A streaming reader of bytes ``[start, end)`` of ``rel`` (fewer at its end): a part of a
        large object (some samples of a tar shard) without reading the rest."""
        f = self.open_read(rel)
        f.seek(start)
        return io.BufferedReader(_Bounded(f, end - start))  # type: ignore[return-value]

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> WrittenObject:
        with self.open_write(rel) as f:
            f.write(data)
        return f.written  # type: ignore[attr-defined]

    def write_text(self, rel: str, text: str) -> WrittenObject:
        return self.write_bytes(rel, text.encode("utf-8"))

    def append_text(self, rel: str, text: str) -> None:
        """Append to a small text object (event logs). Single writer only: the run lock ensures it."""
        old = self.read_text(rel) if self.exists(rel) else ""
        self.write_text(rel, old + text)

    def sha256(self, rel: str) -> str:
        with self.open_read(rel) as f:
            return sha256_stream(f)[0]


class LocalStorage(Storage):
    """Storage on a local (or mounted shared) filesystem."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"

    def _path(self, rel: str) -> Path:
        return self.root / _clean_rel(rel)

    def child(self, rel: str) -> LocalStorage:
        return LocalStorage(self._path(rel))

    def local_path(self, rel: str = "") -> Path:
        return self._path(rel)

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def size(self, rel: str) -> int | None:
        try:
            return self._path(rel).stat().st_size
        except FileNotFoundError:
            return None

    def open_read(self, rel: str) -> BinaryIO:
        path = self._path(rel)
        try:
            return open(path, "rb")  # noqa: SIM115 - caller closes
        except FileNotFoundError:
            raise StorageError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise StorageError(f"{path}: is a directory, expected a file") from None
        except PermissionError:
            raise StorageError(f"{path}: permission denied") from None

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
        record = WrittenObject(path=_clean_rel(rel))
        try:
            with open(tmp, "wb") as raw:
                hashing = _HashingWriter(raw, record)
                writer = io.BufferedWriter(hashing, buffer_size=_CHUNK)
                writer.written = record  # type: ignore[attr-defined]
                yield writer  # type: ignore[misc]
                writer.flush()
                hashing.finish()
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix)
        if base.is_file():
            return [ObjectInfo(_clean_rel(prefix), base.stat().st_size)]
        if not base.is_dir():
            return []
        found = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and _TMP_MARK in name:
                    continue  # an uncommitted write
                full = Path(dirpath) / name
                rel = full.relative_to(self.root).as_posix()
                with contextlib.suppress(FileNotFoundError):
                    found.append(ObjectInfo(rel, full.stat().st_size))
        return sorted(found, key=lambda o: o.path)

    def list_level(self, prefix: str = "") -> tuple[list[str], list[ObjectInfo]]:
        base = self._path(prefix)
        if not base.is_dir():
            return [], self.list(prefix)
        folders, files = [], []
        with os.scandir(base) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):  # a linked folder is not walked (as in list())
                    folders.append(entry.name)
                elif entry.is_file() and not (entry.name.startswith(".") and _TMP_MARK in entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        files.append(ObjectInfo(Path(entry.path).relative_to(self.root).as_posix(),
                                                entry.stat().st_size))
        return sorted(folders), sorted(files, key=lambda o: o.path)

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(rel).unlink()

    def delete_prefix(self, prefix: str = "") -> int:
        base = self._path(prefix)
        if base.is_file():
            base.unlink()
            return 1
        if not base.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(base))
        shutil.rmtree(base)
        return count

    def copy_prefix(self, prefix: str, target: str) -> int:
        objects = self.list(prefix)
        base, into = _clean_rel(prefix), _clean_rel(target)
        for obj in objects:
            source = self._path(obj.path)
            dest = self._path(into + obj.path[len(base):])
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)
            try:
                os.link(source, dest)  # the same bytes, no copy: a checkpoint set aside costs nothing
            except OSError:  # another filesystem, or links not allowed
                shutil.copy2(source, dest)
        return len(objects)

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def upload_file(self, local_path: str | os.PathLike[str], rel: str) -> WrittenObject:
        with open(local_path, "rb") as src, self.open_write(rel) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        return dst.written  # type: ignore[attr-defined]

    def download_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.open_read(rel) as src, LocalStorage(target.parent).open_write(target.name) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)

    def unfinished_writes(self, prefix: str = "") -> list[UnfinishedWrite]:
        found = []
        for dirpath, _dirs, files in os.walk(self._path(prefix)):
            for name in files:
                if name.startswith(".") and _TMP_MARK in name:  # open_write's ".NAME.tmp-XXXXXXXX"
                    full = Path(dirpath) / name
                    target = full.with_name(name[1:name.rindex(_TMP_MARK)]).relative_to(self.root).as_posix()
                    with contextlib.suppress(FileNotFoundError):
                        stat = full.stat()
                        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stat.st_mtime))
                        found.append(UnfinishedWrite(target, stat.st_size, started, upload_id=name))
        return sorted(found, key=lambda w: w.path)

    def discard(self, write: UnfinishedWrite) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._path(write.path).parent / write.upload_id).unlink()


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable: without it a crash can lose a "committed" manifest.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_CLIENT_LOCK = threading.Lock()
_CLIENTS: dict[tuple[Any, ...], tuple[int, Any]] = {}  # S3 clients by configuration: (pid, client)
_CLIENT_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                       "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE",
                       "AWS_SHARED_CREDENTIALS_FILE")
_BUCKETS_SEEN: set[str] = set()  # buckets known to exist, in this process
_RETRIES_LOCK = threading.Lock()
_RETRY_COUNT = 0  # reads resumed after a transient fault, in this process (tests and logs read it)


def read_retries() -> int:
    """How many S3 reads this process has resumed after a transient fault."""
    return _RETRY_COUNT


def _count_retry() -> None:
    global _RETRY_COUNT
    with _RETRIES_LOCK:  # reader threads count at once
        _RETRY_COUNT += 1


def _is_transient(err: BaseException) -> bool:
    """A fault of the connection or the service, not of the data: worth reading again."""
    from botocore import exceptions as bex

    if isinstance(err, (bex.ReadTimeoutError, bex.ResponseStreamingError, bex.IncompleteReadError,
                        bex.ConnectionError, ConnectionError, TimeoutError)):
        return True
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        Urllib3Error = ()  # noqa: N806
    if isinstance(err, Urllib3Error):
        return True
    if isinstance(err, bex.ClientError):
        error = err.response.get("Error", {})
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or error.get("Code") in ("SlowDown", "RequestTimeout", "Throttling",
                                                      "ThrottlingException", "InternalError", "ServiceUnavailable")
    return False


class _Bounded(io.RawIOBase):
    """The next ``limit`` bytes of a stream (closed with it)."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream, self._left = stream, max(0, limit)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: self._left]
        n = self._stream.readinto(view) if view.nbytes else 0  # type: ignore[attr-defined]
        self._left -= n or 0
        return n or 0

    def close(self) -> None:
        self._stream.close()
        super().close()


class _ResilientBody(io.RawIOBase):
    """An S3 object's bytes as a stream that survives the connection.

    A timeout, reset or 5xx — opening the object or in the middle of its body — is not a property
    of the data: the object is opened again from the byte reached (a ``Range`` GET, pinned to the
    first response's ETag so a replaced object is never spliced in), after a jittered backoff,
    until ``retries`` attempts in a row have failed without a byte of progress, or ``retries x 8``
    reopens in all (a connection that keeps dropping after a few bytes); then one
    ``StorageError`` names the object and the byte. A body that really ends early is left to the
    caller (for a tar, a truncated shard).
    """

    def __init__(self, storage: S3Storage, key: str, uri: str, retries: int, start: int = 0,
                 end: int | None = None) -> None:
        self._storage = storage
        self._key = key
        self._uri = uri
        self._retries = retries
        self._offset = start
        self._end = end  # exclusive; None: to the end of the object
        self._failures = 0  # in a row, without a byte of progress
        self._reopens = 0
        self._etag: str | None = None
        self._length: int | None = None  # None: unknown, read to the end of the body
        self._body: Any = _FailedBody(None)
        self._open()

    def _get(self) -> Any:
        kwargs: dict[str, Any] = {"Bucket": self._storage.bucket, "Key": self._key}
        if self._offset or self._end is not None:
            kwargs["Range"] = f"bytes={self._offset}-{'' if self._end is None else self._end - 1}"
        if self._etag:
            kwargs["IfMatch"] = self._etag
        return self._storage.client.get_object(**kwargs)

    def _open(self) -> None:
        """Open (or reopen from the byte reached); a transient fault is left for the next read to retry."""
        try:
            response = self._get()
        except Exception as err:  # noqa: BLE001 - sorted: transient faults are retried by readinto
            from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

            # An endpoint never reached (after botocore's own retries) is a wrong address: say so.
            unreachable = self._etag is None and isinstance(err, (EndpointConnectionError, ConnectTimeoutError))
            if unreachable or not _is_transient(err):
                with _s3_errors(self._uri):  # one line for what a user can fix (no object, no access, changed)
                    raise
                raise
            self._body = _FailedBody(err)
            return
        if self._etag is None:
            self._etag = response.get("ETag")
            length = response.get("ContentLength")  # of the range asked for, from the first byte asked
            self._length = None if length is None else self._offset + int(length)
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def _fault(self, err: BaseException) -> None:
        self._failures += 1
        self._reopens += 1
        if self._failures > self._retries or self._reopens > 8 * max(1, self._retries):
            raise StorageError(f"{self._uri}: reading failed {self._failures} times in a row at byte {self._offset}"
                               f"{'' if self._length is None else f' of {self._length}'} ({type(err).__name__}); "
                               "giving up") from None
        _count_retry()
        log.warning("%s: %s at byte %d; reading on (attempt %d of %d)", self._uri, type(err).__name__,
                    self._offset, self._failures, self._retries)
        with contextlib.suppress(Exception):
            self._body.close()
        time.sleep(min(2.0, 0.05 * 2 ** (self._failures - 1)) * random.uniform(0.5, 1.5))  # apart, not in step
        self._open()

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while True:
            if self._length is not None and self._offset >= self._length:
                return 0
            try:
                data = self._body.read(len(view))
            except Exception as err:  # noqa: BLE001 - sorted: transient faults are retried
                if not _is_transient(err):
                    raise
                self._fault(err)
                continue
            if not data:
                if self._length is None:
                    return 0  # no length was given: the end of the body is the end
                # The server closed the body early without an error: read on from here.
                self._fault(ConnectionError(f"body ended at byte {self._offset}"))
                continue
            view[: len(data)] = data
            self._offset += len(data)
            self._failures = 0
            return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


class _FailedBody:
    """Stands in for a body that could not be (re)opened: its next read raises the fault."""

    def __init__(self, err: BaseException | None) -> None:
        self._err = err

    def read(self, n: int) -> bytes:
        raise self._err or ConnectionError("not opened")

    def close(self) -> None:
        pass


_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired", "RequestExpired"}
_REJECTED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "InvalidClientTokenId",
             "AuthorizationHeaderMalformed"}
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403", "Forbidden"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_CODE_IN_TEXT = re.compile(r"An error occurred \((\w+)\)")


def _error_code(err: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, or of boto3's transfer errors (which wrap one,
    or only quote its code: ``S3UploadFailedError: ... An error occurred (NoSuchBucket) ...``)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "")) or None
    found = _CODE_IN_TEXT.search(str(err))
    return found.group(1) if found else None


def explain_s3_error(uri: str, err: BaseException) -> StorageError | None:
    """One line saying what went wrong with ``uri`` and what to do, for the errors a user can fix
    (and any other S3 error code); None for what is not an S3 error at all."""
    from botocore import exceptions as bex

    bucket = uri[5:].split("/", 1)[0]
    # boto3's transfer manager raises its own error over the botocore one: explain the cause.
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, bex.BotoCoreError | bex.ClientError) and _error_code(cause) is None:
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    if isinstance(cause, bex.NoCredentialsError):
        return StorageError(f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                            "AWS_PROFILE, or use an instance/pod role")
    if isinstance(cause, bex.EndpointConnectionError | bex.ConnectTimeoutError):
        endpoint = getattr(cause, "kwargs", {}).get("endpoint_url", "the S3 endpoint")
        return StorageError(f"{uri}: cannot reach {endpoint}; check storage.endpoint_url / AWS_ENDPOINT_URL")
    code = _error_code(cause)
    if code is None:
        return None
    if code == "NoSuchBucket":
        return StorageError(f"{uri}: bucket {bucket!r} does not exist; create it or correct the run location")
    if code in _MISSING:
        return StorageError(f"{uri}: no such object")
    if code in _EXPIRED:
        return StorageError(f"{uri}: the AWS credentials have expired ({code}); refresh them (a new session "
                            "token, `aws sso login`, the pod's role) and resume")
    if code in _REJECTED:
        return StorageError(f"{uri}: S3 rejected the AWS credentials ({code}); check AWS_ACCESS_KEY_ID / "
                            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, and that they belong to this endpoint")
    if code in _DENIED:
        return StorageError(f"{uri}: access denied ({code}); the credentials lack permission here: check the "
                            "IAM and bucket policy (s3:ListBucket, s3:GetObject, s3:PutObject, s3:DeleteObject)")
    if code == "400":  # a HEAD has no body, so no code: expired credentials are the usual cause
        return StorageError(f"{uri}: S3 refused the request (400 Bad Request, no detail on a HEAD); expired "
                            "credentials are the usual cause: refresh them and resume")
    message = getattr(cause, "response", {}).get("Error", {}).get("Message", "") if hasattr(cause, "response") else ""
    return StorageError(f"{uri}: S3 error {code}{': ' + message if message else ''}")


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Translate S3 errors into one-line StorageErrors (anything else passes through)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:
        explained = explain_s3_error(uri, err)
        if explained is None:
            raise
        raise explained from None


class S3Storage(Storage):
    """Storage under ``s3://bucket/prefix`` through boto3.

    Picklable: the boto3 client is made lazily in each process (clients are not fork- or
    pickle-safe), so a storage can be passed to Ray tasks as is.
    """

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold_mb: int = 64,
        multipart_chunk_mb: int = 64,
        read_timeout_s: float = 60.0,
        read_retries: int = 8,
    ) -> None:
        if not is_s3_uri(uri):
            raise ValueError(f"not an s3:// URI: {uri!r}")
        bucket, _, prefix = uri[5:].partition("/")
        if len(bucket) < 3:
            raise StorageError(f"{uri}: bucket names have at least 3 characters")
        self.bucket = bucket
        self.prefix = _clean_rel(prefix)
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.multipart_threshold = multipart_threshold_mb * (1 << 20)
        self.multipart_chunk = multipart_chunk_mb * (1 << 20)
        self.read_timeout_s = read_timeout_s
        self.read_retries = read_retries
        self._client: Any = None
        self._client_pid = 0

    def __repr__(self) -> str:
        return f"S3Storage({self.uri!r}, endpoint_url={self.endpoint_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"], state["_client_pid"] = None, 0
        return state

    @property
    def client(self) -> Any:
        # One client per process (boto3's are thread-safe, but a client forked into a DataLoader
        # worker shares its parent's pooled connections), made once even when threads ask at once.
        if self._client is None or self._client_pid != os.getpid():
            with _CLIENT_LOCK:
                if self._client is None or self._client_pid != os.getpid():
                    self._client, self._client_pid = self._make_client(), os.getpid()
        return self._client

    def _make_client(self) -> Any:
        # One client per process and configuration, shared by the storages of every task the
        # process runs: a Ray task gets its storage unpickled, without a client, and making one
        # takes ~0.1 s (boto3 loads its service model) — at 300k shards or 21k class folders,
        # hours of CPU. The environment boto3 reads at creation is part of the key (hashed: no
        # second copy of a secret).
        environment = json.dumps([os.environ.get(name) for name in _CLIENT_ENVIRONMENT])
        key = (self.endpoint_url, self.region, self.read_timeout_s, hashlib.sha256(environment.encode()).hexdigest())
        made = _CLIENTS.get(key)
        if made is None or made[0] != os.getpid():
            made = _CLIENTS[key] = (os.getpid(), self._new_client())
        return made[1]

    def _new_client(self) -> Any:
        import boto3
        from botocore.config import Config

        # Pool size: each stream keeps a few shards open (stages.data.streams), one connection each.
        config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10,
                        read_timeout=self.read_timeout_s, max_pool_connections=64)
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                              config=config)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunk,
            use_threads=True,
            max_concurrency=4,
        )

    def _key(self, rel: str) -> str:
        rel = _clean_rel(rel)
        return f"{self.prefix}/{rel}" if self.prefix and rel else (self.prefix or rel)

    def child(self, rel: str) -> S3Storage:
        clone = S3Storage.__new__(S3Storage)
        clone.__dict__.update(self.__getstate__())
        clone._client, clone._client_pid = self._client, self._client_pid
        clone.prefix = self._key(rel)
        clone.uri = f"s3://{self.bucket}/{clone.prefix}"
        return clone

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def size(self, rel: str) -> int | None:
        from botocore.exceptions import ClientError

        with _s3_errors(self.uri_of(rel)):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in _MISSING:
                    # A HEAD's 404 has no body: it may be the bucket that is missing, which must
                    # not read as "no such object" (a run would start over in a bucket that is not there).
                    self._check_bucket(self.uri_of(rel))
                    return None
                raise
        return int(head["ContentLength"])

    def _check_bucket(self, uri: str) -> None:
        """Raise a one-line error about ``uri`` if the bucket does not exist (asked once per process
        and bucket)."""
        from botocore.exceptions import ClientError

        if self.bucket in _BUCKETS_SEEN:
            return
        with _s3_errors(uri):
            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as err:
                if _error_code(err) in _MISSING:
                    raise ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket") from None
                raise
        _BUCKETS_SEEN.add(self.bucket)

    def open_read(self, rel: str) -> BinaryIO:
        body = _ResilientBody(self, self._key(rel), self.uri_of(rel), self.read_retries)
        return io.BufferedReader(body, buffer_size=_CHUNK)  # type: ignore[return-value]

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        # One ranged GET, read on from the byte reached after a transient fault like any read.
        if length <= 0:
            return b""
        with _ResilientBody(self, self._key(rel), self.uri_of(rel), self.read_retries, start, start + length) as body:
            return body.read()

    def open_range(self, rel: str, start: int, end: int) -> BinaryIO:
        if end <= start:
            return io.BytesIO(b"")  # type: ignore[return-value]
        body = _ResilientBody(self, self._key(rel), self.uri_of(rel), self.read_retries, start, end)
        return io.BufferedReader(body, buffer_size=_CHUNK)  # type: ignore[return-value]

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        # Spool to memory (then disk past 16 MiB) and upload on close: the object appears only
        # when PutObject or CompleteMultipartUpload succeeds, never half-written.
        record = WrittenObject(path=_clean_rel(rel))
        with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool:
            hashing = _HashingWriter(spool, record)
            writer = io.BufferedWriter(hashing, buffer_size=_CHUNK)
            writer.written = record  # type: ignore[attr-defined]
            yield writer  # type: ignore[misc]
            writer.flush()
            hashing.finish()
            spool.seek(0)
            with _s3_errors(self.uri_of(rel)):
                self.client.upload_fileobj(
                    spool, self.bucket, self._key(rel), Config=self._transfer_config()
                )

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        key_prefix = self._key(prefix)
        if key_prefix:
            key_prefix += "/"  # so that "stages/a" never matches "stages/ab/..."
        root = f"{self.prefix}/" if self.prefix else ""
        found = []
        with _s3_errors(self.uri_of(prefix)):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix):
                for obj in page.get("Contents", ()):
                    found.append(ObjectInfo(obj["Key"][len(root):], int(obj["Size"])))
        return sorted(found, key=lambda o: o.path)

    def list_level(self, prefix: str = "") -> tuple[list[str], list[ObjectInfo]]:
        key_prefix = self._key(prefix)
        if key_prefix:
            key_prefix += "/"
        root = f"{self.prefix}/" if self.prefix else ""
        folders, files = [], []
        with _s3_errors(self.uri_of(prefix)):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key_prefix, Delimiter="/"):
                folders.extend(p["Prefix"][len(key_prefix):].rstrip("/") for p in page.get("CommonPrefixes", ()))
                files.extend(ObjectInfo(o["Key"][len(root):], int(o["Size"])) for o in page.get("Contents", ()))
        return sorted(folders), sorted(files, key=lambda o: o.path)

    def delete(self, rel: str) -> None:
        with _s3_errors(self.uri_of(rel)):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))

    def delete_prefix(self, prefix: str = "") -> int:
        objects = self.list(prefix)
        with _s3_errors(self.uri_of(prefix)):
            for start in range(0, len(objects), 1000):
                batch = [{"Key": self._key(o.path)} for o in objects[start:start + 1000]]
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise StorageError(f"{self.uri_of(prefix)}: could not delete {len(response['Errors'])} object(s), "
                                       f"e.g. {first.get('Key')}: {first.get('Code')}")
        return len(objects)

    def copy_prefix(self, prefix: str, target: str) -> int:
        from concurrent.futures import ThreadPoolExecutor

        objects = self.list(prefix)
        base, into = _clean_rel(prefix), _clean_rel(target)

        def copy(obj: ObjectInfo) -> None:
            with _s3_errors(self.uri_of(obj.path)):
                # Managed copy: server-side, multipart past the threshold (objects over 5 GB need it).
                self.client.copy({"Bucket": self.bucket, "Key": self._key(obj.path)}, self.bucket,
                                 self._key(into + obj.path[len(base):]), Config=self._transfer_config())

        # Several at once: a checkpoint of many ranks is hundreds of objects, each a round trip or more.
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(copy, objects))
        return len(objects)

    def put_if_absent(self, rel: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        with _s3_errors(self.uri_of(rel)):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, IfNoneMatch="*")
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return False
                raise
        return True

    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        with _s3_errors(self.uri_of(rel)):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return response["Body"].read(), response["ETag"]

    def put_if_match(self, rel: str, data: bytes, tag: str) -> bool:
        from botocore.exceptions import ClientError

        with _s3_errors(self.uri_of(rel)):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, IfMatch=tag)
            except ClientError as err:
                code = err.response.get("Error", {}).get("Code")
                # 412: another version is there now; 409: a concurrent conditional write won; 404: deleted
                if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                    return False
                raise
        return True

    def upload_file(self, local_path: str | os.PathLike[str], rel: str) -> WrittenObject:
        with open(local_path, "rb") as f:
            digest, size = sha256_stream(f)
        with _s3_errors(self.uri_of(rel)):
            self.client.upload_file(str(local_path), self.bucket, self._key(rel), Config=self._transfer_config())
        return WrittenObject(path=_clean_rel(rel), size=size, sha256=digest)

    def unfinished_writes(self, prefix: str = "") -> list[UnfinishedWrite]:
        key_prefix = self._key(prefix)
        if key_prefix:
            key_prefix += "/"
        root = f"{self.prefix}/" if self.prefix else ""
        found = []
        with _s3_errors(self.uri_of(prefix)):
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                     Prefix=key_prefix):
                for upload in page.get("Uploads", ()):
                    parts = self.client.get_paginator("list_parts").paginate(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    size = sum(part["Size"] for page_ in parts for part in page_.get("Parts", ()))
                    started = upload["Initiated"].strftime("%Y-%m-%dT%H:%M:%SZ") if upload.get("Initiated") else ""
                    found.append(UnfinishedWrite(upload["Key"][len(root):], size, started, upload["UploadId"]))
        return sorted(found, key=lambda w: w.path)

    def discard(self, write: UnfinishedWrite) -> None:
        from botocore.exceptions import ClientError

        with _s3_errors(self.uri_of(write.path)):
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(write.path),
                                                   UploadId=write.upload_id)
            except ClientError as err:
                if _error_code(err) != "NoSuchUpload":  # gone already: nothing left to remove
                    raise

    def download_file(self, rel: str, local_path: str | os.PathLike[str]) -> None:
        target = Path(local_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            with _s3_errors(self.uri_of(rel)):
                self.client.download_file(self.bucket, self._key(rel), str(tmp), Config=self._transfer_config())
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def open_storage(uri: str, settings: Any = None) -> Storage:
    """Storage for a local path or ``s3://`` URI. ``settings`` is a StorageSettings (optional)."""
    if is_s3_uri(uri):
        kwargs: dict[str, Any] = {}
        if settings is not None:
            kwargs = {
                "endpoint_url": settings.endpoint_url,
                "region": settings.region,
                "multipart_threshold_mb": settings.multipart_threshold_mb,
                "multipart_chunk_mb": settings.multipart_chunk_mb,
                "read_timeout_s": settings.read_timeout_s,
                "read_retries": settings.read_retries,
            }
        return S3Storage(uri, **kwargs)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported storage scheme (use a local path or s3://bucket/prefix)")
    return LocalStorage(uri.removeprefix("file://"))
