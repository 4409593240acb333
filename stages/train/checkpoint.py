"""Training checkpoints that count only once every rank's files are complete.

Layout under the stage folder::

    checkpoints/step-00000100/<DeepSpeed files of every rank>, state-rank0.json, state-rank1.json, ...
    checkpoints/step-00000100/COMPLETE.json   written last, by rank 0, after a barrier:
                                              every file of the checkpoint with its size and sha256

A checkpoint directory without ``COMPLETE.json`` (a kill mid-write) is ignored; one whose files
do not match ``COMPLETE.json`` is damaged: a resume skips it for the previous complete one
(:meth:`~stages.train.checkpointer.Checkpointer.restore`), with a warning naming the file.
DeepSpeed writes to a filesystem path: on local storage that is the stage folder itself; on S3
ranks write to a local staging directory, each uploads its own files, and rank 0 commits. On
resume each rank reads only its own files and the rank-less ones (:func:`rank_files`), checked
against the record as they arrive, and rank 0 checks the listing: at 128 ranks nobody downloads
the whole checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import DeterministicError
from pipeline.storage import Storage, sha256_stream

__all__ = ["CheckpointStore", "CheckpointDamaged", "COMPLETE", "ROOT", "step_name", "rank_files", "abandoned_checkpoints",
           "abandoned_checkpoint_folders"]

log = logging.getLogger(__name__)

ROOT = "checkpoints"
COMPLETE = "COMPLETE.json"
_STEP = re.compile(r"^step-(\d{8})$")


class CheckpointDamaged(DeterministicError):
    """A committed checkpoint whose files do not match its commit record (missing, resized, corrupt)."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


_RANK_IN_NAME = re.compile(r"(?:rank_|rank)(\d+)")


def _owner_rank(name: str) -> int | None:
    """The rank a checkpoint file belongs to, from its name (None: written by rank 0 for all)."""
    if name.startswith("mp_rank_") and "zero_pp" not in name:
        return None  # DeepSpeed's model-states file (model-parallel rank, not data-parallel)
    m = _RANK_IN_NAME.search(name.replace("mp_rank_", ""))
    return int(m.group(1)) if m else None


def _max_rank(local: Path) -> int:
    ranks = [r for p in local.rglob("*") if p.is_file() and (r := _owner_rank(p.name)) is not None]
    return max(ranks, default=0)


class CheckpointStore:
    def __init__(self, storage: Storage, staging: Path) -> None:
        self.storage = storage  # the stage folder
        self.staging = staging  # local scratch, used when storage is remote

    @property
    def remote(self) -> bool:
        return self.storage.local_path() is None

    def local_dir(self, step: int) -> Path:
        """Where ranks write (and DeepSpeed reads) the checkpoint of ``step``."""
        base = self.storage.local_path(ROOT) if not self.remote else self.staging / ROOT
        assert base is not None
        return base / step_name(step)

    def publish(self, step: int, rank: int) -> dict[str, dict[str, object]]:
        """Every rank: hash (and, on remote storage, upload) the files of ``step`` in its own
        local directory; returns them as {relative path: {size, sha256}}.

        On a shared local directory each rank reports the files whose names carry its rank
        (DeepSpeed's ``*rank_R*`` shards, our ``*-rankR.json``) and rank 0 also the rank-less
        ones, so no file is claimed twice.
        """
        local = self.local_dir(step)
        mine = [p for p in local.rglob("*") if p.is_file() and p.name != COMPLETE
                and (_owner_rank(p.name) == rank or (_owner_rank(p.name) is None and rank == 0))]
        return self.publish_files(local, mine, f"{ROOT}/{step_name(step)}")

    def publish_files(self, local: Path, paths: list[Path], prefix: str) -> dict[str, dict[str, Any]]:
        """Hash ``paths`` (under ``local``) and, on remote storage, upload them under ``prefix``;
        returns {path relative to ``local``: {size, sha256}} for a commit record."""
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(paths):
            rel = path.relative_to(local).as_posix()
            with open(path, "rb") as f:
                digest, size = sha256_stream(f)
            files[rel] = {"size": size, "sha256": digest}
            if self.remote:
                self.storage.upload_file(path, f"{prefix}/{rel}")
        return files

    def commit(self, step: int, files: dict[str, dict[str, object]] | None = None,
               world_size: int | None = None) -> None:
        """Rank 0, after every rank published: write COMPLETE.json, the commit point, last."""
        if files is None:  # single process: everything in the local directory is ours
            files = self.publish(step, 0) | {
                rel: meta for r in range(1, 1 + _max_rank(self.local_dir(step))) for rel, meta in
                self.publish(step, r).items()}
        record = json.dumps({"step": step, "world_size": world_size, "files": files}, indent=1, sort_keys=True)
        self.storage.write_text(f"{ROOT}/{step_name(step)}/{COMPLETE}", record)

    def world_size(self, step: int) -> int | None:
        """How many ranks wrote the committed checkpoint of ``step`` (None: not recorded)."""
        return json.loads(self.storage.read_text(f"{ROOT}/{step_name(step)}/{COMPLETE}")).get("world_size")

    def steps(self) -> list[int]:
        """Committed checkpoint steps, ascending."""
        found = []
        for obj in self.storage.list(ROOT):
            parts = obj.path.split("/")
            if len(parts) == 3 and parts[2] == COMPLETE and (m := _STEP.match(parts[1])):
                found.append(int(m.group(1)))
        return sorted(found)

    def record(self, step: int) -> dict[str, Any]:
        """The commit record of ``step``: every file with its size and sha256, and who wrote it."""
        return json.loads(self.storage.read_text(f"{ROOT}/{step_name(step)}/{COMPLETE}"))

    def check_listing(self, step: int, record: dict[str, Any]) -> None:
        """Every file the record names is there with its size (one LIST; no byte is read).
        Raises :class:`CheckpointDamaged` naming the first file that is not."""
        prefix = f"{ROOT}/{step_name(step)}"
        present = {o.path[len(prefix) + 1:]: o.size for o in self.storage.list(prefix)}
        for rel, meta in sorted(record["files"].items()):
            if rel not in present:
                raise CheckpointDamaged(f"checkpoint {self.storage.uri_of(f'{prefix}/{rel}')}: file is missing")
            if present[rel] != meta["size"]:
                raise CheckpointDamaged(f"checkpoint {self.storage.uri_of(f'{prefix}/{rel}')}: {present[rel]} bytes, "
                                        f"{meta['size']} recorded")

    def fetch(self, step: int, rank: int, record: dict[str, Any]) -> Path:
        """The local directory DeepSpeed loads ``step`` from on ``rank``, holding (at least) the files
        this rank reads — its own shards and the rank-less ones (:func:`rank_files`) — each checked
        against the record's sha256 as it is fetched (downloaded first when remote). The other
        ranks' files are neither read nor downloaded: DeepSpeed loads only its own rank's.
        Raises :class:`CheckpointDamaged` naming the first file that does not match."""
        local = self.local_dir(step)
        self.fetch_files(f"{ROOT}/{step_name(step)}", local, rank_files(record, rank))
        return local

    def fetch_files(self, prefix: str, local: Path, files: dict[str, dict[str, Any]]) -> None:
        """``files`` (relative to ``prefix``) into ``local`` (downloaded when remote; on a disk
        ``local`` is the folder itself), each checked against its recorded size and sha256."""
        for rel, meta in sorted(files.items()):
            path = local / rel
            if self.remote:
                self.storage.download_file(f"{prefix}/{rel}", path)
            try:
                with open(path, "rb") as f:
                    digest, size = sha256_stream(f)
            except FileNotFoundError:
                raise CheckpointDamaged(f"checkpoint {self.storage.uri_of(f'{prefix}/{rel}')}: file is missing") from None
            if (size, digest) != (meta["size"], meta["sha256"]):
                raise CheckpointDamaged(f"checkpoint {self.storage.uri_of(f'{prefix}/{rel}')}: file is corrupt (size or "
                                        f"sha256 differs from {COMPLETE})")

    def read_state(self, step: int, rank: int, record: dict[str, Any]) -> dict[str, Any]:
        """Rank ``rank``'s JSON state file of ``step`` (read from storage, checked against the record)."""
        rel = f"{ROOT}/{step_name(step)}/state-rank{rank}.json"
        data = self.storage.read_bytes(rel)
        meta = record["files"].get(f"state-rank{rank}.json")
        if meta is None or (len(data), hashlib.sha256(data).hexdigest()) != (meta["size"], meta["sha256"]):
            raise CheckpointDamaged(f"checkpoint {self.storage.uri_of(rel)}: missing from {COMPLETE} or corrupt")
        return json.loads(data)

    def discard_local(self, step: int) -> None:
        """Drop this rank's downloaded copy of ``step`` (remote storage; a no-op on a disk)."""
        if self.remote:
            shutil.rmtree(self.local_dir(step), ignore_errors=True)

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` committed checkpoints, and older uncommitted ones."""
        steps = self.steps()
        if not steps:
            return
        for step in [*steps[:-keep], *abandoned_checkpoints(self.storage)]:
            self.storage.delete_prefix(f"{ROOT}/{step_name(step)}")
            if self.remote:
                shutil.rmtree(self.staging / ROOT / step_name(step), ignore_errors=True)


def rank_files(record: dict[str, Any], rank: int) -> dict[str, dict[str, Any]]:
    """The files of a committed checkpoint that ``rank`` reads on resume: those its name says it
    owns and the rank-less ones every rank reads (DeepSpeed's model states)."""
    return {rel: meta for rel, meta in record["files"].items()
            if _owner_rank(rel.rsplit("/", 1)[-1]) in (rank, None)}


def abandoned_checkpoints(stage: Storage) -> list[int]:
    """Steps of uncommitted checkpoint folders (no ``COMPLETE.json``: their writers died) older than
    the newest committed checkpoint: no resume can ever use them. A newer one may still be being
    written by a live run, so it is left alone."""
    committed: set[int] = set()
    seen: set[int] = set()
    for obj in stage.list(ROOT):
        parts = obj.path.split("/")
        if len(parts) >= 3 and (m := _STEP.match(parts[1])):
            seen.add(int(m.group(1)))
            if len(parts) == 3 and parts[2] == COMPLETE:
                committed.add(int(m.group(1)))
    newest = max(committed, default=-1)
    return sorted(step for step in seen - committed if step < newest)


def abandoned_checkpoint_folders(stage: Storage) -> list[str]:
    """:func:`abandoned_checkpoints` as folders relative to the stage folder (for ``vitpipe gc``)."""
    return [f"{ROOT}/{step_name(step)}" for step in abandoned_checkpoints(stage)]
