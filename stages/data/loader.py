"""A deterministic, exactly-resumable streaming loader over webdataset shards.

How an epoch is laid out (all of it a pure function of seed, epoch and the shard list):

1. The shard list is permuted with ``(seed, epoch)`` (or drawn with replacement in
   ``resampled`` mode). Rank ``r`` of ``R`` takes every R-th shard; within a rank, logical
   DataLoader worker ``w`` of ``W`` takes every W-th of those. No shard is read twice per epoch.
2. Each logical worker streams its shards in order and visits each shard's samples in a
   permutation drawn from ``(seed, epoch, shard)``: a block shuffle that needs one shard in
   memory and no shuffle buffer to replay on resume.
3. Every worker on every rank yields exactly ``batches_per_worker`` batches: the minimum over all
   of them of ``samples // batch_size``. Ranks therefore never wait on each other at the end of an
   epoch (no hang); the few samples past that minimum are dropped this epoch (others next epoch).
   Fewer shards than ranks x workers is refused at construction with a clear message.

Resume. ``state_dict()`` records the epoch, how many batches this rank has consumed, and for each
logical worker how many raw samples it has read (carried on every batch). A loader restored with
``load_state_dict`` skips whole shards by their manifest counts, skips the read part of the current
shard without decoding, and rotates the physical DataLoader workers so that the round-robin order
continues exactly where it stopped. Augmentation randomness is keyed by (seed, epoch, sample key),
so a resumed stream yields the same samples, in the same order, with the same crops.

Corrupt samples (undecodable images, a shard cut short) are skipped, counted and reported through
``stats``; a worker that runs short because of them wraps around its own shards to fill its last
batch, so batch counts stay equal. No partial sample ever reaches the model.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import VitpipeError
from pipeline.storage import Storage
from stages.data.sources import label_name
from stages.data.tarshards import BadShard, iter_tar_samples
from stages.data.transforms import decode_eval, decode_sample, decode_train

__all__ = ["label_of", "ShardInfo", "EpochPlan", "plan_epoch", "ShardLoader", "scan_shards",
           "sample_seed"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the loader's storage
    samples: int


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each (rank, logical worker) reads this epoch, and how many batches each yields."""

    assignment: dict[tuple[int, int], list[int]]  # (rank, worker) -> shard indices, in reading order
    batches_per_worker: int


def _rng(*parts: object) -> random.Random:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """The augmentation seed of one sample: depends on nothing but (seed, epoch, key)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest(), "little")


def plan_epoch(shards: Sequence[ShardInfo], seed: int, epoch: int, world_size: int, num_workers: int,
               batch_size: int, resampled: bool = False, shuffle: bool = True) -> EpochPlan:
    """Pure: the shard assignment and per-worker batch count of one epoch."""
    n = len(shards)
    slots = world_size * num_workers
    if n < slots:
        raise VitpipeError(
            f"{n} shards cannot feed {world_size} rank(s) x {num_workers} loader worker(s): need at least {slots} "
            "shards (re-ingest with a smaller shard_samples, or use fewer loader workers)"
        )
    rng = _rng("shards", seed, epoch)
    if resampled:
        order = [rng.randrange(n) for _ in range(n)]
    else:
        order = list(range(n))
        if shuffle:
            rng.shuffle(order)
    assignment = {}
    for rank in range(world_size):
        mine = order[rank::world_size]
        for worker in range(num_workers):
            assignment[(rank, worker)] = mine[worker::num_workers]
    per_worker = min(sum(shards[i].samples for i in idx) for idx in assignment.values()) // batch_size
    if per_worker < 1:
        raise VitpipeError(
            f"batch size {batch_size} is larger than the samples some loader worker gets "
            f"({world_size} rank(s) x {num_workers} worker(s) over {n} shards)"
        )
    return EpochPlan(assignment, per_worker)


def scan_shards(storage: Storage, paths: Sequence[str]) -> list[ShardInfo]:
    """Count the samples of shards that have no ingest manifest (e.g. made by other tools)."""
    infos = []
    for path in paths:
        with storage.open_read(path) as f:
            infos.append(ShardInfo(path, sum(1 for _ in iter_tar_samples(f, name=path))))
    return infos


def label_of(files: dict[str, bytes], class_index: dict[str, int] | None = None) -> int:
    """A sample's class id: ``KEY.cls``, else a name (``.txt``/``.json``) looked up in ``class_index``."""
    if "cls" in files:
        return int(files["cls"].decode().strip())
    name = label_name(files, None)
    if name is None:
        raise ValueError(f"no label (.cls, .txt or .json) among {', '.join(sorted(files))}")
    if class_index is None:
        raise ValueError("sample is labelled by name; pass class_names to the loader")
    if name not in class_index:
        raise ValueError(f"label {name!r} is not among the loader's class_names")
    return class_index[name]


@dataclass
class _EpochCursor:
    epoch: int
    batches: int  # consumed by this rank this epoch
    positions: dict[int, int] = field(default_factory=dict)  # logical worker -> raw samples read


class _ShardStream(IterableDataset):
    """One epoch's batches for one rank, picking up from a cursor. Runs inside DataLoader workers."""

    def __init__(self, loader: ShardLoader, cursor: _EpochCursor, plan: EpochPlan) -> None:
        self.loader = loader
        self.cursor = cursor
        self.plan = plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        workers = self.loader.workers
        # Rotate roles so that the DataLoader's round-robin, which restarts at physical worker 0,
        # continues with the logical worker whose turn it was when the state was saved.
        logical = (physical + self.cursor.batches) % workers
        consumed = len(range(logical, self.cursor.batches, workers))
        remaining = self.plan.batches_per_worker - consumed
        if remaining <= 0:
            return
        start = self.cursor.positions.get(logical, 0)
        yield from self.loader._worker_batches(self.cursor.epoch, self.plan, logical, start, remaining)


class ShardLoader:
    """Batches of decoded, augmented images from webdataset shards, resumable to the sample.

    Iterate it for the rest of the current epoch; the next iteration starts the next epoch (in
    ``resampled`` mode iteration never ends). Each batch is a dict with ``image`` (uint8,
    B x S x S x 3: :func:`~stages.data.transforms.to_model_input` normalises it on the device),
    ``label`` (int64, B) and ``key`` (list of B sample keys). With ``pin_memory`` (for a CUDA
    device) batches arrive in page-locked memory, ready for a non-blocking copy.
    """

    def __init__(
        self,
        storage: Storage,
        shards: Sequence[ShardInfo],
        batch_size: int,
        image_size: int,
        train: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        resampled: bool = False,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        eval_crop_fraction: float = 1.0,
        prefetch_factor: int = 2,
        class_names: Sequence[str] | None = None,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.storage = storage
        self.shards = list(shards)
        self.batch_size = batch_size
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.workers = max(1, num_workers)
        self.resampled = resampled
        self.crop_scale = crop_scale
        self.hflip = hflip
        self.eval_crop_fraction = eval_crop_fraction
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        # Shards from other tools label samples by name (KEY.txt / KEY.json); map names to indices.
        self.class_index = {name: i for i, name in enumerate(class_names)} if class_names else None
        self._cursor = _EpochCursor(epoch=0, batches=0)
        self.stats = {"skipped": 0, "samples": 0}
        self.skipped_examples: list[dict[str, str]] = []
        self._plan(0)  # validate the layout now, not at the first batch

    # Layout --------------------------------------------------------------------------------

    def _plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.shards, self.seed, epoch, self.world_size, self.workers, self.batch_size,
                          resampled=self.resampled, shuffle=self.train)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self._plan(self._cursor.epoch).batches_per_worker * self.workers

    @property
    def epoch(self) -> int:
        return self._cursor.epoch

    # State ----------------------------------------------------------------------------------

    def _signature(self) -> dict[str, Any]:
        shard_digest = hashlib.sha256("|".join(f"{s.path}:{s.samples}" for s in self.shards).encode()).hexdigest()
        return {"seed": self.seed, "world_size": self.world_size, "rank": self.rank, "workers": self.workers,
                "batch_size": self.batch_size, "resampled": self.resampled, "train": self.train,
                "shards": shard_digest[:16]}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "epoch": self._cursor.epoch, "batches": self._cursor.batches,
                "positions": {str(k): v for k, v in self._cursor.positions.items()},
                "stats": dict(self.stats), "signature": self._signature()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise VitpipeError(f"loader state version {state.get('version')} is not {STATE_VERSION}")
        mine, theirs = self._signature(), state.get("signature", {})
        changed = sorted(k for k in mine if mine[k] != theirs.get(k))
        if changed:
            raise VitpipeError(f"cannot resume the data stream: {', '.join(changed)} changed since the checkpoint")
        self._cursor = _EpochCursor(int(state["epoch"]), int(state["batches"]),
                                    {int(k): int(v) for k, v in state["positions"].items()})
        self.stats = dict(state.get("stats", self.stats))

    # Iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            plan = self._plan(self._cursor.epoch)
            stream = _ShardStream(self, _EpochCursor(self._cursor.epoch, self._cursor.batches,
                                                     dict(self._cursor.positions)), plan)
            if self.num_workers > 0:
                batches: Any = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                          prefetch_factor=self.prefetch_factor, persistent_workers=False,
                                          pin_memory=self.pin_memory)
            else:
                batches = stream
            for batch in batches:
                logical, position, skipped = batch.pop("_worker"), batch.pop("_position"), batch.pop("_skipped")
                self._cursor.batches += 1
                self._cursor.positions[int(logical)] = int(position)
                self.stats["samples"] += len(batch["key"])
                if self.pin_memory and self.num_workers == 0:  # DataLoader workers pin in their own thread
                    batch["image"], batch["label"] = batch["image"].pin_memory(), batch["label"].pin_memory()
                if skipped:
                    self.stats["skipped"] += len(skipped)
                    self.skipped_examples.extend(skipped[: max(0, 20 - len(self.skipped_examples))])
                    for item in skipped:
                        log.warning("skipped sample %s: %s", item["key"], item["reason"])
                yield batch
            self._cursor = _EpochCursor(self._cursor.epoch + 1, 0)
            if not self.resampled:
                return

    # Worker side ------------------------------------------------------------------------------

    def _read_shard(self, index: int) -> tuple[list[tuple[str, dict[str, bytes]]], str | None]:
        info = self.shards[index]
        samples: list[tuple[str, dict[str, bytes]]] = []
        problem = None
        try:
            with self.storage.open_read(info.path) as f:
                for sample in iter_tar_samples(f, name=info.path):
                    samples.append(sample)
        except BadShard as err:  # damaged data: its remaining samples are skipped and reported
            problem = str(err)
        # Storage errors (after boto3's retries) propagate: skipping them would silently change
        # the sample stream and break exact resume.
        if problem is None and len(samples) < info.samples:
            problem = f"{info.path}: {len(samples)} samples, {info.samples} expected (truncated)"
        return samples, problem

    def _raw_stream(self, epoch: int, shard_indices: list[int], start: int) -> Iterator[tuple[int, Any]]:
        """(raw position after this sample, sample or a skip record), from raw position ``start``.

        Raw positions count the manifest's samples, so whole shards are skipped by count without
        being read. A worker that runs out wraps around its shards (``lap`` > 0), which only
        happens when corrupt samples left it short.
        """
        position = 0
        lap = 0
        while True:
            for index in shard_indices:
                count = self.shards[index].samples
                if position + count <= start:
                    position += count
                    continue
                samples, problem = self._read_shard(index)
                order = list(range(count))
                if self.train:
                    _rng("samples", self.seed, epoch, index, lap).shuffle(order)
                for k in order:
                    position += 1
                    if position <= start:
                        continue
                    if k < len(samples):
                        yield position, samples[k]
                    else:
                        yield position, {"key": f"{self.shards[index].path}#{k}", "reason": problem or "missing"}
            lap += 1
            if not any(self.shards[i].samples for i in shard_indices):
                return

    def _label(self, files: dict[str, bytes]) -> int:
        return label_of(files, self.class_index)

    def _decode(self, epoch: int, key: str, files: dict[str, bytes]) -> tuple[np.ndarray, int]:
        label = self._label(files)
        if self.train:
            rng = random.Random(sample_seed(self.seed, epoch, key))
            return decode_sample(files, lambda data: decode_train(data, self.image_size, rng, self.crop_scale,
                                                                   self.hflip)), label
        return decode_sample(files, lambda data: decode_eval(data, self.image_size, self.eval_crop_fraction)), label

    def _worker_batches(self, epoch: int, plan: EpochPlan, logical: int, start: int,
                        remaining: int) -> Iterator[dict[str, Any]]:
        shard_indices = plan.assignment[(self.rank, logical)]
        images: list[np.ndarray] = []
        labels: list[int] = []
        keys: list[str] = []
        skipped: list[dict[str, str]] = []
        budget = sum(self.shards[i].samples for i in shard_indices)  # a whole lap without one good sample
        bad_in_a_row = 0
        for position, item in self._raw_stream(epoch, shard_indices, start):
            if isinstance(item, dict):
                skipped.append(item)
            else:
                key, files = item
                try:
                    pixels, label = self._decode(epoch, key, files)
                except Exception as err:  # noqa: BLE001 - a corrupt sample is skipped and reported
                    skipped.append({"key": key, "reason": " ".join(str(err).split()) or type(err).__name__})
                else:
                    bad_in_a_row = -1
            bad_in_a_row += 1
            if bad_in_a_row > budget:  # would loop forever: fail instead of hanging
                raise VitpipeError(f"every sample in shards {[self.shards[i].path for i in shard_indices]} "
                                   f"is unreadable (last: {skipped[-1]['reason']})")
            if bad_in_a_row:
                continue
            images.append(pixels)
            labels.append(label)
            keys.append(key)
            if len(keys) == self.batch_size:
                yield {
                    "image": torch.from_numpy(np.stack(images)),
                    "label": torch.tensor(labels, dtype=torch.int64),
                    "key": keys,
                    "_worker": logical,
                    "_position": position,
                    "_skipped": skipped,
                }
                images, labels, keys, skipped = [], [], [], []
                remaining -= 1
                if remaining == 0:
                    return
