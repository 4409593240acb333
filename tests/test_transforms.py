"""Decode + augment: crop geometry, draft-mode JPEG decoding, normalisation."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from stages.data.transforms import (
    center_crop_box,
    decode_eval,
    decode_sample,
    decode_train,
    random_resized_crop_box,
    to_model_input,
)


def test_random_resized_crop_box_stays_inside_and_respects_scale():
    rng = random.Random(0)
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(500, 375, rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.08 * 500 * 375 * 0.9 <= w * h <= 500 * 375
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05 or w == 500 or h == 375
    a = [random_resized_crop_box(64, 64, random.Random(7)) for _ in range(2)]
    assert a[0] == a[1]
    assert center_crop_box(500, 375) == (62, 0, 375, 375)
    assert center_crop_box(100, 100, 0.875) == (6, 6, 88, 88)


def _smooth_jpeg(w=480, h=360) -> bytes:
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 255 // (w + h)], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_draft_decode_gives_the_same_crop_as_a_full_decode():
    data = _smooth_jpeg()
    fast = decode_train(data, 32, random.Random(3))
    # The same crop from a full-resolution decode (the box and flip come from the same rng draws).
    rng = random.Random(3)
    box_rng, flip = random.Random(rng.random()), rng.random() < 0.5
    left, top, w, h = random_resized_crop_box(480, 360, box_rng)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BILINEAR, box=(left, top, left + w, top + h))
    if flip:
        full = full.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    diff = np.abs(fast.astype(int) - np.asarray(full).astype(int))
    assert fast.shape == (32, 32, 3) and diff.mean() < 4, diff.mean()


@pytest.mark.parametrize("size", [24, 224])  # 24: PIL's draft decode; 224: torchvision (a 360 px crop < 2 x 224)
def test_eval_decode_is_deterministic_and_exif_aware(size):
    data = _smooth_jpeg()
    assert np.array_equal(decode_eval(data, size), decode_eval(data, size))
    im = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=95, exif=exif.tobytes())
    rotated = decode_eval(out.getvalue(), size)
    upright = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)  # 360 x 480
    assert upright.size == (360, 480)
    expected = np.asarray(upright.resize((size, size), Image.BILINEAR, box=(0, 60, 360, 420)))
    assert rotated.shape == (size, size, 3) and rotated.dtype == np.uint8
    assert np.abs(rotated.astype(int) - expected.astype(int)).mean() < 4


def test_torchvision_route_matches_pils_crop_and_leaves_damaged_files_to_pil():
    from stages.data import transforms

    data = _smooth_jpeg()
    for seed in range(5):
        fast = decode_train(data, 224, random.Random(seed), (0.5, 1.0))  # crops of 180-360 px: torchvision
        rng = random.Random(seed)
        box_rng, flip = random.Random(rng.random()), rng.random() < 0.5
        left, top, w, h = random_resized_crop_box(480, 360, box_rng, (0.5, 1.0))
        assert min(w, h) < 2 * 224
        full = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.BILINEAR,
                                                                    box=(left, top, left + w, top + h))
        if flip:
            full = full.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert np.abs(fast.astype(int) - np.asarray(full).astype(int)).mean() < 2
    assert transforms._decode_jpeg_crop(data, (0, 0, 360, 360), 224, False) is not None  # the route is taken
    truncated = data[: len(data) // 3]
    assert transforms._decode_jpeg_crop(b"\xff\xd8garbage", (0, 0, 10, 10), 8, False) is None
    with pytest.raises(ValueError, match="corrupt or truncated image"):
        decode_sample({"jpg": truncated}, lambda b: decode_eval(b, 224))


def test_model_input_is_normalised_on_the_device_from_uint8():
    x = torch.randint(0, 256, (2, 5, 5, 3), dtype=torch.uint8)
    ref = (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    y = to_model_input(x, torch.device("cpu"))
    assert y.shape == (2, 3, 5, 5) and y.is_contiguous() and y.dtype == torch.float32
    assert torch.allclose(y, ref, atol=1e-6)
    half = to_model_input(x, "cpu", torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), ref, atol=1e-2)
    with pytest.raises(ValueError, match="expected uint8 images"):
        to_model_input(ref)  # already float: the loader must hand over uint8


def test_hflip_off_never_flips_and_keeps_the_same_crops():
    pixels = np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    flips = 0
    for seed in range(20):
        on = decode_train(buf.getvalue(), 16, random.Random(seed), (0.5, 1.0), hflip=True)
        off = decode_train(buf.getvalue(), 16, random.Random(seed), (0.5, 1.0), hflip=False)
        if not np.array_equal(on, off):
            flips += 1
            assert np.array_equal(on, off[:, ::-1])  # the same crop, mirrored
    assert 0 < flips < 20  # with hflip on, about half the draws flip
