"""Every sample of some shards exactly once, in order, for evaluation and feature extraction.

The training loader (:class:`~stages.data.loader.ShardLoader`) keeps batch counts equal across
ranks and workers, so it drops remainders; an accuracy needs each test sample counted exactly
once instead. This reader goes through the given shards in order with the eval transform (resize
to the model's resolution, no augmentation), yields a short last batch, and records corrupt or
missing samples as skips with their reason rather than failing the evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError

from pipeline.storage import Storage
from stages.data.loader import IMAGE_EXTS, ShardInfo, label_of
from stages.data.tarshards import BadShard, iter_tar_samples
from stages.data.transforms import decode_eval, normalize

__all__ = ["iter_eval_batches", "split_shards"]

log = logging.getLogger(__name__)


def split_shards(shards: Sequence[ShardInfo], rank: int, world_size: int) -> list[ShardInfo]:
    """Shards of one rank (round-robin): every shard belongs to exactly one rank."""
    return list(shards[rank::world_size])


def _decode(files: dict[str, bytes], image_size: int, crop_fraction: float,
            class_index: dict[str, int] | None) -> tuple[np.ndarray, int]:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if image is None:
        raise ValueError(f"no image member (has: {', '.join(sorted(files))})")
    label = label_of(files, class_index)
    try:
        return decode_eval(image, image_size, crop_fraction), label
    except UnidentifiedImageError:
        raise ValueError("undecodable image (unrecognised format)") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"corrupt or truncated image: {err}") from None


def iter_eval_batches(storage: Storage, shards: Sequence[ShardInfo], batch_size: int, image_size: int,
                      class_names: Sequence[str] | None = None, crop_fraction: float = 1.0,
                      skipped: list[dict[str, str]] | None = None) -> Iterator[dict[str, Any]]:
    """Batches ``{"image": (B, 3, S, S) float32, "label": (B,) int64, "key": [B]}``; the last may be short.

    Unreadable samples are appended to ``skipped`` (``{"key", "reason"}``) when a list is given.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    class_index = {name: i for i, name in enumerate(class_names)} if class_names else None
    images: list[np.ndarray] = []
    labels: list[int] = []
    keys: list[str] = []

    def flush() -> dict[str, Any]:
        batch = {"image": normalize(torch.from_numpy(np.stack(images))),
                 "label": torch.tensor(labels, dtype=torch.int64), "key": list(keys)}
        images.clear(), labels.clear(), keys.clear()
        return batch

    def skip(key: str, reason: str) -> None:
        log.warning("skipped sample %s: %s", key, reason)
        if skipped is not None:
            skipped.append({"key": key, "reason": reason})

    for info in shards:
        seen = 0
        try:
            with storage.open_read(info.path) as f:
                for key, files in iter_tar_samples(f, name=info.path):
                    seen += 1
                    try:
                        pixels, label = _decode(files, image_size, crop_fraction, class_index)
                    except ValueError as err:
                        skip(key, " ".join(str(err).split()))
                        continue
                    images.append(pixels)
                    labels.append(label)
                    keys.append(key)
                    if len(keys) == batch_size:
                        yield flush()
        except BadShard as err:
            skip(f"{info.path}#{seen}", str(err))
            seen = info.samples  # the rest is reported by this one record
        if seen < info.samples:
            skip(f"{info.path}#{seen}", f"{info.samples - seen} samples missing (truncated shard)")
    if keys:
        yield flush()
