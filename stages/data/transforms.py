"""Decode + augment one image into uint8 pixels, fast; normalise whole batches on the device.

Training uses Inception-style random-resized-crop + horizontal flip; evaluation resizes the
shorter side and takes a center crop. For JPEGs the crop box is chosen from the header alone,
then the cheaper of two routes decodes it:

- a crop at least twice the output on each side: PIL decodes at the smallest DCT scale (1/2,
  1/4, 1/8) that still gives the crop the output resolution (draft mode) — the same crop, a
  fraction of the decode work (large photos);
- otherwise (ImageNet-sized images, where no DCT scale applies): torchvision's libjpeg-turbo
  decode and its uint8 antialiased bilinear resize of the crop (with it the loader measured
  1.33-1.72x a bare PIL loop, ``bench/loader.py`` in BENCHMARKS.md). A file torchvision cannot
  decode goes the PIL way, which says what is wrong with it.

Both resize with antialiased bilinear filtering; their pixels differ by rounding. Other formats
(PNG, WebP, ...) go through PIL. Randomness comes from a per-sample ``random.Random``, so a
sample's augmentation depends only on (seed, epoch, key), never on which worker decoded it.

Batches stay uint8 (B, H, W, 3) from the decoding worker to the training device: a quarter of
float32's bytes across loader IPC and PCIe. :func:`to_model_input` copies them (from pinned
memory, without blocking the host) and normalises them there.
"""

from __future__ import annotations

import functools
import io
import math
import random
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stages.data.images import image_member, to_rgb

__all__ = ["random_resized_crop_box", "center_crop_box", "decode_train", "decode_eval", "decode_sample",
           "to_model_input", "MEAN", "STD"]

# Inception-style normalisation to [-1, 1], as in the ViT paper's big_vision input pipeline.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop covering ``scale`` of the area with aspect in ``ratio``
    (torchvision's RandomResizedCrop sampling: 10 tries, then the largest centered crop)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, crop_fraction: float = 1.0) -> tuple[int, int, int, int]:
    """The centered square covering ``crop_fraction`` of the shorter side."""
    side = max(1, int(round(min(width, height) * crop_fraction)))
    return (width - side) // 2, (height - side) // 2, side, side


def _decode_box(data: bytes, size: int, pick_box, flip: bool) -> np.ndarray:
    im = Image.open(io.BytesIO(data))
    width, height = im.size
    orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    upright = (height, width) if orientation in _ROTATED else (width, height)
    left, top, w, h = pick_box(*upright)
    if im.format == "JPEG" and min(w, h) < 2 * size:  # no DCT scale would apply
        pixels = _decode_jpeg_crop(data, (left, top, w, h), size, flip)
        if pixels is not None:
            return pixels
    if im.format == "JPEG" and min(w, h) > size:
        # Ask for the smallest decode whose crop still has >= size pixels on each side.
        factor = min(w, h) / size
        want = (math.ceil(width / factor), math.ceil(height / factor))
        im.draft("RGB", want)
    im = to_rgb(im)  # applies EXIF orientation; dims are now upright (possibly reduced)
    sx, sy = im.width / upright[0], im.height / upright[1]
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = im.resize((size, size), Image.BILINEAR, box=box, reducing_gap=None)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, dtype=np.uint8)


def _decode_jpeg_crop(data: bytes, box: tuple[int, int, int, int], size: int, flip: bool) -> np.ndarray | None:
    """The crop ``box`` (left, top, w, h, upright) of a JPEG resized to ``size`` x ``size`` by
    torchvision; None when torchvision cannot decode the file (PIL then tries, and names the fault)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    try:
        # A bytearray: torch wants a writable buffer (a copy of the compressed bytes, ~1% of the work).
        image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                            apply_exif_orientation=True)
    except RuntimeError:
        return None
    left, top, w, h = box
    out = resize(image[:, top:top + h, left:left + w], [size, size], interpolation=InterpolationMode.BILINEAR,
                 antialias=True)
    if flip:
        out = out.flip(-1)
    return out.permute(1, 2, 0).numpy()


def decode_train(data: bytes, size: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
                 hflip: bool = True) -> np.ndarray:
    """(size, size, 3) uint8: random-resized-crop and (with ``hflip``) a coin-flip horizontal flip."""
    box_seed = rng.random()
    flip = rng.random() < 0.5 and hflip  # draw regardless, so hflip never shifts the other draws
    return _decode_box(data, size, lambda w, h: random_resized_crop_box(w, h, random.Random(box_seed), scale), flip)


def decode_eval(data: bytes, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """(size, size, 3) uint8: center crop of ``crop_fraction`` of the shorter side, resized."""
    return _decode_box(data, size, lambda w, h: center_crop_box(w, h, crop_fraction), False)


def decode_sample(files: dict[str, bytes], decode: Callable[[bytes], np.ndarray]) -> np.ndarray:
    """A webdataset sample's image through ``decode``; any reason it cannot be read is a ``ValueError``."""
    data = image_member(files)
    try:
        return decode(data)
    except UnidentifiedImageError:
        raise ValueError("undecodable image (unrecognised format)") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"corrupt or truncated image: {err}") from None


def to_model_input(images: torch.Tensor, device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised (B, 3, H, W) in ``dtype`` on ``device``.

    The copy is issued first, on uint8 (non-blocking: from pinned memory it overlaps with the
    device's queue); the layout change and one fused multiply-add, (x/255 - m)/s =
    x * (1/(255 s)) - m/s, then run on the device in float32 before the cast to ``dtype``.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    x = images.to(device, non_blocking=True) if device is not None else images
    x = x.permute(0, 3, 1, 2).contiguous().to(torch.float32)  # layout change on 1-byte elements
    scale, shift = _normalization(x.device)
    x.mul_(scale).sub_(shift)
    return x if dtype == torch.float32 else x.to(dtype)


@functools.cache
def _normalization(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scale and shift, made once per device (a tensor from Python floats is a blocking copy)."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in STD], device=device).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(MEAN, STD)], device=device).view(1, 3, 1, 1)
    return scale, shift
