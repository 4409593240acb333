"""Every sample of some shards exactly once, in order, for evaluation and feature extraction.

The training loader (:class:`~stages.data.loader.ShardLoader`) keeps batch counts equal across
ranks and workers, so it drops remainders; an accuracy needs each test sample counted exactly
once instead. This reader goes through the given shard slices in order with the eval transform
(resize to the model's resolution, no augmentation), yields a short last batch, and records
corrupt or missing samples as skips with their reason rather than failing the evaluation.

Work is split by samples, not by whole shards (:func:`split_samples`): with 128 ranks and a few
large test shards, whole shards would leave most ranks idle while a few decode for hours. The
price: a tar has no index, so a share that starts inside a shard streams the samples before it
without decoding them; with few shards and many ranks each shard's bytes are read about
(ranks per shard) / 2 times. Reading is cheap next to decoding; member offsets recorded at ingest
would turn it into ranged reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.storage import Storage
from stages.data.loader import ShardInfo, label_of
from stages.data.tarshards import BadShard, iter_tar_samples
from stages.data.transforms import decode_eval, decode_sample

__all__ = ["ShardSlice", "split_samples", "iter_eval_batches"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSlice:
    """Samples ``start`` (inclusive) to ``stop`` (exclusive) of a shard, by position in the tar."""

    shard: ShardInfo
    start: int
    stop: int


def split_samples(shards: Sequence[ShardInfo], part: int, parts: int) -> list[ShardSlice]:
    """Part ``part`` of ``parts`` contiguous, equal shares of the samples (sizes differ by at most one),
    counted across the shards in order by their manifest counts. Every sample is in exactly one part."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} out of range for {parts} parts")
    total = sum(s.samples for s in shards)
    lo, hi = total * part // parts, total * (part + 1) // parts
    slices, offset = [], 0
    for shard in shards:
        start, stop = max(lo, offset), min(hi, offset + shard.samples)
        if start < stop:
            slices.append(ShardSlice(shard, start - offset, stop - offset))
        offset += shard.samples
    return slices


def iter_eval_batches(storage: Storage, shards: Sequence[ShardInfo | ShardSlice], batch_size: int, image_size: int,
                      class_names: Sequence[str] | None = None, crop_fraction: float = 1.0,
                      skipped: list[dict[str, str]] | None = None) -> Iterator[dict[str, Any]]:
    """Batches ``{"image": (B, S, S, 3) uint8, "label": (B,) int64, "key": [B]}``; the last may be short.

    ``shards`` are whole shards or slices of them. Unreadable samples are appended to ``skipped``
    (``{"key", "reason"}``) when a list is given; samples a truncated shard lacks are reported by
    one record per slice.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    class_index = {name: i for i, name in enumerate(class_names)} if class_names else None
    images: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []

    def flush() -> dict[str, Any]:
        batch = {"image": torch.from_numpy(np.stack(images)), "label": torch.tensor(labels, dtype=torch.int64),
                 "key": list(keys)}
        images.clear(), labels.clear(), keys.clear()
        return batch

    def skip(key: str, reason: str) -> None:
        log.warning("skipped sample %s: %s", key, reason)
        if skipped is not None:
            skipped.append({"key": key, "reason": reason})

    for part in shards:
        piece = part if isinstance(part, ShardSlice) else ShardSlice(part, 0, part.samples)
        info, position = piece.shard, 0  # samples read from the tar so far
        try:
            with storage.open_read(info.path) as f:
                for key, files in iter_tar_samples(f, name=info.path):
                    position += 1
                    if position <= piece.start:
                        continue  # another part's sample: skipped without decoding
                    try:
                        label = label_of(files, class_index)
                        pixels = decode_sample(files, lambda data: decode_eval(data, image_size, crop_fraction))
                    except ValueError as err:
                        skip(key, " ".join(str(err).split()))
                    else:
                        images.append(pixels)
                        labels.append(label)
                        keys.append(key)
                        if len(keys) == batch_size:
                            yield flush()
                    if position == piece.stop:
                        break
        except BadShard as err:
            first = max(position, piece.start)
            skip(f"{info.path}#{first}", f"{piece.stop - first} samples unreadable: {err}")
            position = piece.stop  # the rest is reported by this one record
        if position < piece.stop:
            first = max(position, piece.start)
            skip(f"{info.path}#{first}", f"{piece.stop - first} samples missing (truncated shard)")
    if keys:
        yield flush()
