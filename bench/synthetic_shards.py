"""Synthetic, learnable webdataset shards made on the spot (for ``bench/gpu_check.py``).

Every image is a field of stripes in a class-specific colour, orientation and stripe period, with
a random phase, small per-image jitter of hue and angle, and Gaussian pixel noise:

    wave(x, y) = 1/2 + 1/2 sin(2 pi (x cos a + y sin a) / period + phase)
    image      = wave * foreground(hue) + (1 - wave) * background(hue) + noise

so a ViT learns the classes within a few dozen steps (the colour alone is linearly separable from
the patch embeddings), which is what lets a short GPU check assert that the loss falls. The cues
survive the trainer's augmentation: random-resized crops keep colour and orientation, and the
check turns horizontal flips off (a flip would mirror the orientation onto another class's).

Sample ``k`` is class ``k % classes`` and depends only on (seed, k), stored as JPEG
(``KEY.jpg`` + ``KEY.cls``) in ``train-NNNNNN.tar`` shards written with the project's own
:class:`~stages.data.tarshards.ShardTarWriter`, so they are what an ingest stage writes and what
plain ``webdataset`` reads. A ``classes.json`` beside them names the classes (the ingest stage's
``webdataset`` source reads it). Shards are written in parallel, one process per shard at a time,
into a temporary folder renamed when complete; ``shards.json`` records the parameters and the
sample counts, and a later call with the same parameters reuses the folder.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stages.data.loader import ShardInfo
from stages.data.tarshards import ShardTarWriter

__all__ = ["ShardSpec", "ShardSet", "render_sample", "load_shards", "ensure_shards", "MARKER", "CLASSES_FILE"]

log = logging.getLogger("gpu_check.shards")

VERSION = 1  # bump when the images below change, so that cached shards are regenerated
MARKER = "shards.json"
CLASSES_FILE = "classes.json"
_GOLDEN = (math.sqrt(5) - 1) / 2  # spreads class angles and periods evenly without repeats


@dataclass(frozen=True)
class ShardSpec:
    """What a shard set is made of; equal specs give byte-identical shards."""

    images: int
    classes: int
    image_size: int  # stored size (square); the trainer's random-resized crop rescales it
    shard_samples: int
    seed: int = 0
    quality: int = 90

    def __post_init__(self) -> None:
        if min(self.images, self.classes, self.shard_samples) < 1 or self.image_size < 8:
            raise ValueError(f"need images, classes, shard_samples >= 1 and image_size >= 8, got {self}")

    @property
    def shards(self) -> int:
        return -(-self.images // self.shard_samples)


@dataclass(frozen=True)
class ShardSet:
    root: Path  # the folder holding the .tar files (a webdataset source path)
    shards: tuple[ShardInfo, ...]  # paths relative to root's parent: shards/train-000000.tar
    classes: tuple[str, ...]
    bytes: int
    seconds: float  # generation time; 0 when reused from the cache
    cached: bool


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255.0


def render_sample(index: int, spec: ShardSpec) -> tuple[bytes, int]:
    """(JPEG bytes, class) of sample ``index``: a pure function of (spec, index)."""
    rng = np.random.default_rng([spec.seed, index])
    label = index % spec.classes
    size = spec.image_size
    # 1. The class's cues: hue, stripe angle in [0, pi) and period in [0.08, 0.2] of the side.
    hue = label / spec.classes + rng.normal(0.0, 0.015)
    angle = math.pi * ((label * _GOLDEN) % 1.0) + rng.normal(0.0, 0.05)
    period = size * (0.08 + 0.12 * ((label * _GOLDEN * _GOLDEN) % 1.0))
    # 2. The stripes, at a random phase: (size, size) in [0, 1].
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period
                              + rng.uniform(0, 2 * math.pi))
    # 3. Colours: a bright foreground and a dark, desaturated background of the same hue.
    fg = _rgb(hue, rng.uniform(0.6, 0.9), rng.uniform(0.8, 1.0))
    bg = _rgb(hue + 0.5, rng.uniform(0.2, 0.4), rng.uniform(0.15, 0.35))
    pixels = wave[..., None] * fg + (1.0 - wave[..., None]) * bg  # (size, size, 3)
    pixels += rng.normal(0.0, 10.0, pixels.shape).astype(np.float32)  # sensor-like noise
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=spec.quality)
    return out.getvalue(), label


def _write_shard(job: tuple[int, ShardSpec, str]) -> tuple[str, int, int]:
    """One shard (runs in a pool worker): (file name, samples, bytes)."""
    shard, spec, folder = job
    name = f"train-{shard:06d}.tar"
    first = shard * spec.shard_samples
    indices = range(first, min(first + spec.shard_samples, spec.images))
    path = Path(folder) / name
    with open(path, "wb") as f, ShardTarWriter(f) as tar:
        for k in indices:
            data, label = render_sample(k, spec)
            tar.write(f"s{k:08d}", {"jpg": data, "cls": str(label).encode()})
    return name, len(indices), path.stat().st_size


def load_shards(root: Path, spec: ShardSpec) -> ShardSet | None:
    """The complete shard set of ``spec`` in ``root``, or None (absent, incomplete or of other parameters)."""
    try:
        recorded = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("version") != VERSION or recorded.get("spec") != asdict(spec):
        return None
    prefix = root.name
    shards = tuple(ShardInfo(f"{prefix}/{name}", n) for name, n in recorded["shards"])
    if not all((root.parent / s.path).is_file() for s in shards):
        return None
    return ShardSet(root, shards, tuple(recorded["classes"]), recorded["bytes"], 0.0, True)


def ensure_shards(root: Path, spec: ShardSpec, processes: int | None = None) -> ShardSet:
    """The shard set of ``spec`` in ``root`` (a folder of its own): reused when ``root`` already holds
    it, else (re)generated with ``processes`` workers (default: every CPU)."""
    root = Path(root)
    found = load_shards(root, spec)
    if found is not None:
        log.info("reusing %d synthetic shards in %s", len(found.shards), root)
        return found
    started = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-building-", dir=root.parent))
    try:
        jobs = [(s, spec, str(tmp)) for s in range(spec.shards)]
        workers = max(1, min(processes or os.cpu_count() or 1, len(jobs)))
        if workers == 1:
            written = [_write_shard(job) for job in jobs]
        else:
            # fork: the workers need only numpy and PIL, and start without re-importing the caller
            # (under torchrun that caller has already imported torch).
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                written = pool.map(_write_shard, jobs, chunksize=1)
        classes = [f"class{c:03d}" for c in range(spec.classes)]
        (tmp / CLASSES_FILE).write_text(json.dumps({"classes": classes}))
        total = sum(size for _, _, size in written)
        (tmp / MARKER).write_text(json.dumps({"version": VERSION, "spec": asdict(spec), "classes": classes,
                                              "shards": [[name, n] for name, n, _ in written], "bytes": total}))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the shards from other users' jobs
        shutil.rmtree(root, ignore_errors=True)  # an older or incomplete set
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - started
    made = load_shards(root, spec)
    assert made is not None, "shards just written must read back"
    log.info("made %d synthetic shards (%d images, %.0f MB) in %s in %.1f s with %d process(es)",
             spec.shards, spec.images, total / 1e6, root, seconds, workers)
    return ShardSet(made.root, made.shards, made.classes, made.bytes, seconds, False)
