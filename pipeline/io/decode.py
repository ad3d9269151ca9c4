"""Safe image decoding: untrusted bytes -> RGB uint8 (S, S, 3) at the model's input size, or a DecodeError.

Every problem with a sample's bytes (empty, not an image, truncated, corrupt, too many pixels) becomes a
``DecodeError`` whose message says what is wrong; the caller turns it into an errors/ row with stage
"decode". Pillow is never configured globally: no ``LOAD_TRUNCATED_IMAGES``, no change to
``Image.MAX_IMAGE_PIXELS``. The pixel limit is checked from the header, before any pixel is decoded.

The resize is exactly open_clip's eval preprocess (torchvision ``Resize(S, BICUBIC)`` on a PIL image, then
``CenterCrop(S)``), so ``pixels / 255`` normalised with the model's mean/std equals open_clip's
``preprocess(image)``. Two documented departures, both for speed or safety, never for normal photos:
JPEG draft mode (DCT-domain downscaling, never below twice the target size), and a
crop-first resize for extreme aspect ratios (see ``resize_center_crop``).
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

# We enforce DecodeConfig.max_pixels ourselves from the header, before loading, so PIL's warning for images
# between MAX_IMAGE_PIXELS and twice that is redundant noise on stderr. (PIL's own hard error above twice
# its limit still fires inside Image.open and is turned into a DecodeError below.)
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Formats a web-scale corpus holds. Pillow parses ~40 formats; the rarely used parsers are where decoder
# vulnerabilities are found, so untrusted bytes only reach the ones listed here.
DEFAULT_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "ICO", "PPM")

# Magic bytes of image formats, so an error can name a format that DecodeConfig.formats excludes (or that
# Pillow cannot read) instead of saying "not an image". Sniffed here rather than by asking every Pillow
# parser, which would expose untrusted bytes to all of them.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xffO\xffQ", "JPEG2000"),
    (b"ftypheic", "HEIC"),
    (b"ftypheix", "HEIC"),
    (b"ftypmif1", "HEIF"),
    (b"ftypavif", "AVIF"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)

# EXIF orientations that rotate by 90 degrees (width and height swap).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)

# Above this many pixels in the resized-but-uncropped image, resize only the part that survives the crop
# (an 1x5000 banner would otherwise become a 224x1,120,000 intermediate image: ~750 MB).
_MAX_INTERMEDIATE_FACTOR = 16


@dataclass
class DecodeConfig:
    image_size: int = 224  # model input side S: output pixels are (S, S, 3)
    max_pixels: int = 89_478_485  # decompression-bomb limit (PIL's default): width*height above it -> DecodeError
    draft_jpeg: bool = True  # JPEG DCT-domain downscaling (short side kept >= 2S) for big JPEGs: 2-5x faster
    formats: tuple[str, ...] = DEFAULT_FORMATS  # Pillow format names accepted; anything else -> DecodeError


class DecodeError(ValueError):
    """The bytes of one sample cannot be turned into an image; the message says why."""


@dataclass
class Decoded:
    pixels: np.ndarray  # uint8 (S, S, 3), RGB, resized and center-cropped like open_clip's preprocess
    width: int  # original decoded width (after EXIF orientation, before any draft/resize)
    height: int  # original decoded height (after EXIF orientation)


def decode_image(data: bytes, cfg: DecodeConfig) -> Decoded:
    """Return the decoded, RGB, resized and center-cropped image in ``data``; raise DecodeError when it is bad.

    Order of checks: empty bytes; format sniffing (header only); pixel limit from the header; full decode
    (truncated or corrupt data fails here, never later); EXIF orientation; RGB conversion; resize and crop.
    ``MemoryError`` is not caught: running out of memory is a worker problem, not a property of the sample.
    """
    if data is None or len(data) == 0:
        raise DecodeError("zero bytes")
    img = _open(data, cfg)
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise DecodeError(f"invalid image size {width}x{height}")
        if width * height > cfg.max_pixels:
            raise DecodeError(
                f"decompression bomb: {width}x{height} = {width * height} pixels > limit {cfg.max_pixels} "
                "(DecodeConfig.max_pixels)"
            )
        fmt = img.format or "image"
        if cfg.draft_jpeg and img.format in ("JPEG", "MPO") and min(width, height) >= 4 * cfg.image_size:
            # Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode whose short side stays >= 2S, so the bicubic
            # resize below still reduces by >= 2x (measured: mean |diff| <= 0.7 grey levels vs a full decode,
            # 2-5x faster on large photos). Must be called before load().
            scale = 2 * cfg.image_size / min(width, height)
            img.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
        try:
            img.load()
        except MemoryError:
            raise
        except Exception as e:  # any failure inside Pillow's decoder is a property of these bytes
            raise DecodeError(_describe_load_error(fmt, e)) from e
        # After load(): PNG keeps its eXIf chunk after the pixel data, so reading it earlier would decode
        # the whole image outside our error handling (and before JPEG draft mode could apply).
        orientation = _orientation(img)
        if orientation != 1:
            ImageOps.exif_transpose(img, in_place=True)
        if orientation in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        try:
            rgb = to_rgb(img)
        except MemoryError:
            raise
        except Exception as e:
            raise DecodeError(f"cannot convert {fmt} mode {img.mode} to RGB: {type(e).__name__}: {e}") from e
        pixels = resize_center_crop(rgb, cfg.image_size)
    finally:
        img.close()
    return Decoded(pixels=pixels, width=width, height=height)


@dataclass
class JpegHeader:
    """What a JPEG's header says, read without decoding a pixel: enough to ship its bytes to the model's device."""

    width: int  # after EXIF orientation (what Decoded.width would say)
    height: int  # after EXIF orientation
    orientation: int  # EXIF orientation 1..8, applied by the device decoder (pipeline.model.device_decode)


@dataclass
class EncodedBatch:
    """One batch as a shard task ships it when JPEGs are decoded on the model's device (``--decode-device cuda``).

    Each sample is either JPEG bytes (decoded by the model actor) or pixels the shard task already decoded on
    its CPU (every image that ``probe_jpeg`` leaves to the CPU path: PNG, WebP, CMYK JPEG, ...).
    """

    size: int  # samples in the batch; positions 0..size-1 follow the keys the batch is submitted with
    max_pixels: int  # DecodeConfig.max_pixels, for the actor's CPU fallback on a JPEG its device cannot decode
    jpeg_at: list[int]  # batch positions of the JPEG samples
    jpegs: list[bytes]  # their encoded bytes
    headers: list[JpegHeader]  # their headers (size and EXIF orientation)
    pixels_at: list[int]  # batch positions of the samples decoded on the CPU
    pixels: np.ndarray  # uint8 (len(pixels_at), S, S, 3)


def probe_jpeg(data: bytes, cfg: DecodeConfig) -> JpegHeader | None:
    """Return the header of a JPEG that a device decoder can take as it is, or None to leave it to ``decode_image``.

    Taken: baseline or progressive JPEG (not MPO), 8-bit RGB/YCbCr or greyscale, within ``cfg.max_pixels``, with
    an aspect ratio that ``resize_center_crop`` resizes whole. Everything else (other formats, CMYK, a bad
    header, a decompression bomb, a 1x5000 banner) returns None: the CPU path decodes it, or writes the error row
    it always wrote. Reads the header and the EXIF block only (the EXIF block of a JPEG precedes its pixel data).
    """
    if not data or not data.startswith(b"\xff\xd8\xff") or "JPEG" not in cfg.formats:
        return None
    try:
        img = _open(data, cfg)
    except DecodeError:
        return None
    try:
        width, height = img.size
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or width <= 0 or height <= 0 \
                or width * height > cfg.max_pixels:
            return None
        short, long = min(width, height), max(width, height)
        if int(cfg.image_size * long / short) > _MAX_INTERMEDIATE_FACTOR * cfg.image_size:
            return None  # the CPU path resamples only the crop of such images; the device path resizes whole ones
        orientation = _orientation(img)
    finally:
        img.close()
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return JpegHeader(width=width, height=height, orientation=orientation)


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB image (alpha composited on white, 16-bit and float data scaled, not clipped).

    - grayscale ("1", "L"), "YCbCr", "CMYK" and palette images: Pillow's conversion;
    - anything with transparency (RGBA, LA, PA, premultiplied RGBa/La, palette or L/RGB with a
      transparency key): composited on a white background, the way a browser shows it on a white page;
    - "I;16*" (16-bit): value / 257, so 65535 -> 255;
    - "I" (32-bit int): treated as 16-bit when all values lie in 0..65535 and some exceed 255, as 8-bit when
      all lie in 0..255, otherwise min-max scaled;
    - "F" (float): x * 255 when values lie in [0, 1], as 8-bit when in [0, 255], otherwise min-max scaled.
    An animated image gives the frame it is on (frame 0 straight after decoding).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if _has_transparency(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Return uint8 (size, size, 3): shortest side -> ``size`` with PIL bicubic, then a center crop.

    Bit-exact with open_clip's eval preprocess (torchvision ``Resize(size, BICUBIC)`` + ``CenterCrop(size)``
    on a PIL image): the same output size rule (long side truncated with ``int``), the same PIL resampling,
    the same crop offsets (``int(round((h - size) / 2))``). For extreme aspect ratios, where the uncropped
    intermediate would exceed 16 * size^2 pixels, only the region that survives the crop is resampled
    (same sampling grid, filter and pass order; equal to the full path but for float rounding: on
    pure noise, a few pixels differ by 1-2 grey levels).
    """
    if img.mode != "RGB":
        img = to_rgb(img)
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    if new_w * new_h <= _MAX_INTERMEDIATE_FACTOR * size * size:
        # torchvision returns the image unchanged when it already has the target size; PIL's resize to the
        # same size is an identity copy too, so no special case is needed.
        resized = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        out = resized.crop((left, top, left + size, top + size))
    else:
        out = _resize_crop_region(img, (new_w, new_h), (left, top), size)
    return np.array(out, dtype=np.uint8)


def _resize_crop_region(img: Image.Image, new_size: tuple[int, int], offset: tuple[int, int], size: int) -> Image.Image:
    """Return the (size x size) crop at ``offset`` of ``img`` resized to ``new_size``, resampling only that crop.

    Two explicit one-axis passes, horizontal then vertical, as PIL's full resize does them: each pass uses the
    same sampling positions and filter taps as the full resize, restricted to the rows/columns the crop needs.
    (A single ``resize(box=...)`` call is not equivalent: PIL then picks the vertical pass first, and the
    intermediate rounding differs by up to ~20 grey levels on noise.)
    """
    w, h = img.size
    new_w, new_h = new_size
    left, top = offset
    sx, sy = w / new_w, h / new_h
    x0, x1 = left * sx, (left + size) * sx
    y0, y1 = top * sy, (top + size) * sy
    # Source rows the vertical pass reads: bicubic support is 2 output pixels, i.e. 2 * max(sy, 1) source rows.
    margin = 2.0 * max(sy, 1.0) + 2.0
    r0, r1 = max(0, math.floor(y0 - margin)), min(h, math.ceil(y1 + margin))
    rows = img.crop((0, r0, w, r1))
    horizontal = rows.resize((size, r1 - r0), Image.Resampling.BICUBIC, box=(x0, 0, x1, r1 - r0))
    return horizontal.resize((size, size), Image.Resampling.BICUBIC, box=(0, y0 - r0, size, y1 - r0))


def _open(data: bytes, cfg: DecodeConfig) -> Image.Image:
    """Return the image in ``data`` opened lazily (header parsed, no pixels decoded yet)."""
    Image.init()
    formats = [f for f in cfg.formats if f in Image.OPEN]
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e} (DecodeConfig.max_pixels={cfg.max_pixels})") from e
    except UnidentifiedImageError as e:
        raise DecodeError(_describe_unidentified(data, formats)) from e
    except MemoryError:
        raise
    except Exception as e:  # a plugin that recognised its magic bytes but choked on the header
        raise DecodeError(f"corrupt image header: {type(e).__name__}: {e}") from e


def _describe_unidentified(data: bytes, allowed: list[str]) -> str:
    """Return why no allowed decoder accepted ``data``: a known non-image, an excluded format, or unknown."""
    head = data[:64].lstrip().lower()
    start = data[:16]
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return f"not an image: an HTML page (starts with {start!r})"
    if head.startswith((b"<?xml", b"<svg")):
        return f"not an image: XML/SVG text, vector images are not supported (starts with {start!r})"
    if head.startswith((b"{", b"[")):
        return f"not an image: JSON/text (starts with {start!r})"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        sniffed = "WEBP"
    else:
        sniffed = next((name for magic, name in _MAGIC
                        if data.startswith(magic) or (magic.startswith(b"ftyp") and data[4:12] == magic)), None)
    if sniffed is not None and sniffed not in allowed:
        return f"unsupported image format {sniffed} (allowed: {', '.join(allowed)}; see DecodeConfig.formats)"
    if sniffed is not None:
        return f"corrupt {sniffed} header: the decoder does not accept it (starts with {start!r})"
    return f"not an image: no decoder recognises it (starts with {start!r}, {len(data)} bytes)"


def _describe_load_error(fmt: str, e: Exception) -> str:
    """Return a message for a failure while decoding pixels: truncated or corrupt data of format ``fmt``."""
    text = str(e)
    if isinstance(e, Image.DecompressionBombError):  # e.g. a GIF frame far larger than its header said
        return f"decompression bomb: {text}"
    if isinstance(e, EOFError) or "truncated" in text.lower() or "premature end" in text.lower():
        return f"truncated {fmt} data ({type(e).__name__}: {text})"
    return f"corrupt {fmt} data ({type(e).__name__}: {text})"


def _orientation(img: Image.Image) -> int:
    """Return the EXIF orientation tag (1..8) of ``img``, 1 when absent or unreadable.

    Web images often carry damaged EXIF blocks; their pixels are still good, so an unreadable block means
    "no rotation" (logged) rather than a lost sample.
    """
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as e:  # noqa: BLE001 - damaged metadata does not make the pixels bad
        log.warning("ignoring unreadable EXIF block (%s: %s); image used as stored", type(e).__name__, e)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _has_transparency(img: Image.Image) -> bool:
    """Return True when ``img`` has an alpha channel, an alpha palette or a transparency key."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    return img.has_transparency_data


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Return ``arr`` (16-bit, 32-bit int or float grey values) scaled into uint8 without clipping data."""
    x = arr.astype(np.float64)
    if mode.startswith("I;16"):
        y = x / 257.0
    else:
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            y = x * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            y = x
        elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
            y = x / 257.0
        elif hi > lo:
            y = (x - lo) * (255.0 / (hi - lo))
        else:
            y = np.zeros_like(x)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)
