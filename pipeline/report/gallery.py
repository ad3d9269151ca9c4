"""Search results as one self-contained HTML page: the query, then a grid of the top-k images as thumbnails.

The images are read back from the input shards the rows name (``source``: a tar, a Parquet file or a folder
piece, local or any fsspec URL) through ``pipeline.io.readers``, the same readers `icar embed` used, so a key
finds the same image. Each source is read once, in a thread of its own, and only until every wanted key of it has
been found. Thumbnails are decoded by ``pipeline.io.decode`` (the pixel limit and format list of `icar embed`
apply to these untrusted bytes too), centre-cropped squares as the model saw them, re-encoded as small JPEGs and
inlined as ``data:`` URIs: the page holds no script and loads nothing from anywhere. Every text (keys, captions,
queries, paths) is HTML-escaped. An image that cannot be read shows as a grey tile that says why.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes

from PIL import Image

from pipeline.io import storage
from pipeline.io.decode import DecodeConfig, DecodeError, decode_image
from pipeline.io.readers import InputError, InputShard, ShardReadError, expand_inputs, iter_samples
from pipeline.report.html import escape

log = logging.getLogger(__name__)

THUMB_PX = 192  # thumbnail side: ~8-15 kB per JPEG, so a page of 100 results stays around a megabyte
THUMB_QUALITY = 82
READ_THREADS = 8  # sources read at once (object stores answer in parallel; a local disk does not mind)
_FOLDER_PIECE = re.compile(r"^(?P<root>.*)#(?P<first>\d{7})-(?P<last>\d{7})$")


@dataclass
class Tile:
    """One result as the page shows it."""

    key: str
    score: float
    source: str  # input shard URI the row came from
    caption: str | None = None
    exit_layer: int | None = None  # transformer blocks run for the image (None when its run could not be read)
    complexity: float | None = None
    thumbnail: bytes | None = None  # JPEG bytes, None when the image could not be read back
    problem: str | None = None  # why there is no thumbnail


@dataclass
class Panel:
    """One query and its results."""

    query: str  # the text, or the image's path/URL
    kind: str  # "text" | "image"
    tiles: list[Tile] = field(default_factory=list)
    query_thumbnail: bytes | None = None  # image queries: the query image as a JPEG thumbnail
    query_problem: str | None = None


# ------------------------------------------------------------------------------------------------ images


def thumbnail(data: bytes, size: int = THUMB_PX) -> bytes:
    """Return ``data`` (an encoded image) as a ``size`` px square JPEG, centre-cropped; raise DecodeError when bad."""
    pixels = decode_image(data, DecodeConfig(image_size=size)).pixels
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=THUMB_QUALITY, optimize=True)
    return out.getvalue()


def source_shard(source: str, storage_options: dict | None = None) -> InputShard:
    """Return the input shard a row's ``source`` names, listed again as `icar embed` listed it.

    A folder piece (``ROOT#0001000-0001999``) is found by listing ROOT in pieces of the same size; the folder
    name in the URI is escaped like keys (``%XX``) where it is not UTF-8 or holds ``%``.
    """
    piece = _FOLDER_PIECE.match(source)
    if piece is None:
        return expand_inputs([source], storage_options)[0]
    root = piece["root"]
    if "%" in root:
        root = os.fsdecode(unquote_to_bytes(root)) if "://" not in root else unquote(root)
    size = int(piece["last"]) - int(piece["first"]) + 1
    for shard in expand_inputs([root], storage_options, folder_shard_size=size):
        if shard.uri == source:
            return shard
    raise InputError(f"{source}: the folder {root} no longer has this piece (files were added or removed since)")


def read_images(wanted: dict[str, set[str]], storage_options: dict | None = None,
                image_column: str | None = None) -> dict[tuple[str, str], bytes | str]:
    """Return {(source, key): encoded image bytes, or the reason it cannot be had} for the keys wanted per source.

    Each source is streamed once and left as soon as all its wanted keys were seen.
    """
    def one(source: str) -> dict[tuple[str, str], bytes | str]:
        keys = wanted[source]
        found: dict[tuple[str, str], bytes | str] = {}
        try:
            shard = source_shard(source, storage_options)
            for sample in iter_samples(shard, storage_options, image_column=image_column):
                key = _wanted_key(sample.key, keys, shard.format)
                if key is None or (source, key) in found:
                    continue
                found[source, key] = sample.data if sample.data is not None else f"not readable: {sample.error}"
                if len(found) == len(keys):
                    break
        except (InputError, ShardReadError, OSError, ValueError) as e:  # one source's failure is its tiles' only
            reason = f"source not readable: {type(e).__name__}: {e}"
            return {(source, k): found.get((source, k), reason) for k in keys}
        return {(source, k): found.get((source, k), f"key not found in {source} (the input changed since)")
                for k in keys}

    out: dict[tuple[str, str], bytes | str] = {}
    if not wanted:
        return out
    with ThreadPoolExecutor(min(READ_THREADS, len(wanted))) as pool:
        for part in pool.map(one, sorted(wanted)):
            out.update(part)
    return out


def _wanted_key(key: str, wanted: set[str], fmt: str) -> str | None:
    """Return the wanted key ``key`` answers to, None when it is not wanted.

    A folder listed through a glob (``imgs/*``) has keys relative to the glob's folder (``2020/a``) while the
    piece read back alone is relative to its own folder (``a``): the wanted key then ends with ``/`` + key.
    """
    if key in wanted:
        return key
    if fmt == "folder":
        return next((w for w in wanted if w.endswith("/" + key)), None)
    return None


def add_thumbnails(panels: list[Panel], storage_options: dict | None = None, size: int = THUMB_PX) -> None:
    """Read every tile's image back from its source and set its thumbnail (or its problem), in place."""
    wanted: dict[str, set[str]] = {}
    for panel in panels:
        for t in panel.tiles:
            wanted.setdefault(t.source, set()).add(t.key)
    images = read_images(wanted, storage_options)
    for panel in panels:
        for t in panel.tiles:
            data = images.get((t.source, t.key))
            if isinstance(data, bytes):
                try:
                    t.thumbnail = thumbnail(data, size)
                except DecodeError as e:
                    t.problem = f"not decodable: {e}"
            else:
                t.problem = data or "not read"


# ------------------------------------------------------------------------------------------------ page

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:20px;margin:0 0 4px} .meta{color:#5b6270;margin:0 0 20px;font-size:12px;overflow-wrap:anywhere}
section{margin:0 0 32px} h2{font-size:16px;margin:0 0 10px;overflow-wrap:anywhere}
.query-image{display:flex;gap:12px;align-items:center;margin:0 0 12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:14px}
figure{margin:0;border:1px solid #dde1e7;border-radius:6px;padding:6px;background:#fafbfc}
figure img,.missing{display:block;width:100%;aspect-ratio:1;object-fit:cover;border-radius:4px;background:#e9ecf0}
.missing{display:flex;align-items:center;justify-content:center;text-align:center;color:#8a2b36;font-size:12px;
  padding:8px;box-sizing:border-box;overflow-wrap:anywhere}
figcaption{font-size:12px;margin-top:6px} .key{font-weight:600;overflow-wrap:anywhere}
.nums{color:#3a4150;font-variant-numeric:tabular-nums} .cap{color:#5b6270;overflow-wrap:anywhere}
.warning{background:#fdecee;border:1px solid #d1495b;color:#8a2b36;padding:10px 12px;border-radius:6px;
  font-weight:600;overflow-wrap:anywhere}
"""


def _img(data: bytes | None, alt: str, problem: str | None) -> str:
    if data is None:
        return f'<div class="missing" role="img" aria-label="{escape(alt)}">{escape(problem or "no image")}</div>'
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{uri}" alt="{escape(alt)}" width="{THUMB_PX}" height="{THUMB_PX}">'


def _tile(rank: int, t: Tile) -> str:
    depth = "?" if t.exit_layer is None else str(t.exit_layer)
    complexity = "?" if t.complexity is None else f"{t.complexity:.2f}"
    caption = f'<div class="cap">{escape(t.caption)}</div>' if t.caption else ""
    return (f'<figure data-key="{escape(t.key)}" title="{escape(t.source)}">{_img(t.thumbnail, t.key, t.problem)}'
            f'<figcaption><div class="key">{rank}. {escape(t.key)}</div>'
            f'<div class="nums">score {t.score:.3f} · exit {escape(depth)} · complexity {escape(complexity)}</div>'
            f"{caption}</figcaption></figure>")


def _panel(p: Panel) -> str:
    if p.kind == "image":
        head = (f'<h2>image query: {escape(p.query)}</h2><div class="query-image">'
                f'<figure style="width:200px">{_img(p.query_thumbnail, "query image", p.query_problem)}'
                "<figcaption>the query image</figcaption></figure></div>")
    else:
        head = f"<h2>“{escape(p.query)}”</h2>"
    tiles = "".join(_tile(i, t) for i, t in enumerate(p.tiles, 1)) or "<p>(no results)</p>"
    return f'<section>{head}<div class="grid">{tiles}</div></section>'


def render_gallery(panels: Iterable[Panel], index: str, meta: str = "", warning: str | None = None) -> str:
    """Return the page: a header naming the index (and ``warning`` above all, e.g. random weights), then per query
    its text (or image) and the grid of results."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = (f'<p class="warning" role="alert">{escape(warning)}</p>' if warning else "") + \
        "".join(_panel(p) for p in panels)
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>icar search: {escape(index)}</title><style>{_CSS}</style></head><body>"
            f"<h1>icar search</h1><p class=\"meta\">index {escape(index)}{' · ' + escape(meta) if meta else ''}"
            f" · {escape(when)} · score = cosine similarity; exit = transformer blocks run for the image; "
            "thumbnails are centre crops, as the model saw them</p>"
            f"{body}</body></html>\n")


def write_gallery(url: str, panels: list[Panel], index: str, meta: str = "",
                  storage_options: dict | None = None, warning: str | None = None) -> str:
    """Write the page to ``url`` (a local path or fsspec URL) in one piece; return ``url``."""
    storage.atomic_write_bytes(url, render_gallery(panels, index, meta, warning).encode("utf-8"), storage_options)
    return url
