"""Training batches from webdataset shards in one global order, resumable on any world size.

The order is :mod:`stages.data.order`'s: a pure function of (seed, epoch, shard sizes, streams,
open shards, shuffle buffer), read by :mod:`stages.data.streams`. Rank ``r`` of ``R`` reads the
streams ``c ≡ r (mod R)`` — every shard byte is read by one process — and its loader workers
split those streams between them (worker ``w`` of ``W``: ``(c // R) ≡ w (mod W)``). Each worker
decodes and augments its streams' samples for one global step at a time and hands them over as
one chunk; the rank puts the chunks of a step in global position order and cuts its share into
micro-batches by :func:`slot_order`. So the samples of global step ``t``, and their crops, are the
same for every world size, micro-batch and number of loader workers that keep the global batch;
and each micro-batch, tagged with its slot (epoch, step, g), holds the same samples for every
world size that keeps the micro-batch too (the training step seeds its random masks by slot).

State is one global cursor — ``{"epoch", "step"}`` plus a signature of what defines the order —
taken between steps; a loader restored from it, at any world size, continues the stream exactly.

Damaged samples (undecodable, missing from a damaged or short shard) are recorded with their
reason in ``stats`` and the log and keep their place with the label ``UNREADABLE``, which the
training step leaves out of the loss: micro-batches keep their size (every rank runs the same
collectives) and a step's samples stay the same for every world size. A rank whose whole step
is unreadable stops with an error instead (something is wrong with the data, not a sample).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.errors import VitpipeError
from pipeline.storage import Storage
from stages.data.order import Layout, OrderSpec, derived_seed, epoch_pieces, steps_per_epoch
from stages.data.sources import label_name
from stages.data.streams import Sample, StreamReader
from stages.data.tarshards import ShardInfo, iter_tar_samples
from stages.data.transforms import decode_sample, decode_train

__all__ = ["UNREADABLE", "ShardInfo", "ShardLoader", "label_of", "scan_shards", "sample_seed", "slot_order",
           "check_layout", "STATE_VERSION"]

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: per-rank, per-worker positions (before the global order)
UNREADABLE = -1  # the label of a sample that could not be read; the training step leaves it out


def sample_seed(seed: int, epoch: int, key: str, draw: int | None = None) -> int:
    """The augmentation seed of one sample: (seed, epoch, key) and, when a shard can be drawn twice
    in an epoch (resampled mode), the draw — never which rank or worker decodes it."""
    return derived_seed(seed, epoch, key) if draw is None else derived_seed(seed, epoch, key, draw)


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


def check_layout(shards: Sequence[ShardInfo], order: OrderSpec, global_batch: int, micro_batch: int,
                 world_size: int) -> int:
    """Steps per epoch, or a one-line error when the order cannot feed this geometry."""
    try:
        layout = Layout(order.streams, global_batch, world_size)
    except ValueError as err:
        raise VitpipeError(str(err)) from None
    if (global_batch // world_size) % micro_batch:
        raise VitpipeError(f"global_batch {global_batch} is not divisible by workers x micro_batch "
                           f"({world_size} x {micro_batch})")
    steps = steps_per_epoch([s.samples for s in shards], order, layout.global_batch)
    if steps < 1:
        raise VitpipeError(f"{sum(s.samples for s in shards)} samples cannot fill one global batch of {global_batch} "
                           f"over {order.streams} streams (each stream needs {global_batch // order.streams})")
    return steps


def slot_order(samples: int, accumulation: int) -> torch.Tensor | None:
    """The order in which a rank's samples of one step (in position order) are cut into its
    ``accumulation`` micro-batches: micro-batch ``a`` takes samples a, a + A, a + 2A, ...

    Rank r of R holds positions r, r + R, r + 2R, ..., so its micro-batch a holds the positions
    ≡ r + R·a (mod R·A), and R·A = global batch / micro-batch whatever R is: micro-batch *slot*
    g = r + R·a holds the same samples, in the same order, on any number of workers. The random
    masks of training (dropout, stochastic depth) are seeded per slot, so they stay the same when
    a run resumes on another world size. None: the samples are in that order already."""
    if accumulation == 1:
        return None
    per_micro = samples // accumulation
    return torch.tensor([a + accumulation * i for a in range(accumulation) for i in range(per_micro)])


class _Chunks(IterableDataset):
    """One worker's chunks: per global step, its streams' samples decoded, with their positions."""

    def __init__(self, loader: ShardLoader, epoch: int, step: int) -> None:
        self.loader = loader
        self.epoch = epoch
        self.step = step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        yield from self.loader._worker_chunks(self.epoch, self.step, worker)


def _forked_workers(loader: DataLoader) -> Iterator[dict[str, Any]]:
    """The loader's iterator, its worker processes forked with the parent's objects frozen out of
    the children's garbage collection. The parent is a Ray process (a Train worker; in tests the
    driver): a child that collected its garbage — ObjectRefs and actor handles among it — would
    call into its copy of Ray's core worker, which shares the parent's sockets (suspected, not
    proven, in a test-suite hang: the driver's next task never reached the raylet after the
    loader tests' workers had logged Ray reference-count warnings under their own pids)."""
    gc.collect()  # what is garbage now is freed here, by the parent that owns it
    gc.freeze()  # the rest: never examined by a child's collector (moved back for the parent below)
    try:
        return iter(loader)
    finally:
        gc.unfreeze()


class ShardLoader:
    """Micro-batches of one rank, in the global order, for the rest of the current epoch.

    Iterating again starts the next epoch. Each micro-batch is a dict with ``image`` (uint8,
    B x S x S x 3: :func:`~stages.data.transforms.to_model_input` normalises it on the device),
    ``label`` (int64, B) and ``key`` (B sample keys); with ``pin_memory`` (a CUDA device) the
    tensors are in page-locked memory, ready for a non-blocking copy.

    Memory: each stream keeps ``open_shards`` shards open (a reader thread and up to 16 samples
    each) and ``shuffle_buffer`` encoded samples; a rank reads ``streams / world_size`` streams.
    """

    def __init__(
        self,
        storage: Storage,
        shards: Sequence[ShardInfo],
        order: OrderSpec,
        global_batch: int,
        micro_batch: int,
        image_size: int,
        world_size: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        prefetch_factor: int = 2,
        class_names: Sequence[str] | None = None,
        pin_memory: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.storage = storage
        self.shards = list(shards)
        self.order = order
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.image_size = image_size
        self.world_size = world_size
        self.rank = rank
        self.num_workers = num_workers
        self.crop_scale = crop_scale
        self.hflip = hflip
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        # Shards from other tools label samples by name (KEY.txt / KEY.json); map names to indices.
        self.class_index = {name: i for i, name in enumerate(class_names)} if class_names else None
        self.steps_per_epoch = check_layout(self.shards, order, global_batch, micro_batch, world_size)
        self.layout = Layout(order.streams, global_batch, world_size, max(1, num_workers))
        self.accumulation = global_batch // world_size // micro_batch
        idle = [w for w in range(self.layout.workers) if not self.layout.worker_streams(rank, w)]
        if idle:
            log.warning("%d of %d loader workers have no stream to read (streams %d / world size %d = %d per rank): "
                        "raise streams to use them", len(idle), self.layout.workers, order.streams, world_size,
                        order.streams // world_size)
        self._epoch, self._step, self._micro = 0, 0, 0
        self.stats = {"samples": 0, "skipped": 0}
        self.skipped_examples: list[dict[str, str]] = []

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (the same on every rank)."""
        return self.steps_per_epoch * self.accumulation

    @property
    def epoch(self) -> int:
        return self._epoch

    # -- state ----------------------------------------------------------------------------------

    def _signature(self) -> dict[str, Any]:
        shard_digest = hashlib.sha256("|".join(f"{s.path}:{s.samples}" for s in self.shards).encode()).hexdigest()
        o = self.order
        return {"seed": o.seed, "streams": o.streams, "open_shards": o.open_shards, "shuffle_buffer": o.shuffle_buffer,
                "resampled": o.resampled, "global_batch": self.global_batch, "shards": shard_digest[:16]}

    def state_dict(self) -> dict[str, Any]:
        """The global cursor; taken between global steps (where the trainer checkpoints)."""
        if self._micro:
            raise RuntimeError(f"loader state asked for in the middle of step {self._step} "
                               f"({self._micro} of {self.accumulation} micro-batches)")
        return {"version": STATE_VERSION, "epoch": self._epoch, "step": self._step, "signature": self._signature()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise VitpipeError(f"loader state version {state.get('version')} is from an older vitpipe (a per-rank "
                               f"order; this one is version {STATE_VERSION}): re-run the stage to train with it")
        mine, theirs = self._signature(), state.get("signature", {})
        changed = sorted(k for k in mine if mine[k] != theirs.get(k))
        if changed:
            raise VitpipeError(f"cannot resume the data stream: {', '.join(changed)} changed since the checkpoint")
        self._epoch, self._step, self._micro = int(state["epoch"]), int(state["step"]), 0

    # -- the rank's side ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._micro = 0  # an iteration abandoned mid-step is redone from the step's start
        if self._step >= self.steps_per_epoch:  # an epoch restored at its very end
            self._epoch, self._step = self._epoch + 1, 0
        chunks = _Chunks(self, self._epoch, self._step)
        workers = self.num_workers
        stream: Iterator[dict[str, Any]] = _forked_workers(
            DataLoader(chunks, batch_size=None, num_workers=workers, prefetch_factor=self.prefetch_factor,
                       persistent_workers=False)) if workers else iter(chunks)
        per_step = self.layout.workers
        for _ in range(self._step, self.steps_per_epoch):
            pieces = [next(stream) for _ in range(per_step)]  # one chunk from every worker, in turn
            for batch in self._micro_batches(pieces):
                self._micro += 1
                if self._micro == self.accumulation:
                    self._step, self._micro = self._step + 1, 0
                yield batch
        self._epoch, self._step = self._epoch + 1, 0

    def _micro_batches(self, pieces: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        step = pieces[0]["step"]
        slots = slot_order(sum(len(p["key"]) for p in pieces), self.accumulation)
        if len(pieces) == 1:  # one worker: its chunk is already in position order
            order = slots
            images, labels, keys = pieces[0]["image"], pieces[0]["label"], pieces[0]["key"]
        else:  # interleave the workers' chunks by position
            by_position = torch.argsort(torch.cat([p["positions"] for p in pieces]))
            order = by_position if slots is None else by_position[slots]
            images, labels = torch.cat([p["image"] for p in pieces]), torch.cat([p["label"] for p in pieces])
            keys = [k for p in pieces for k in p["key"]]
        if order is not None:  # one gather: position order, then micro-batch slots
            images, labels, keys = images[order], labels[order], [keys[i] for i in order.tolist()]
        skipped = [s for p in pieces for s in p["skipped"]]
        self.stats["samples"] += len(keys)
        if skipped:
            self.stats["skipped"] += len(skipped)
            self.skipped_examples.extend(skipped[: max(0, 20 - len(self.skipped_examples))])
            for item in skipped:
                log.warning("skipped sample %s: %s", item["key"], item["reason"])
            if len(skipped) == len(keys):
                raise VitpipeError(f"every sample of step {step} on rank {self.rank} is unreadable, e.g. "
                                   f"{skipped[0]['key']}: {skipped[0]['reason']}")
        if self.pin_memory:
            images, labels = images.pin_memory(), labels.pin_memory()
        m = self.micro_batch
        for a, start in enumerate(range(0, len(keys), m)):
            yield {"image": images[start:start + m], "label": labels[start:start + m], "key": keys[start:start + m],
                   "slot": (self._epoch, step, self.rank + self.layout.world_size * a)}

    # -- a worker's side ------------------------------------------------------------------------

    def _worker_chunks(self, epoch: int, step: int, worker: int) -> Iterator[dict[str, Any]]:
        layout, order = self.layout, self.order
        mine = layout.worker_streams(self.rank, worker)
        pieces = epoch_pieces([s.samples for s in self.shards], order, epoch)
        own = {c: pieces[c] for c in mine}
        del pieces  # the other streams' pieces: at 300k shards, tens of MB per loader process
        per_stream = layout.per_stream
        readers: dict[int, StreamReader] = {}
        try:
            for c in mine:
                readers[c] = StreamReader(self.storage, self.shards, own[c], order, epoch, c, start=step * per_stream)
            streams = {c: iter(reader) for c, reader in readers.items()}
            for t in range(step, self.steps_per_epoch):
                # In position order (q * streams + c grows with q, then c): one worker's chunk is
                # its rank's share of the step as it stands, with no reordering copy.
                yield self._decode_chunk(t, epoch, [(q * order.streams + c, next(streams[c])[1])
                                                    for q in range(per_stream) for c in mine])
        finally:
            for reader in readers.values():
                reader.close()

    def _decode_chunk(self, step: int, epoch: int, samples: list[tuple[int, Sample]]) -> dict[str, Any]:
        size = self.image_size
        images = np.zeros((len(samples), size, size, 3), dtype=np.uint8)
        labels = np.full(len(samples), UNREADABLE, dtype=np.int64)
        keys, skipped = [], []
        for i, (_, sample) in enumerate(samples):
            keys.append(sample.key)
            reason = sample.problem
            if sample.files is not None:
                try:
                    labels[i] = label_of(sample.files, self.class_index)
                    draw = sample.slot.draw if self.order.resampled else None
                    rng = random.Random(sample_seed(self.order.seed, epoch, sample.key, draw))
                    images[i] = decode_sample(sample.files, functools.partial(
                        decode_train, size=size, rng=rng, scale=self.crop_scale, hflip=self.hflip))
                except Exception as err:  # noqa: BLE001 - a corrupt sample is recorded, not fatal
                    reason = " ".join(str(err).split()) or type(err).__name__
                    labels[i] = UNREADABLE
            if reason is not None:
                skipped.append({"key": sample.key, "reason": reason})
        return {"step": step, "positions": torch.tensor([j for j, _ in samples], dtype=torch.int64),
                "image": torch.from_numpy(images), "label": torch.from_numpy(labels), "key": keys, "skipped": skipped}
