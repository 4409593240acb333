"""What a run no longer needs, found and (when asked) removed: ``vitpipe gc RUN [--yes]``.

A long run on a flaky cluster leaves debris that nothing else ever removes:

- **unfinished writes**: multipart uploads of writers killed mid-upload (S3 keeps and bills their
  parts until they are aborted), temp files of writers killed mid-write on a disk;
- **abandoned checkpoints**: checkpoint folders that never committed, older than the newest
  committed one (the stage types that checkpoint say which: a ``finder`` per stage folder);
- **set-aside stage folders**: ``stages/NAME.previous`` and ``NAME.partial``, kept when a
  result-defining change re-ran a stage;
- **a stale lock**: an S3 run lock whose holder's heartbeat stopped.

A committed output is never touched: only the kinds above are considered, a set-aside folder that
a stopped driver was still moving is left for ``vitpipe resume`` to settle, and nothing is listed
or removed while a live driver holds the run (its uploads in flight look like leftovers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pipeline.engine import PARTIAL_SUFFIX, PREVIOUS_SUFFIX
from pipeline.errors import RunLockedError
from pipeline.events import EventLog
from pipeline.lock import S3_LOCK_FILE, RunLock, is_run_locked, stale_lock_holder
from pipeline.state import load_state
from pipeline.status import format_bytes
from pipeline.storage import Storage, UnfinishedWrite
from pipeline.tables import text_table

__all__ = ["Leftover", "LeftoverFinder", "find_leftovers", "remove_leftovers", "format_leftovers"]

log = logging.getLogger(__name__)

STAGES = "stages"


@dataclass(frozen=True)
class Leftover:
    kind: str  # "unfinished write" | "abandoned checkpoint" | "set-aside folder" | "stale lock"
    path: str  # relative to the run root; a folder ends with "/"
    size: int  # bytes
    detail: str
    write: UnfinishedWrite | None = None  # for an unfinished write: what to discard


# Given a stage folder, the sub-folders (relative to it) that can go: e.g. abandoned checkpoints.
LeftoverFinder = Callable[[Storage], list[str]]


def _check_not_in_use(run: Storage) -> None:
    if is_run_locked(run):
        raise RunLockedError(f"{run.uri}: a driver is running this run; gc waits until it has stopped "
                             "(its uploads in flight would look like leftovers)")


def _folder_size(run: Storage, folder: str) -> int:
    return sum(o.size for o in run.list(folder))


def find_leftovers(run: Storage, finders: Iterable[LeftoverFinder] = ()) -> list[Leftover]:
    """Everything under ``run`` that no run needs any more (see the module doc), sorted by path."""
    _check_not_in_use(run)
    found = [Leftover("unfinished write", w.path, w.size, f"started {w.started or '?'}, never committed", w)
             for w in run.unfinished_writes()]

    state = load_state(run, "")
    stage_folders = sorted({o.path.split("/")[1] for o in run.list(STAGES) if o.path.count("/") >= 2})
    for folder in stage_folders:
        base, suffix = _split_suffix(folder)
        if suffix:
            if state.stages.get(base) is not None and state.stages[base].setting_aside:
                log.warning("%s/%s: a driver stopped while setting stage %s aside; `vitpipe resume` settles it "
                            "(left alone)", STAGES, folder, base)
                continue
            path = f"{STAGES}/{folder}"
            found.append(Leftover("set-aside folder", path + "/", _folder_size(run, path),
                                  f"kept from an earlier run of {base}"))
            continue
        stage = run.child(f"{STAGES}/{folder}")
        for finder in finders:
            for sub in finder(stage):
                path = f"{STAGES}/{folder}/{sub}"
                found.append(Leftover("abandoned checkpoint", path + "/", _folder_size(run, path),
                                      "never committed; older than the newest committed checkpoint"))

    holder = stale_lock_holder(run)
    if holder is not None:
        found.append(Leftover("stale lock", S3_LOCK_FILE, run.size(S3_LOCK_FILE) or 0,
                              f"held by {holder}, whose heartbeat stopped"))
    return sorted(found, key=lambda item: (item.path, item.kind))


def _split_suffix(folder: str) -> tuple[str, str]:
    for suffix in (PREVIOUS_SUFFIX, PARTIAL_SUFFIX):
        if folder.endswith(suffix):
            return folder[: -len(suffix)], suffix
    return folder, ""


def remove_leftovers(run: Storage, leftovers: list[Leftover]) -> int:
    """Remove ``leftovers`` holding the run lock (so no driver starts meanwhile); returns the bytes freed."""
    lock = RunLock(run)
    lock.acquire()  # takes over a stale S3 lock: that removes it (and is logged)
    try:
        for item in leftovers:
            if item.write is not None:
                run.discard(item.write)
            elif item.kind != "stale lock":
                run.delete_prefix(item.path.rstrip("/"))
        EventLog(run, load_state(run, "").run).emit(
            "gc", removed=[{"kind": item.kind, "path": item.path, "size": item.size} for item in leftovers])
    finally:
        lock.release()
    return sum(item.size for item in leftovers)


def format_leftovers(leftovers: list[Leftover]) -> str:
    rows = [(item.kind, item.path, format_bytes(item.size), item.detail) for item in leftovers]
    return text_table(("KIND", "PATH", "SIZE", "WHY"), rows)
