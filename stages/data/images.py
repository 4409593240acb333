"""Image checks and conversions shared by ingestion and loading.

Ingestion must tell a bad file (zero bytes, truncated, not an image, an unsupported format) from an
odd but valid one (grayscale, CMYK, palette, alpha, 16-bit, EXIF-rotated), skip the first with a
reason and convert the second correctly.

Three depths of checking (:data:`Validation`, :func:`inspect_image`), each catching more for more
time: ``none`` reads the header (format, size, the pixel limit); ``structure`` also walks the
file's container without decoding pixels — JPEG segments and markers through EOI (so a truncated
file is caught), PNG chunks with their CRCs through IEND, the GIF trailer, the RIFF length of a
WebP, the file size a BMP declares; ``decode`` decodes every pixel (JPEGs at 1/8 scale, which still
reads all their entropy-coded data). The README's table lists which fault each catches (tested).
"""

from __future__ import annotations

import io
import re
import warnings
import zlib
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BadImage", "ALLOWED_FORMATS", "EXTENSION_OF", "IMAGE_EXTENSIONS", "Validation", "image_member",
           "check_image", "inspect_image", "read_header", "open_image", "to_rgb", "reencode"]

Validation = Literal["none", "structure", "decode"]

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
    except (OSError, SyntaxError, ValueError) as err:  # a header PIL cannot parse (e.g. a cut WebP)
        raise BadImage(f"corrupt or truncated image: {err}") from None


def read_header(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) from the header alone, or :class:`BadImage`: not an image, a format
    not in :data:`ALLOWED_FORMATS`, no pixels, or more pixels than the decompression-bomb limit
    (checked here, so that no depth of validation lets one through to the loader)."""
    return _inspect(data, structure=False)


def inspect_image(data: bytes, validate: Validation) -> tuple[int, int, str]:
    """(width, height, format) of ``data`` checked to the depth ``validate`` asks for, or :class:`BadImage`."""
    if validate == "decode":
        return check_image(data)
    return _inspect(data, structure=validate == "structure")


def _inspect(data: bytes, structure: bool) -> tuple[int, int, str]:
    # JPEG and PNG (nearly every photo corpus) are read by the walks below, which find the size on
    # the way; PIL's header parsers cost as much again. Other formats: PIL's header, then a check.
    if data.startswith(b"\xff\xd8\xff"):
        (width, height), fmt = _walk_jpeg(data, to_end=structure), "JPEG"
    elif data.startswith(_PNG_SIGNATURE):
        (width, height), fmt = _walk_png(data, to_end=structure), "PNG"
    else:
        width, height, fmt = _pil_header(data)
        if structure:
            _STRUCTURE_CHECKS.get(fmt, _header_only)(data)
    if width < 1 or height < 1:
        raise BadImage("empty image (0 pixels)")
    if width * height > Image.MAX_IMAGE_PIXELS:
        raise BadImage(f"image too large: {width}x{height} pixels, over the limit of {Image.MAX_IMAGE_PIXELS}")
    return width, height, fmt


def _pil_header(data: bytes) -> tuple[int, int, str]:
    with warnings.catch_warnings():  # PIL warns above its own limit: ours is checked by the caller
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with open_image(data) as im:
            fmt, (width, height) = im.format or "?", im.size
    if fmt not in ALLOWED_FORMATS:
        raise BadImage(f"unsupported format {fmt}")
    return width, height, fmt


def _truncated(what: str) -> BadImage:
    return BadImage(f"corrupt or truncated image: {what}")


# The end of a JPEG scan: 0xFF followed by a byte that is not a stuffed zero, a restart marker
# (RST0-7, which sit inside the scan) or another 0xFF (fill). One search in C per scan.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOFn (not DHT, JPG, DAC)


def _walk_jpeg(raw: bytes, to_end: bool) -> tuple[int, int]:
    """(width, height) from the frame header. ``to_end``: also check that every segment's length
    fits, that the entropy-coded data after each SOS runs to a marker, and that an EOI marker is
    reached (bytes after it are allowed: some writers pad)."""
    n, pos, size = len(raw), 2, None  # after SOI
    while True:
        if pos + 2 > n:
            raise _truncated("JPEG ends before its EOI marker" if size else "JPEG ends before its frame header")
        if raw[pos] != 0xFF:
            raise _truncated(f"JPEG has no marker where one belongs (byte {pos})")
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            if size is None:
                raise BadImage("corrupt image: JPEG without a frame header")
            return size
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers: no length
            pos += 2
            continue
        if pos + 4 > n:
            raise _truncated("JPEG ends inside a segment header")
        length = int.from_bytes(raw[pos + 2:pos + 4], "big")
        if marker in _JPEG_FRAMES and size is None:
            if length < 8 or pos + 9 > n:
                raise _truncated("JPEG frame header is cut short")
            size = int.from_bytes(raw[pos + 7:pos + 9], "big"), int.from_bytes(raw[pos + 5:pos + 7], "big")
            if not to_end:
                return size
        pos += 2 + length
        if length < 2 or pos > n:
            raise _truncated(f"JPEG segment 0xFF{marker:02X} runs past the end of the file")
        if marker == 0xDA:  # SOS: entropy-coded data runs to the next marker
            if size is None:
                raise BadImage("corrupt image: JPEG scan before its frame header")
            found = _SCAN_END.search(raw, pos)
            if found is None:
                raise _truncated("JPEG ends inside its entropy-coded data")
            pos = found.start()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _walk_png(raw: bytes, to_end: bool) -> tuple[int, int]:
    """(width, height) from IHDR, which must come first. ``to_end``: also check every chunk
    through IEND, each with its length inside the file and its CRC matching."""
    data = memoryview(raw)  # CRCs over slices without copying them
    n, pos, size = len(data), len(_PNG_SIGNATURE), None
    while True:
        if pos + 12 > n:
            raise _truncated("PNG ends before its IEND chunk" if size else "PNG ends before its IHDR chunk")
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = bytes(data[pos + 4:pos + 8])
        end = pos + 12 + length
        if size is None:
            if kind != b"IHDR" or length < 13 or end > n:
                raise BadImage("corrupt image: PNG does not start with a whole IHDR chunk")
            size = int.from_bytes(data[pos + 8:pos + 12], "big"), int.from_bytes(data[pos + 12:pos + 16], "big")
            if not to_end:
                return size
        if end > n:
            raise _truncated(f"PNG chunk {kind.decode('latin-1')!r} runs past the end of the file")
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise BadImage(f"corrupt image: PNG chunk {kind.decode('latin-1')!r} fails its CRC")
        if kind == b"IEND":
            return size
        pos = end


def _gif_structure(data: bytes) -> None:
    if data[-1] != 0x3B:  # the trailer
        raise _truncated("GIF does not end with its trailer")


def _webp_structure(data: bytes) -> None:
    declared = int.from_bytes(data[4:8], "little") + 8  # RIFF size counts from byte 8
    if len(data) < declared:
        raise _truncated(f"WebP holds {len(data)} of the {declared} bytes its RIFF header declares")


def _bmp_structure(data: bytes) -> None:
    declared = int.from_bytes(data[2:6], "little")  # 0 from some writers: nothing to check
    if len(data) < declared:
        raise _truncated(f"BMP holds {len(data)} of the {declared} bytes its header declares")


def _header_only(data: bytes) -> None:
    """TIFF: its directories can sit anywhere in the file; only ``decode`` checks past the header."""


_STRUCTURE_CHECKS = {"GIF": _gif_structure, "WEBP": _webp_structure, "BMP": _bmp_structure}


def check_image(data: bytes) -> tuple[int, int, str]:
    """The ``decode`` depth: the header checks, then every pixel decoded; returns (width, height,
    format) or raises :class:`BadImage`.

    JPEGs decode at 1/8 scale (draft mode): every byte of the entropy-coded data is still read,
    so truncation and corruption are caught as by a full decode, in about half the time.
    """
    width, height, fmt = read_header(data)
    with open_image(data) as im:
        try:
            if fmt == "JPEG":
                im.draft(im.mode if im.mode in ("RGB", "L") else None, (max(1, width // 8), max(1, height // 8)))
            im.load()  # decodes every byte: truncation and corruption show up here
        except (OSError, SyntaxError, ValueError) as err:
            raise BadImage(f"corrupt or truncated image: {err}") from None
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
