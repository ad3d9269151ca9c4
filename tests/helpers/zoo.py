"""Test data made in the test: photo-like images, input shards in every supported layout, and a zoo of bad inputs.

Importable helpers, not tests. Everything is real bytes written by real encoders (Pillow, tarfile, pyarrow);
nothing is mocked. Each zoo case states its expected outcome (``embeds`` or an error message substring), so
unit tests and end-to-end tests assert the same thing:

    for name, case in zoo_cases().items():
        if case.embeds: ... decoded size == case.size
        else: ... error row whose message contains case.error_contains

Keys: tar shards use WebDataset keys (``dir/000001`` for ``dir/000001.jpg``); folder shards use the path
relative to the folder without the extension (``dir/000001`` too); Parquet uses the ``key`` column.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

PIL_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP",
              "tif": "TIFF", "tiff": "TIFF"}


# ----------------------------------------------------------------------------------------------- images


def make_photo_like(rng: np.random.Generator, w: int, h: int, complexity: float | None = None) -> Image.Image:
    """Return an RGB image that compresses and resizes like a photo: a smooth gradient, shapes, texture, noise.

    ``complexity`` in [0, 1] (random when None) sets how many shapes and how much texture and noise there
    are: 0 is a plain product-shot-like gradient, 1 a busy scene.
    """
    c = float(rng.uniform(0, 1)) if complexity is None else float(complexity)
    corners = rng.uniform(0, 255, size=(2, 2, 3))
    ys = np.linspace(0.0, 1.0, h)[:, None, None]
    xs = np.linspace(0.0, 1.0, w)[None, :, None]
    top = corners[0, 0] * (1 - xs) + corners[0, 1] * xs
    bottom = corners[1, 0] * (1 - xs) + corners[1, 1] * xs
    base = top * (1 - ys) + bottom * ys
    if c > 0.3:  # texture: a few sinusoids, stronger for busier images
        for _ in range(int(1 + 4 * c)):
            fx, fy = rng.uniform(1, 20 * c + 1, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            amp = rng.uniform(5, 40 * c)
            base = base + amp * np.sin(2 * np.pi * (fx * xs + fy * ys) + phase)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(1 + 30 * c * c)):
        x0, x1 = sorted(rng.integers(0, max(w, 2), size=2).tolist())
        y0, y1 = sorted(rng.integers(0, max(h, 2), size=2).tolist())
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    if c < 0.5:  # simple images are smooth
        img = img.filter(ImageFilter.GaussianBlur(radius=1 + 2 * (0.5 - c)))
    noise = rng.normal(0.0, 2.0 + 10.0 * c, size=(h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, ext: str = "jpg", **params) -> bytes:
    """Return ``img`` encoded in the format of file extension ``ext`` (jpg, png, webp, gif, bmp, tif)."""
    fmt = PIL_FORMAT[ext.lower()]
    if fmt == "JPEG":
        params.setdefault("quality", 90)
        if img.mode not in ("RGB", "L", "CMYK"):
            img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- shards


@dataclass
class ShardSample:
    key: str  # WebDataset key (may contain '/' for subdirectories)
    image: bytes | None  # encoded image bytes; None writes a key without an image member
    ext: str = "jpg"  # image member / file extension
    caption: str | bytes | None = None  # bytes are written as they are (e.g. non-UTF-8 captions)
    url: str | None = None
    meta: dict = field(default_factory=dict)  # extra .json fields


def make_corpus(rng: np.random.Generator, n: int, exts: tuple[str, ...] = ("jpg", "png", "webp"),
                min_side: int = 48, max_side: int = 160, prefix: str = "") -> list[ShardSample]:
    """Return ``n`` good samples: photo-like images of random sizes in rotating formats, with captions and URLs."""
    samples = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
        ext = exts[i % len(exts)]
        img = make_photo_like(rng, w, h)
        key = f"{prefix}{i:09d}"
        samples.append(ShardSample(key=key, image=encode(img, ext), ext=ext,
                                   caption=f"a photo-like picture number {i}, {w}x{h}",
                                   url=f"https://example.com/images/{key}.{ext}", meta={"width": w, "height": h}))
    return samples


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes
    info.mode = 0o644
    tf.addfile(info, io.BytesIO(data))


def tar_bytes(samples: list[ShardSample]) -> bytes:
    """Return an img2dataset-style WebDataset tar: KEY.<ext> image, KEY.json metadata, KEY.txt caption."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for s in samples:
            members: dict[str, bytes] = {}
            if s.image is not None:
                members[s.ext] = s.image
            meta = {"key": s.key, "url": s.url, "status": "success", "error_message": None, **s.meta}
            if isinstance(s.caption, str):
                meta["caption"] = s.caption
            members["json"] = json.dumps(meta).encode()
            if s.caption is not None:
                members["txt"] = s.caption.encode() if isinstance(s.caption, str) else s.caption
            for ext in sorted(members):  # webdataset's TarWriter writes a sample's fields in sorted order
                _tar_add(tf, f"{s.key}.{ext}", members[ext])
    return buf.getvalue()


def write_tar_shard(path: str | os.PathLike, samples: list[ShardSample]) -> str:
    """Write ``samples`` as an img2dataset-style tar shard at ``path``; return the path."""
    data = tar_bytes(samples)
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def truncated_tar(path: str | os.PathLike, samples: list[ShardSample] | None = None,
                  cut_index: int | None = None) -> list[str]:
    """Write a tar cut in the middle of sample ``cut_index``'s image data; return the keys readable before the cut.

    Default: 6 photo-like samples cut inside the 5th one's image, so 4 complete samples precede the cut.
    """
    if samples is None:
        samples = make_corpus(np.random.default_rng(7), 6, exts=("jpg",))
    if cut_index is None:
        cut_index = len(samples) - 2
    data = tar_bytes(samples)
    target = f"{samples[cut_index].key}.{samples[cut_index].ext}"
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        member = tf.getmember(target)
        cut = member.offset_data + member.size // 2
    with open(path, "wb") as f:
        f.write(data[:cut])
    return [s.key for s in samples[:cut_index]]


def write_parquet_shard(path: str | os.PathLike, samples: list[ShardSample], image_column: str | None = "jpg",
                        hf_struct: bool = False, row_group_size: int | None = None) -> str:
    """Write ``samples`` as a Parquet shard (columns key, caption, url and the image bytes); return the path.

    ``image_column=None`` leaves the image column out (a shard the reader must refuse); ``hf_struct=True``
    stores images the way Hugging Face datasets do: a struct ``{bytes, path}``.
    """
    def caption(c):
        return c.decode("utf-8", errors="replace") if isinstance(c, bytes) else c

    columns: dict[str, pa.Array] = {
        "key": pa.array([s.key for s in samples], pa.string()),
        "caption": pa.array([caption(s.caption) for s in samples], pa.string()),
        "url": pa.array([s.url for s in samples], pa.string()),
    }
    if image_column is not None:
        if hf_struct:
            columns[image_column] = pa.array(
                [None if s.image is None else {"bytes": s.image, "path": f"{s.key}.{s.ext}"} for s in samples],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        else:
            columns[image_column] = pa.array([s.image for s in samples], pa.binary())
    table = pa.table(columns)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def parquet_without_image_column(path: str | os.PathLike, n: int = 3) -> str:
    """Write a Parquet file with metadata columns only (key, caption, url, similarity); return the path."""
    table = pa.table({
        "key": [f"{i:09d}" for i in range(n)],
        "caption": [f"caption {i}" for i in range(n)],
        "url": [f"https://example.com/{i}.jpg" for i in range(n)],
        "similarity": [0.3] * n,
    })
    pq.write_table(table, str(path))
    return str(path)


def write_image_folder(directory: str | os.PathLike, samples: list[ShardSample]) -> list[str]:
    """Write each sample as ``KEY.<ext>`` (+ ``KEY.txt`` caption) under ``directory``; return the folder keys.

    Folder keys are paths relative to ``directory`` without the extension, in the order the reader yields them
    (sorted file names).
    """
    keys = []
    for s in samples:
        rel = f"{s.key}.{s.ext}"
        full = os.path.join(directory, *rel.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if s.image is not None:
            with open(full, "wb") as f:
                f.write(s.image)
            keys.append((rel, s.key))
        if s.caption is not None:
            with open(os.path.join(directory, *f"{s.key}.txt".split("/")), "wb") as f:
                f.write(s.caption.encode() if isinstance(s.caption, str) else s.caption)
    return [key for _, key in sorted(keys)]


# ----------------------------------------------------------------------------------------------- bad input zoo


@dataclass(frozen=True)
class ZooCase:
    data: bytes  # the sample's bytes
    ext: str  # file extension to store it under (an HTML page saved as .jpg keeps "jpg")
    embeds: bool  # True: decodes and embeds; False: becomes an error row
    error_contains: str | None = None  # substring of the DecodeError message when embeds is False
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation when embeds is True
    note: str = ""  # what the case is about


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bilevel_png(width: int, height: int) -> bytes:
    """Return a valid all-black 1-bit PNG of any size, built row by row: a 20000x20000 one is ~50 KB.

    Decoding it fully would take width*height bytes (400 MB for 20000x20000): a decompression bomb. Only
    one row is ever held here, so building it costs ~0.3 s and no memory.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _animated(fmt: str, colours: list[tuple[int, int, int]], size=(40, 30)) -> bytes:
    frames = [Image.new("RGB", size, c) for c in colours]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=80, loop=0)
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _zoo() -> tuple[tuple[str, ZooCase], ...]:
    rng = np.random.default_rng(1234)
    photo = make_photo_like(rng, 96, 64, complexity=0.6)
    jpeg = encode(photo, "jpg")
    png = encode(photo, "png")

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 96x64, shown 64x96
    rotated = encode(photo, "jpg", exif=exif)

    rgba = Image.new("RGBA", (48, 32), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 24, 32))  # left half fully transparent (stored colour: blue)

    palette = Image.new("P", (40, 20), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, 1 red
    palette.paste(1, (20, 0, 40, 20))
    pal_buf = io.BytesIO()
    palette.save(pal_buf, "PNG", transparency=0)  # black (index 0) transparent: left half shows white

    grey16 = Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1)))  # mode I;16

    cmyk = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK

    html = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>"
            b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>\n")

    cases = {
        "jpeg_ok": ZooCase(jpeg, "jpg", True, size=(96, 64), note="plain baseline JPEG"),
        "png_ok": ZooCase(png, "png", True, size=(96, 64), note="plain RGB PNG"),
        "webp_ok": ZooCase(encode(photo, "webp"), "webp", True, size=(96, 64), note="lossy WebP"),
        "jpeg_progressive": ZooCase(encode(photo, "jpg", progressive=True), "jpg", True, size=(96, 64)),
        "jpeg_grayscale": ZooCase(encode(photo.convert("L"), "jpg"), "jpg", True, size=(96, 64)),
        "bmp_ok": ZooCase(encode(photo, "bmp"), "bmp", True, size=(96, 64)),
        "tiff_ok": ZooCase(encode(photo, "tif"), "tif", True, size=(96, 64)),
        "jpeg_truncated": ZooCase(jpeg[: len(jpeg) // 2], "jpg", False, "truncated", note="download cut halfway"),
        "png_truncated": ZooCase(png[: len(png) // 2], "png", False, "truncated"),
        "zero_bytes": ZooCase(b"", "jpg", False, "zero bytes"),
        "html_as_jpg": ZooCase(html, "jpg", False, "not an image", note="an error page saved under .jpg"),
        "svg_as_png": ZooCase(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "png", False,
                              "not an image"),
        "random_bytes": ZooCase(rng.bytes(2048), "jpg", False, "not an image"),
        "one_by_one": ZooCase(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "png"), "png", True, size=(1, 1)),
        "png_bomb_20000": ZooCase(bilevel_png(20000, 20000), "png", False, "decompression bomb",
                                  note="400 Mpx: above PIL's hard limit, refused inside Image.open"),
        "png_bomb_10000": ZooCase(bilevel_png(10000, 10000), "png", False, "decompression bomb",
                                  note="100 Mpx: above DecodeConfig.max_pixels, refused from the header"),
        "jpeg_cmyk": ZooCase(encode(cmyk, "jpg"), "jpg", True, size=(40, 30), note="CMYK JPEG (print workflows)"),
        "png_16bit": ZooCase(encode(grey16, "png"), "png", True, size=(64, 16), note="16-bit greyscale"),
        "gif_animated": ZooCase(_animated("GIF", [(255, 0, 0), (0, 255, 0), (0, 0, 255)]), "gif", True,
                                size=(40, 30), note="first frame (red) is used"),
        "webp_animated": ZooCase(_animated("WEBP", [(255, 0, 0), (0, 255, 0), (0, 0, 255)]), "webp", True,
                                 size=(40, 30), note="first frame (red) is used"),
        "jpeg_exif_rotated": ZooCase(rotated, "jpg", True, size=(64, 96), note="EXIF orientation 6 swaps w/h"),
        "png_rgba": ZooCase(encode(rgba, "png"), "png", True, size=(48, 32), note="alpha composited on white"),
        "png_palette_transparent": ZooCase(pal_buf.getvalue(), "png", True, size=(40, 20),
                                           note="palette with a transparent index"),
    }
    return tuple(cases.items())


def zoo_cases() -> dict[str, ZooCase]:
    """Return every zoo case by name (good edge cases and broken inputs), each with its expected outcome."""
    return dict(_zoo())


def bad_inputs() -> dict[str, bytes]:
    """Return the zoo's bytes by name (see ``zoo_cases`` for what each one must do)."""
    return {name: case.data for name, case in _zoo()}


def zoo_samples(prefix: str = "zoo-") -> list[ShardSample]:
    """Return the zoo as shard samples (key = prefix + case name), e.g. to write a tar/Parquet/folder of it."""
    return [ShardSample(key=f"{prefix}{name}", image=case.data, ext=case.ext, caption=f"zoo case {name}",
                        url=f"https://example.com/zoo/{name}.{case.ext}") for name, case in _zoo()]


NON_UTF8_CAPTION = b"caf\xe9 au lait \xff"  # Latin-1 bytes: not valid UTF-8
NON_UTF8_CAPTION_DECODED = NON_UTF8_CAPTION.decode("utf-8", errors="replace")
