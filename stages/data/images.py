"""Image checks and conversions shared by ingestion and loading.

Ingestion must tell a bad file (zero bytes, truncated, not an image, an unsupported format) from an
odd but valid one (grayscale, CMYK, palette, alpha, 16-bit, EXIF-rotated), skip the first with a
reason and convert the second correctly.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BadImage", "ALLOWED_FORMATS", "EXTENSION_OF", "IMAGE_EXTENSIONS", "image_member", "check_image",
           "open_image", "to_rgb", "reencode"]

# The one table of image formats: what ingest accepts, the shard member extension each format is
# written under when copied, and (below) every extension a reader takes as the sample's image.
EXTENSION_OF = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}
ALLOWED_FORMATS = frozenset(EXTENSION_OF)
# Member extensions (and file-name suffixes, without the dot) read as images, in order of preference:
# ours, plus the spellings other tools write (img2dataset's .jpeg, .tif).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif")
assert set(EXTENSION_OF.values()) <= set(IMAGE_EXTENSIONS)

# Decompression-bomb guard: larger images are rejected rather than exhausting memory.
Image.MAX_IMAGE_PIXELS = 200_000_000


class BadImage(ValueError):
    """An input that is not a usable image; the message is the recorded skip reason."""


def image_member(files: dict[str, bytes]) -> bytes:
    """The image of a webdataset sample (``KEY.jpg``, ``KEY.png``, ...), or ``ValueError`` naming its members."""
    for ext in IMAGE_EXTENSIONS:
        if ext in files:
            return files[ext]
    raise ValueError(f"no image member (has: {', '.join(sorted(files))})")


def open_image(data: bytes) -> Image.Image:
    """Open (lazily) or raise :class:`BadImage` with the reason."""
    if not data:
        raise BadImage("zero-byte file")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"image too large: {err}") from None


def check_image(data: bytes) -> tuple[int, int, str]:
    """Decode ``data`` to the end; return (width, height, format) or raise :class:`BadImage`.

    JPEGs decode at 1/8 scale (draft mode): every byte of the entropy-coded data is still read,
    so truncation and corruption are caught as by a full decode, in about half the time.
    """
    im = open_image(data)
    with im:
        fmt = im.format or "?"
        if fmt not in ALLOWED_FORMATS:
            raise BadImage(f"unsupported format {fmt}")
        width, height = im.size
        try:
            if fmt == "JPEG":
                im.draft(im.mode if im.mode in ("RGB", "L") else None, (max(1, width // 8), max(1, height // 8)))
            im.load()  # decodes every byte: truncation and corruption show up here
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImage(f"corrupt or truncated image: {err}") from None
    if width < 1 or height < 1:
        raise BadImage("empty image (0 pixels)")
    return width, height, fmt


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB view of any supported image, upright (EXIF orientation applied).

    Alpha is composited onto white (the usual convention for photos with transparency); 16-bit
    and 32-bit grayscale are rescaled from their real range instead of being clipped.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        im = im.convert("F") if im.mode != "F" else im
        lo, hi = im.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = im.point(lambda v: (v - lo) * scale).convert("L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, RGBA (after compositing)
    return im


def reencode(data: bytes, max_side: int, quality: int) -> tuple[bytes, tuple[int, int]]:
    """Upright RGB JPEG with the shorter side at most ``max_side``; returns (bytes, (w, h))."""
    with open_image(data) as im:
        rgb = to_rgb(im)
    width, height = rgb.size
    short = min(width, height)
    if short > max_side:
        factor = max_side / short
        rgb = rgb.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality, optimize=False)
    return out.getvalue(), rgb.size
