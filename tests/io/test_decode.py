"""Safe decoding: the whole bad-input zoo, bit-exactness with open_clip's preprocess, and every colour-mode path."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

import pipeline.io.decode as decode_module
from pipeline.io.decode import DecodeConfig, DecodeError, decode_image, resize_center_crop, to_rgb
from zoo import encode, make_photo_like, zoo_cases

CASES = zoo_cases()
# Pytest resets warning filters per test; PIL warns (harmlessly) before our own pixel check refuses the image.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.mark.parametrize("name", sorted(CASES))
def test_zoo_case_outcome(name):
    case = CASES[name]
    if case.embeds:
        out = decode_image(case.data, DecodeConfig(image_size=64))
        assert (out.width, out.height) == case.size
        assert out.pixels.shape == (64, 64, 3) and out.pixels.dtype == np.uint8
        assert out.pixels.flags.c_contiguous and out.pixels.flags.writeable
    else:
        with pytest.raises(DecodeError) as e:
            decode_image(case.data, DecodeConfig(image_size=64))
        assert case.error_contains in str(e.value), str(e.value)


def test_zoo_covers_the_brief():
    must = {"jpeg_truncated", "png_truncated", "zero_bytes", "html_as_jpg", "one_by_one", "png_bomb_20000",
            "jpeg_cmyk", "png_16bit", "gif_animated", "webp_animated", "jpeg_exif_rotated", "png_rgba",
            "png_palette_transparent"}
    assert must <= set(CASES)
    assert len(CASES["png_bomb_20000"].data) < 200_000  # the bomb is cheap to hold; decoding it would not be


def test_error_messages_say_what_is_wrong():
    cfg = DecodeConfig()
    msg = lambda data: str(pytest.raises(DecodeError, decode_image, data, cfg).value)  # noqa: E731
    assert "truncated JPEG" in msg(CASES["jpeg_truncated"].data)
    assert "truncated PNG" in msg(CASES["png_truncated"].data)
    assert "HTML" in msg(CASES["html_as_jpg"].data) and "<!DOCTYPE" in msg(CASES["html_as_jpg"].data)
    assert "10000x10000" in msg(CASES["png_bomb_10000"].data)
    assert "max_pixels" in msg(CASES["png_bomb_20000"].data)
    jpeg = CASES["jpeg_ok"].data
    only_png = DecodeConfig(formats=("PNG",))
    assert "unsupported image format JPEG" in str(pytest.raises(DecodeError, decode_image, jpeg, only_png).value)


def test_pixel_limit_is_the_configured_one_and_checked_before_decoding():
    img = encode(Image.new("RGB", (50, 40), (1, 2, 3)), "png")
    assert decode_image(img, DecodeConfig(max_pixels=2000)).width == 50
    with pytest.raises(DecodeError, match="decompression bomb: 50x40 = 2000 pixels > limit 1999"):
        decode_image(img, DecodeConfig(max_pixels=1999))
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # PIL's global is never touched


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (225, 224), (640, 481), (5, 3), (1, 1),
                                  (223, 500), (97, 1001)])
def test_resize_center_crop_equals_open_clip_preprocess(size):
    from open_clip.transform import image_transform

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    preprocess = image_transform(224, is_train=False, mean=mean, std=std)
    img = make_photo_like(np.random.default_rng(size[0] * 7 + size[1]), *size)
    want = preprocess(img).numpy()
    got = resize_center_crop(img, 224).astype(np.float32) / 255.0
    got = ((got - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-6


def test_decode_image_equals_open_clip_on_a_png():
    from open_clip.transform import image_transform

    img = make_photo_like(np.random.default_rng(3), 333, 250, complexity=0.9)
    want = image_transform(224, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))(img).numpy()
    got = decode_image(encode(img, "png"), DecodeConfig()).pixels.astype(np.float32).transpose(2, 0, 1) / 255
    assert np.abs(got - want).max() < 1e-6


def test_extreme_aspect_ratio_crops_before_resizing(monkeypatch):
    rng = np.random.default_rng(4)
    for w, h in [(3000, 20), (20, 3000), (1000, 37)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        cropped_first = resize_center_crop(img, 224)
        monkeypatch.setattr(decode_module, "_MAX_INTERMEDIATE_FACTOR", 10**9)
        full = resize_center_crop(img, 224)  # the open_clip path, with its 224 x 33600 intermediate
        monkeypatch.undo()
        assert cropped_first.shape == (224, 224, 3)
        diff = np.abs(cropped_first.astype(int) - full)
        assert diff.max() <= 2 and diff.mean() < 0.01, (w, h, diff.max(), diff.mean())


def test_jpeg_draft_mode_is_close_and_keeps_the_original_size():
    img = make_photo_like(np.random.default_rng(5), 1200, 1000, complexity=0.5)
    data = encode(img, "jpg")
    fast = decode_image(data, DecodeConfig(draft_jpeg=True))
    exact = decode_image(data, DecodeConfig(draft_jpeg=False))
    assert (fast.width, fast.height) == (exact.width, exact.height) == (1200, 1000)
    diff = np.abs(fast.pixels.astype(int) - exact.pixels)
    assert 0 < diff.mean() < 1.0  # draft mode did run (not bit-identical), and changed almost nothing


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (90, 60), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 20))  # red block in the stored top-left corner
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(stored, "png", exif=exif)
        out = decode_image(data, DecodeConfig(image_size=60))
        want_w, want_h = (60, 90) if orientation in (5, 6, 7, 8) else (90, 60)
        assert (out.width, out.height) == (want_w, want_h), orientation
        reference = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        assert np.array_equal(out.pixels, resize_center_crop(reference.convert("RGB"), 60)), orientation
    # orientation 6 (camera held upright, 90 degrees clockwise): the stored top-left lands top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(stored, "png", exif=exif), DecodeConfig(image_size=60))
    assert out.pixels[2, 57].tolist() == [255, 0, 0] and out.pixels[2, 2].tolist() == [0, 0, 255]


def test_alpha_is_composited_on_white():
    rgba = decode_image(CASES["png_rgba"].data, DecodeConfig(image_size=32)).pixels
    assert rgba[16, 4].tolist() == [255, 255, 255]  # transparent (stored blue) half shows white, not blue
    assert rgba[16, 28].tolist() == [255, 0, 0]
    pal = decode_image(CASES["png_palette_transparent"].data, DecodeConfig(image_size=20)).pixels
    assert pal[10, 2].tolist() == [255, 255, 255] and pal[10, 17].tolist() == [255, 0, 0]
    half = Image.new("LA", (4, 4), (0, 128))  # black at 50% alpha over white -> mid grey
    assert to_rgb(half).getpixel((1, 1)) in ((127, 127, 127), (128, 128, 128))
    premultiplied = Image.new("RGBA", (4, 4), (0, 0, 0, 0)).convert("RGBa")
    assert to_rgb(premultiplied).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_and_float_modes_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None, :].repeat(4, 0)
    img16 = Image.fromarray(ramp)
    assert img16.mode == "I;16"
    row = np.asarray(to_rgb(img16))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 1  # clipping would give 255 from x=1 on
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200
    big_endian = Image.frombytes("I;16B", (256, 4), ramp.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(big_endian)), np.asarray(to_rgb(img16)))
    as_i = Image.fromarray(ramp.astype(np.int32))
    assert as_i.mode == "I" and np.array_equal(np.asarray(to_rgb(as_i)), np.asarray(to_rgb(img16)))
    as_f = Image.fromarray((ramp / 65535.0).astype(np.float32))
    assert as_f.mode == "F" and np.abs(np.asarray(to_rgb(as_f)).astype(int) - np.asarray(to_rgb(img16))).max() <= 1
    # via a real 16-bit PNG file
    out = decode_image(CASES["png_16bit"].data, DecodeConfig(image_size=16)).pixels[:, :, 0]
    assert abs(float(out.mean()) - 127.5) < 3 and out.max() - out.min() > 50  # the middle of the ramp


def test_colour_modes_become_rgb():
    assert decode_image(CASES["jpeg_cmyk"].data, DecodeConfig(image_size=8)).pixels[4, 4].tolist() == [255, 0, 0]
    for name in ("gif_animated", "webp_animated"):  # first frame is red; later frames green, blue
        px = decode_image(CASES[name].data, DecodeConfig(image_size=8)).pixels[4, 4].astype(int)
        assert px[0] > 240 and px[1] < 15 and px[2] < 15, (name, px)
    for mode in ("1", "L", "P", "YCbCr", "CMYK", "RGBA", "LA", "PA"):
        img = Image.new("RGB", (6, 5), (200, 100, 50)).convert(mode)
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (6, 5), mode
