"""A run lock: one driver per run directory at a time, and no lock outlives a dead driver.

- On a local filesystem the lock is an ``flock`` on ``RUN/.lock``. The kernel drops it the moment
  its holder dies (even by SIGKILL), so a stale lock cannot exist; the file only carries the
  holder's pid/host for the error message.
- On S3 the lock is an object ``RUN/.lock.json`` created with a conditional PUT (``If-None-Match:
  *``) and refreshed by a heartbeat thread. A lock whose heartbeat is older than ``stale_after``
  seconds belongs to a dead driver and is taken over.

A holder can lose an S3 lock: another driver took it over (this one looked dead: a long network
partition, a suspended laptop), or renewals kept failing until others may take it. Then the lock
is *lost*: :meth:`RunLock.check` raises :class:`~pipeline.errors.RunLockLostError`, and the driver
stops its stage tasks and writes nothing more — two drivers writing one run would corrupt it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from pipeline.errors import RunLockedError, RunLockLostError
from pipeline.storage import Storage

__all__ = ["RunLock", "acquire_run_lock", "is_run_locked", "stale_lock_holder", "LOCAL_LOCK_FILE", "S3_LOCK_FILE"]

log = logging.getLogger(__name__)

LOCAL_LOCK_FILE = ".lock"
S3_LOCK_FILE = ".lock.json"


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started (to tell a live holder from a reused pid), or None if gone."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _holder_is_dead(info: dict[str, Any], stale_after: float) -> bool:
    """A remote lock's holder is dead if its heartbeat is stale, or, on this host, if its process is gone."""
    age = time.time() - float(info.get("heartbeat", 0))
    if age >= stale_after:
        return True
    if info.get("host") == socket.gethostname() and "pid" in info:
        started = _process_started(int(info["pid"]))
        return started is None or abs(started - float(info.get("pid_started", started))) > 1.0
    return False


def _holder_info(owner: str) -> dict[str, Any]:
    return {
        "owner": owner,
        "pid": os.getpid(),
        "pid_started": _process_started(os.getpid()),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "heartbeat": time.time(),
    }


def _parse_lock(data: bytes) -> dict[str, Any]:
    try:
        found = json.loads(data)
    except ValueError:  # a torn or foreign object: no valid holder
        return {}
    return found if isinstance(found, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"


class RunLock:
    """Held for the life of a driver; release with :meth:`release` or as a context manager."""

    def __init__(self, storage: Storage, stale_after: float = 90.0, heartbeat_every: float = 15.0) -> None:
        self.storage = storage
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every
        self.owner = uuid.uuid4().hex
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._info: dict[str, Any] = {}
        self._lost: str | None = None  # why the lock was lost; None while held

    def check(self) -> None:
        """Raise :class:`RunLockLostError` if this holder has lost the lock (call before writing)."""
        if self._lost is not None:
            raise RunLockLostError(f"{self.storage.uri}: {self._lost}; this driver stopped without writing more. "
                                   f"`vitpipe resume {self.storage.uri}` continues once the other driver is done")

    def acquire(self) -> RunLock:
        local = self.storage.local_path(LOCAL_LOCK_FILE)
        if local is not None:
            self._acquire_local(str(local))
        else:
            self._acquire_remote()
        return self

    def _acquire_local(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                info = {}
            os.close(fd)
            raise RunLockedError(
                f"{self.storage.uri}: run is in use by {_describe(info)}; wait for it or stop that process"
            ) from None
        self._info = _holder_info(self.owner)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self._info).encode(), 0)
        self._fd = fd

    def _acquire_remote(self) -> None:
        self._info = _holder_info(self.owner)
        payload = json.dumps(self._info).encode()
        if not self.storage.put_if_absent(S3_LOCK_FILE, payload):
            current = self._read_remote()
            if current and not _holder_is_dead(current, self.stale_after):
                age = time.time() - float(current.get("heartbeat", 0))
                raise RunLockedError(
                    f"{self.storage.uri}: run is in use by {_describe(current)} "
                    f"(heartbeat {age:.0f}s ago); wait for it or stop that process"
                )
            log.warning("%s: taking over a stale lock held by %s", self.storage.uri,
                        _describe(current) if current else "an unknown holder")
            # Re-check just before deleting so a lock refreshed meanwhile is left alone.
            if self._read_remote() == current:
                self.storage.delete(S3_LOCK_FILE)
            if not self.storage.put_if_absent(S3_LOCK_FILE, payload):
                raise RunLockedError(f"{self.storage.uri}: another process took the run lock first")
        self._thread = threading.Thread(target=self._heartbeat, name="vitpipe-lock-heartbeat", daemon=True)
        self._thread.start()

    def _read_remote(self) -> dict[str, Any]:
        """The lock's content; {} when there is no lock. Storage errors propagate: an unreadable
        lock must never be mistaken for a free one."""
        if not self.storage.exists(S3_LOCK_FILE):
            return {}
        return _parse_lock(self.storage.read_bytes(S3_LOCK_FILE))

    def _heartbeat(self) -> None:
        renewed = time.monotonic()
        # Past this without a renewal, another driver may judge the lock stale and take it (its
        # clock and ours differ, so one beat of margin): stop before that can happen.
        give_up_after = max(self.stale_after - self.heartbeat_every, self.heartbeat_every)
        while not self._stop.wait(self.heartbeat_every):
            try:
                found = self.storage.read_tagged(S3_LOCK_FILE)
                current = _parse_lock(found[0]) if found else {}
                if current.get("owner") != self.owner:
                    self._lose(f"the run lock was taken over by {_describe(current) if current else 'nobody'}")
                    return
                assert found is not None
                self._info["heartbeat"] = time.time()
                # Conditional: a successor's lock written after our read must never be overwritten.
                if not self.storage.put_if_match(S3_LOCK_FILE, json.dumps(self._info).encode(), found[1]):
                    now = self._read_remote()
                    self._lose(f"the run lock was taken over by {_describe(now) if now else 'nobody'}")
                    return
                renewed = time.monotonic()
            except Exception as err:  # noqa: BLE001 - transient storage error: the next beat retries
                unrenewed = time.monotonic() - renewed
                if unrenewed >= give_up_after:
                    self._lose(f"the run lock could not be renewed for {unrenewed:.0f}s ({type(err).__name__}); "
                               "another driver may take it over")
                    return
                log.warning("%s: could not renew the run lock (%s); retrying", self.storage.uri,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)

    def _lose(self, reason: str) -> None:
        self._lost = reason
        log.error("%s: %s; stopping", self.storage.uri, reason)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
            with contextlib.suppress(Exception):
                if self._read_remote().get("owner") == self.owner:
                    self.storage.delete(S3_LOCK_FILE)

    @property
    def held(self) -> bool:
        return self._fd is not None or self._thread is not None

    def __enter__(self) -> RunLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_run_lock(storage: Storage, stale_after: float = 90.0) -> RunLock:
    """Take the run lock or raise :class:`RunLockedError` naming the holder."""
    return RunLock(storage, stale_after=stale_after).acquire()


def stale_lock_holder(storage: Storage, stale_after: float = 90.0) -> str | None:
    """Who held an S3 run lock whose holder is dead (its heartbeat stopped), or None when there is
    no such lock. A local lock cannot go stale: the kernel drops an flock with its holder."""
    if storage.local_path() is not None or not storage.exists(S3_LOCK_FILE):
        return None
    try:
        info = json.loads(storage.read_text(S3_LOCK_FILE))
    except ValueError:
        info = {}
    return _describe(info) if _holder_is_dead(info, stale_after) else None


def is_run_locked(storage: Storage, stale_after: float = 90.0) -> bool:
    """Whether a live driver holds the run lock right now (for status displays)."""
    local = storage.local_path(LOCAL_LOCK_FILE)
    if local is not None:
        if not local.exists():
            return False
        fd = os.open(local, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we may just have taken
        return False
    try:
        info = json.loads(storage.read_text(S3_LOCK_FILE))
    except Exception:  # noqa: BLE001 - no lock object
        return False
    return not _holder_is_dead(info, stale_after)
