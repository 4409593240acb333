"""Training checkpoints that count only once every rank's files are complete.

Layout under the stage folder::

    checkpoints/step-00000100/<DeepSpeed files of every rank>, state-rank0.json, state-rank1.json, ...
    checkpoints/step-00000100/COMPLETE.json   written last, by rank 0, after a barrier:
                                              every file of the checkpoint with its size and sha256

A checkpoint directory without ``COMPLETE.json`` (a kill mid-write) is ignored; one whose files
do not match ``COMPLETE.json`` is rejected with an error naming the file. DeepSpeed writes to a
filesystem path: on local storage that is the stage folder itself; on S3 ranks write to a local
staging directory, each uploads its own files, and rank 0 commits.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from pipeline.errors import VitpipeError
from pipeline.storage import Storage, sha256_stream

__all__ = ["CheckpointStore", "COMPLETE", "step_name", "abandoned_checkpoints", "abandoned_checkpoint_folders"]

log = logging.getLogger(__name__)

ROOT = "checkpoints"
COMPLETE = "COMPLETE.json"
_STEP = re.compile(r"^step-(\d{8})$")


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
        files: dict[str, dict[str, object]] = {}
        for path in sorted(p for p in local.rglob("*") if p.is_file() and p.name != COMPLETE):
            owner = _owner_rank(path.name)
            if owner != rank and not (owner is None and rank == 0):
                continue
            rel = path.relative_to(local).as_posix()
            with open(path, "rb") as f:
                digest, size = sha256_stream(f)
            files[rel] = {"size": size, "sha256": digest}
            if self.remote:
                self.storage.upload_file(path, f"{ROOT}/{step_name(step)}/{rel}")
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

    def verify(self, step: int) -> None:
        """Raise a one-line error if a committed checkpoint's files are missing or damaged."""
        prefix = f"{ROOT}/{step_name(step)}"
        record = json.loads(self.storage.read_text(f"{prefix}/{COMPLETE}"))
        present = {o.path[len(prefix) + 1:]: o.size for o in self.storage.list(prefix)}
        for rel, meta in sorted(record["files"].items()):
            where = self.storage.uri_of(f"{prefix}/{rel}")
            if rel not in present:
                raise VitpipeError(f"checkpoint {where}: file is missing; delete {prefix} to fall back to an "
                                   "earlier checkpoint")
            if present[rel] != meta["size"] or self.storage.sha256(f"{prefix}/{rel}") != meta["sha256"]:
                raise VitpipeError(f"checkpoint {where}: file is corrupt (size or sha256 differs from "
                                   f"{COMPLETE}); delete {prefix} to fall back to an earlier checkpoint")

    def latest(self) -> int | None:
        steps = self.steps()
        if not steps:
            return None
        self.verify(steps[-1])
        return steps[-1]

    def fetch(self, step: int) -> Path:
        """A local directory holding the checkpoint (downloaded first when remote)."""
        local = self.local_dir(step)
        if self.remote:
            prefix = f"{ROOT}/{step_name(step)}"
            for obj in self.storage.list(prefix):
                self.storage.download_file(obj.path, local / obj.path[len(prefix) + 1:])
        return local

    def prune(self, keep: int) -> None:
        """Delete all but the newest ``keep`` committed checkpoints, and older uncommitted ones."""
        steps = self.steps()
        if not steps:
            return
        for step in [*steps[:-keep], *abandoned_checkpoints(self.storage)]:
            self.storage.delete_prefix(f"{ROOT}/{step_name(step)}")
            if self.remote:
                shutil.rmtree(self.staging / ROOT / step_name(step), ignore_errors=True)


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
