"""The benchmarks' shared input, a deterministic corpus of photographic JPEGs, and shared helpers
(page-cache warming, round-robin timing, machine details, the result line).

Images are random crops of scikit-image's bundled colour photographs (only those shipped inside
the package, so nothing is downloaded), scaled to ImageNet-like sizes (about 500x375, some portrait
or square) and saved as JPEG at quality 90. The tree is an ImageFolder (``ROOT/classNN/imgKKKKKK.jpg``,
nothing else under ``ROOT``). Image ``k`` depends only on (seed, k), and a corpus is cached under
``$VITPIPE_BENCH_CACHE`` (default ``~/.cache/vitpipe-bench``) by its parameters, so repeated runs
reuse it.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stages.data.listing import Listing, unique_key_order
from stages.data.sources import ImageFolderSource, SourceItem
from stages.ingest import ShardPlan, plan_shards

__all__ = ["Corpus", "ShardSetup", "build_corpus", "plan_corpus_shards", "warm_page_cache",
           "cpu_busy_before_start", "run_rounds", "summarize", "machine_info", "emit_result", "log", "free_port"]

CORPUS_VERSION = 1  # bump when the generation below changes, so stale caches are not reused

# (width, height) and weight: the common ImageNet train-image shapes.
_SHAPES = (((500, 375), 0.45), ((500, 333), 0.20), ((375, 500), 0.20), ((500, 500), 0.15))


def _photos() -> list[np.ndarray]:
    """Colour photographs bundled with scikit-image (the ones that need a pooch download are left out)."""
    from skimage import data

    left, right, _disparity = data.stereo_motorcycle()
    loaders: list[Callable[[], np.ndarray]] = [
        data.astronaut, data.coffee, data.chelsea, data.rocket, data.hubble_deep_field, data.retina,
        data.immunohistochemistry,
    ]
    return [load() for load in loaders] + [left, right]


@dataclass(frozen=True)
class Corpus:
    root: Path
    images: int
    classes: int
    seed: int
    quality: int
    bytes: int

    def describe(self) -> dict[str, object]:
        info = asdict(self)
        info["root"] = str(self.root)
        info["mean_kb"] = round(self.bytes / max(1, self.images) / 1024, 1)
        return info


def _make_jpeg(photos: list[np.ndarray], rng: np.random.Generator, quality: int) -> bytes:
    """One image: a random crop (50-100% of the largest crop with the target aspect), maybe mirrored,
    resized to a sampled ImageNet-like shape."""
    photo = photos[rng.integers(len(photos))]
    shapes, weights = zip(*_SHAPES)
    width, height = shapes[rng.choice(len(shapes), p=weights)]
    src_h, src_w = photo.shape[:2]
    aspect = width / height
    crop_w = min(src_w, src_h * aspect) * rng.uniform(0.5, 1.0)
    crop_h = crop_w / aspect
    left, top = rng.uniform(0, src_w - crop_w), rng.uniform(0, src_h - crop_h)
    im = Image.fromarray(photo).resize((width, height), Image.BICUBIC,
                                       box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _cache_root() -> Path:
    return Path(os.environ.get("VITPIPE_BENCH_CACHE", Path.home() / ".cache" / "vitpipe-bench"))


def build_corpus(images: int, classes: int = 10, seed: int = 0, quality: int = 90) -> Corpus:
    """The corpus for these parameters, generated on first use (atomically: into a temporary folder
    that is renamed when complete) and reused afterwards."""
    params = {"version": CORPUS_VERSION, "images": images, "classes": classes, "seed": seed, "quality": quality}
    home = _cache_root() / f"corpus-v{CORPUS_VERSION}-n{images}-c{classes}-s{seed}-q{quality}"
    marker = home / "corpus.json"
    if not marker.exists():
        home.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        photos = _photos()
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=home.parent))
        try:
            total = 0
            for k in range(images):
                folder = tmp / "images" / f"class{k % classes:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                data = _make_jpeg(photos, np.random.default_rng([seed, k]), quality)
                (folder / f"img{k:06d}.jpg").write_bytes(data)
                total += len(data)
            (tmp / "corpus.json").write_text(json.dumps({**params, "bytes": total}))
            shutil.rmtree(home, ignore_errors=True)  # an incomplete earlier attempt (no marker)
            tmp.rename(home)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log(f"built corpus {home} ({images} images) in {time.perf_counter() - started:.1f} s")
    total = json.loads(marker.read_text())["bytes"]
    return Corpus(home / "images", images, classes, seed, quality, total)


@dataclass(frozen=True)
class ShardSetup:
    """What our ingest functions need to shard a corpus: the source, its plans and class indices."""

    source: ImageFolderSource
    plans: list[ShardPlan]
    class_index: dict[str, int]

    @property
    def items(self) -> list[SourceItem]:
        return [item for plan in self.plans for item in plan.items]


def plan_corpus_shards(corpus: Corpus, shard_samples: int) -> ShardSetup:
    """Screen and plan the corpus exactly as the ingest stage does (sorted keys, fixed boundaries)."""
    source = ImageFolderSource(str(corpus.root))
    listing = Listing.of_items(source, source.items())
    order, duplicates = unique_key_order(listing)
    skipped = listing.skipped.first(3) + duplicates.first(3)
    if skipped or len(order) != corpus.images:
        raise RuntimeError(f"corpus {corpus.root}: {len(order)} usable images of {corpus.images}; skipped {skipped}")
    names = sorted(listing.codes("label")[1])
    plans = [cut.plan(listing) for cut in plan_shards(listing, order, shard_samples)]
    return ShardSetup(source, plans, {name: i for i, name in enumerate(names)})


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file once so that timings measure CPU work, not the disk."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) CPU time of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, total


def cpu_busy_before_start(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over ``seconds`` before the benchmark starts (None off Linux). Warns
    when other work is running: on a small machine it skews every number, the 2-worker ones most."""
    if not os.path.exists("/proc/stat"):
        return None
    busy0, total0 = _cpu_jiffies()
    time.sleep(seconds)
    busy1, total1 = _cpu_jiffies()
    busy = (busy1 - busy0) / max(1, total1 - total0)
    if busy > 0.1:
        log(f"warning: {busy:.0%} of the CPUs were busy before starting: other processes compete with the benchmark")
    return busy


def run_rounds(phases: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each phase (one timed measurement returning images/s) ``repeats`` times, round-robin,
    so slow drifts in machine speed hit every phase alike. Returns each phase's rates."""
    rates: dict[str, list[float]] = {name: [] for name in phases}
    for _ in range(repeats):
        for name, phase in phases.items():
            rates[name].append(phase())
    return rates


def summarize(rates: dict[str, list[float]]) -> dict[str, float]:
    """The median rate of each phase."""
    return {name: statistics.median(values) for name, values in rates.items()}


def machine_info(cpu_busy: float | None) -> dict[str, object]:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_busy_before_start": None if cpu_busy is None else round(cpu_busy, 3)}


def bench_args(doc: str | None, images: int, quick_shard_samples: int) -> argparse.Namespace:
    """The arguments every benchmark takes; ``--quick`` is a 200-image smoke run with 1 repeat."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=images, help="corpus size (default: %(default)s)")
    parser.add_argument("--shard-samples", type=int, default=200, help="images per shard (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of each measurement (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny smoke run (200 images, {quick_shard_samples} per shard, 1 repeat)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.shard_samples, args.repeats = 200, quick_shard_samples, 1
    return args


def free_port() -> int:
    """A free TCP port on loopback (for a local server the bench starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(bucket: str) -> tuple[Any, str, Any]:
    """moto's S3 server on a free loopback port with ``bucket`` made: (server, endpoint, client).
    Sets moto's credentials in the environment (Ray's workers inherit them); stop the server after."""
    import boto3
    from moto.server import ThreadedMotoServer

    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server: a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    return server, endpoint, s3


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit_result(result: dict[str, object]) -> None:
    """Write the result to ``bench/out/<name>.json`` and print it as the one JSON line on stdout."""
    out_dir = Path(__file__).resolve().parent / "out"
    out_dir.mkdir(exist_ok=True)
    line = json.dumps(result, sort_keys=False)
    (out_dir / f"{result['name']}.json").write_text(line + "\n")
    print(line, flush=True)
