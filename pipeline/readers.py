"""Input readers: fsspec URLs -> input shards -> a stream of samples (key, encoded image bytes, caption, url).

Three layouts (DESIGN.md, data contracts), one input shard each:

- WebDataset ``.tar`` (also ``.tar.gz``/``.tgz``) as img2dataset writes it: ``KEY.jpg|jpeg|png|webp|gif|bmp|tif``,
  optional ``KEY.txt`` caption and ``KEY.json`` metadata (``url``, ``caption``, ``width``...). The key follows
  WebDataset: the member path up to the first dot of its file name (``a.b/000123.jpg`` -> ``a.b/000123``).
- Parquet with an image-bytes column (``jpg``/``image``/``bytes``/``img``..., a Hugging Face ``{bytes, path}``
  struct, or ``image_column``), optional ``caption``/``text``/``txt`` and ``url``; key from ``key`` or
  ``<file stem>/<row index>``.
- A folder of image files, read recursively as ONE shard; key = path relative to the folder, with its extension
  (``sub/cat.jpg``); an optional ``sub/cat.txt`` next to it is the caption, ``sub/cat.json`` may give a url.

Readers stream: a tar is read member by member from one sequential file handle, Parquet one row group at a time
(Arrow's unit of decoding), a folder one file at a time; memory does not grow with the shard.
Keys are data, never used as paths.

Failures are split in two. A problem with one sample (no image member, an unreadable file, a null image
cell) is a ``Sample`` with ``data=None`` and ``error`` set: the caller writes an errors/ row with stage "read"
and goes on. A problem with the shard itself (not a tar, truncated tar, corrupt Parquet, no image column)
raises ``ShardReadError`` naming the shard; samples already yielded before it stay valid.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import filesystem, unstrip

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
# Image-bytes column names tried in this order (img2dataset writes its encode format: jpg, png or webp).
IMAGE_COLUMNS = ("jpg", "image", "bytes", "img", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "text", "txt")
# Rows per Parquet record batch handed to Python at a time (the row group is already decoded by then).
PARQUET_BATCH_ROWS = 32
# Arrow decodes a whole row group before slicing it into batches (measured with pyarrow 26: peak ~2x the row
# group's bytes, whatever the batch size or buffering options), so a reader's memory is bounded by the largest
# row group, not by the file. Row groups above this size are logged with the fix.
PARQUET_ROW_GROUP_WARN_BYTES = 256 << 20
# fsspec block size for streaming a tar (s3fs defaults to 50 MB read-ahead blocks).
TAR_BLOCK_BYTES = 8 << 20


@dataclass(frozen=True)
class InputShard:
    uri: str  # full URL (s3://bucket/key) or absolute local path of this input shard
    format: str  # "tar" | "parquet" | "folder"
    size: int | None  # bytes (for a folder: sum of its image and sidecar files)
    mtime: str | None  # ISO-8601 UTC last modification when known (folder: the newest file)
    etag: str | None  # object-store ETag when known; folder: "listing-<sha256>" of its file list (changes detector)


@dataclass
class Sample:
    key: str  # sample key (tar: WebDataset key; folder: relative path; parquet: key column or stem/row)
    source: str  # InputShard.uri
    data: bytes | None  # encoded image bytes; None when the sample is broken at read level
    caption: str | None  # caption / alt text (non-UTF-8 bytes decoded with U+FFFD replacements)
    url: str | None  # original URL when known
    error: str | None = None  # read-level problem for this sample, set exactly when data is None


class InputError(ValueError):
    """An input URL is bad: nothing matches it, it does not exist, or its format is unknown."""


class ShardReadError(RuntimeError):
    """A whole input shard cannot be read (not a tar, truncated, corrupt Parquet, no image column)."""


# ----------------------------------------------------------------------------------------------- expansion


def expand_inputs(urls: list[str], storage_options: dict | None = None) -> list[InputShard]:
    """Return the input shards named by ``urls`` (paths, globs, s3:// URLs, directories), sorted and deduplicated.

    - a ``.tar``/``.tar.gz``/``.tgz`` or ``.parquet`` file is one shard;
    - a glob gives every shard it matches (directories it matches are expanded as below; other files are
      skipped with a warning);
    - a directory holding tar/Parquet files anywhere below it gives those files; a directory holding only image
      files (recursively) is ONE folder shard. Pass ``dir/*`` to make each subfolder its own shard.
    Raises InputError naming the URL when it matches nothing usable.
    """
    if isinstance(urls, str):
        urls = [urls]
    if not urls:
        raise InputError("no input given: pass one or more paths, globs or URLs (e.g. s3://bucket/shards/*.tar)")
    shards: dict[str, InputShard] = {}
    for url in urls:
        for shard in _expand_one(url, storage_options):
            shards.setdefault(shard.uri, shard)
    return sorted(_drop_img2dataset_metadata(shards).values(), key=lambda s: s.uri)


def _drop_img2dataset_metadata(shards: dict[str, InputShard]) -> dict[str, InputShard]:
    """Drop NNNNN.parquet files that sit beside NNNNN.tar: img2dataset writes them as per-shard metadata.

    They hold no image bytes, so treating them as shards would report every one of them as failed.
    """
    tar_stems = {s.uri[: -len(".tar")] for s in shards.values() if s.format == "tar" and s.uri.endswith(".tar")}
    dropped = [u for u, s in shards.items() if s.format == "parquet" and u[: -len(".parquet")] in tar_stems]
    if dropped:
        log.info("skipping %d img2dataset metadata file(s) beside their tar shards, e.g. %s", len(dropped), dropped[0])
    return {u: s for u, s in shards.items() if u not in dropped}


def _expand_one(url: str, storage_options: dict | None) -> list[InputShard]:
    """Return the shards of one input URL."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache()  # listings are cached per filesystem instance; inputs may have changed since
    if any(c in path for c in "*?["):
        try:
            matches = fs.glob(path, detail=True)
        except OSError as e:
            raise InputError(
                f"cannot list {url}: {type(e).__name__}: {e} (check credentials / --storage-options)") from e
        shards, skipped = [], []
        for p, info in sorted(matches.items()):
            if info.get("type") == "directory":
                shards += _expand_directory(fs, p, url, strict=False)
            elif (shard := _file_shard(fs, p, info)) is not None:
                shards.append(shard)
            else:
                skipped.append(p)
        if skipped:
            log.warning("%s: skipped %d matched file(s) that are not .tar/.parquet shards, e.g. %s",
                        url, len(skipped), skipped[0])
        if not shards:
            what = "nothing" if not matches else f"{len(matches)} path(s) but no .tar/.parquet file or image folder"
            raise InputError(f"{url} matched {what}: check the pattern (globs match tar/Parquet files or folders)")
        return shards
    try:
        info = fs.info(path)
    except FileNotFoundError as e:
        raise InputError(f"{url} does not exist: check the path (or bucket and prefix)") from e
    except OSError as e:
        raise InputError(f"cannot read {url}: {type(e).__name__}: {e} (check credentials / --storage-options)") from e
    if info.get("type") == "directory":
        return _expand_directory(fs, path, url, strict=True)
    shard = _file_shard(fs, path, info)
    if shard is None:
        raise InputError(
            f"unknown input format for {url}: expected a .tar/.tar.gz/.tgz WebDataset shard, a .parquet file, "
            "or a directory of images (a single image file is not a shard: pass its folder)"
        )
    return [shard]


def _expand_directory(fs: fsspec.AbstractFileSystem, path: str, url: str, strict: bool) -> list[InputShard]:
    """Return the tar/Parquet shards below directory ``path``, or the directory itself as one folder shard."""
    listing = fs.find(path, detail=True)
    shards = []
    for p, info in sorted(listing.items()):
        if (shard := _file_shard(fs, p, info)) is not None:
            shards.append(shard)
    images = _folder_files(path, listing)[0]
    if shards:
        if images:
            log.warning("%s holds tar/Parquet shards and %d loose image file(s); reading the shards only",
                        url, len(images))
        return shards
    if images:
        return [_folder_shard(fs, path, listing)]
    if strict:
        raise InputError(f"{url} holds no .tar, .parquet or image files ({len(listing)} other file(s) found)")
    log.warning("%s holds no .tar, .parquet or image files; skipped", url)
    return []


def _file_shard(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> InputShard | None:
    """Return the shard for a tar or Parquet file, None for any other file."""
    name = path.lower()
    if name.endswith(TAR_SUFFIXES):
        fmt = "tar"
    elif name.endswith(PARQUET_SUFFIXES):
        fmt = "parquet"
    else:
        return None
    return InputShard(uri=unstrip(fs, path), format=fmt, size=info.get("size"), mtime=_mtime(info),
                      etag=_etag(info))


def _folder_shard(fs: fsspec.AbstractFileSystem, path: str, listing: dict) -> InputShard:
    """Return a folder shard with a fingerprint of its listing, so a changed folder is seen as changed."""
    images, sidecars = _folder_files(path, listing)
    files = sorted(images | sidecars)
    digest = hashlib.sha256()
    mtimes = []
    size = 0
    for rel in files:
        info = listing[_join(path, rel)]
        size += info.get("size") or 0
        mtime = _mtime(info)
        if mtime:
            mtimes.append(mtime)
        digest.update(f"{rel}\t{info.get('size')}\t{_etag(info) or mtime}\n".encode())
    return InputShard(uri=unstrip(fs, path.rstrip("/")), format="folder", size=size,
                      mtime=max(mtimes) if mtimes else None, etag="listing-" + digest.hexdigest()[:32])


def _folder_files(root: str, listing: dict) -> tuple[set[str], set[str]]:
    """Return (image files, .txt/.json sidecar files) in ``listing`` as paths relative to ``root``."""
    prefix = root.rstrip("/") + "/"
    images, sidecars = set(), set()
    for p, info in listing.items():
        if info.get("type") == "directory" or not p.startswith(prefix):
            continue
        rel = p[len(prefix):]
        if _is_junk(rel):
            continue
        ext = rel.rsplit(".", 1)[-1].lower() if "." in posixpath.basename(rel) else ""
        if ext in IMAGE_EXTENSIONS:
            images.add(rel)
        elif ext in ("txt", "json"):
            sidecars.add(rel)
    return images, sidecars


def _is_junk(rel: str) -> bool:
    """Return True for macOS archive debris (``__MACOSX/``, ``._name`` AppleDouble files): never images."""
    return rel.startswith("__MACOSX/") or "/__MACOSX/" in rel or posixpath.basename(rel).startswith("._")


def _join(root: str, rel: str) -> str:
    return root.rstrip("/") + "/" + rel


def _mtime(info: dict) -> str | None:
    """Return the modification time in ``info`` (local float seconds, S3 datetime, ...) as ISO-8601 UTC."""
    for k in ("LastModified", "mtime", "last_modified", "updated", "modified"):
        v = info.get(k)
        if v is None:
            continue
        if isinstance(v, (int, float)):
            return _dt.datetime.fromtimestamp(v, tz=_dt.timezone.utc).isoformat()
        if isinstance(v, _dt.datetime):
            return (v if v.tzinfo else v.replace(tzinfo=_dt.timezone.utc)).astimezone(_dt.timezone.utc).isoformat()
        return str(v)
    return None


def _etag(info: dict) -> str | None:
    """Return the object-store ETag in ``info`` without its quotes, None on filesystems without one."""
    v = info.get("ETag") or info.get("etag")
    return str(v).strip('"') if v else None


# ----------------------------------------------------------------------------------------------- reading


def iter_samples(shard: InputShard, storage_options: dict | None = None,
                 image_column: str | None = None) -> Iterator[Sample]:
    """Yield the samples of ``shard`` one at a time, streaming (see the module docstring for the layouts).

    Per-sample problems come out as samples with ``error`` set; a shard-level problem raises ShardReadError
    after every sample read before it has been yielded. ``image_column`` forces the Parquet image column.
    """
    if shard.format == "tar":
        return _iter_tar(shard, storage_options)
    if shard.format == "parquet":
        return _iter_parquet(shard, storage_options, image_column)
    if shard.format == "folder":
        return _iter_folder(shard, storage_options)
    raise InputError(f"unknown shard format {shard.format!r} for {shard.uri}: expected tar, parquet or folder")


# --- tar


class _EndAwareTarInfo(tarfile.TarInfo):
    """TarInfo that records why header reading stopped: tarfile ends iteration silently on a truncated or
    damaged header after the first member, which we must not mistake for the end of the archive."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf.icar_stop = e
            raise


def _split_key(name: str) -> tuple[str, str] | None:
    """Return (key, extension) of a tar member name the WebDataset way, None for names that are not fields.

    The key is the path up to the first dot of the file name, the extension what follows (lowercased):
    ``a.b/000123.jpg`` -> (``a.b/000123``, ``jpg``); ``x.seg.png`` -> (``x``, ``seg.png``).
    """
    if name.startswith("./"):
        name = name[2:]
    directory, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base or _is_junk(name):
        return None
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _iter_tar(shard: InputShard, storage_options: dict | None) -> Iterator[Sample]:
    """Yield the samples of a WebDataset tar shard, streaming members from one sequential read.

    Members of a key must be adjacent (WebDataset layout); a key seen again later becomes an error sample.
    Truncation: every complete sample before the damage is yielded first, then ShardReadError is raised
    (the sample whose members were being read when the data ended is not yielded). A tar that ends without
    its end-of-archive block is treated as truncated too: the writer did not finish it.
    """
    fs, path = filesystem(shard.uri, storage_options)
    try:
        f = fs.open(path, "rb", block_size=TAR_BLOCK_BYTES)
    except FileNotFoundError as e:
        raise ShardReadError(f"{shard.uri}: input shard disappeared: {e}") from e
    yielded = 0
    member_name = None
    with f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndAwareTarInfo)
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            raise ShardReadError(f"{shard.uri} is not a readable tar archive: {e}") from e
        seen: set[str] = set()
        key: str | None = None
        fields: dict[str, bytes] = {}
        other: list[str] = []
        try:
            for member in tf:
                tf.members = []  # tarfile keeps every TarInfo in stream mode; we never need them again
                member_name = member.name
                parts = _split_key(member.name)
                if parts is None or member.isdir():
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield _tar_sample(shard.uri, key, fields, other, seen)
                        yielded += 1
                    key, fields, other = parts[0], {}, []
                if not member.isfile():
                    other.append(f"{member.name} (not a regular file)")
                    continue
                ext = parts[1]
                if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS or ext in ("txt", "json"):
                    fields[ext] = tf.extractfile(member).read()
                else:
                    other.append(member.name)
        except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise ShardReadError(
                f"{shard.uri}: tar data ends or breaks inside member {member_name!r} after {yielded} complete "
                f"samples ({type(e).__name__}: {e}); the shard is truncated or corrupt: re-create or re-upload it"
            ) from e
        except OSError as e:  # the storage failed under us (after fsspec's own retries), not the tar format
            raise ShardReadError(
                f"{shard.uri}: I/O error at member {member_name!r} after {yielded} complete samples "
                f"({type(e).__name__}: {e})"
            ) from e
        stop = getattr(tf, "icar_stop", None)
        if not isinstance(stop, tarfile.EOFHeaderError):
            reason = "has no end-of-archive block" if isinstance(stop, (tarfile.EmptyHeaderError,
                                                                        tarfile.TruncatedHeaderError)) \
                else f"has a damaged member header ({stop})"
            raise ShardReadError(
                f"{shard.uri}: tar {reason} after member {member_name!r} ({yielded} complete samples read); "
                "the shard is truncated or corrupt: re-create or re-upload it"
            )
        if key is not None:
            yield _tar_sample(shard.uri, key, fields, other, seen)


def _tar_sample(source: str, key: str, fields: dict[str, bytes], other: list[str], seen: set[str]) -> Sample:
    """Return the sample made of one key's members; an error sample when it has no image or a repeated key."""
    caption, url = _caption_and_url(fields.get("txt"), fields.get("json"), f"{source}:{key}")
    if key in seen:
        return Sample(key, source, None, caption, url,
                      error=f"key {key!r} appears again further on in the tar: members of a key must be adjacent "
                            "and keys unique (WebDataset layout)")
    seen.add(key)
    image_exts = [e for e in fields if e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS]
    if not image_exts:
        found = sorted({*fields, *other})
        return Sample(key, source, None, caption, url,
                      error=f"no image member for key {key!r} (found: {', '.join(found) or 'nothing'}); "
                            f"expected {key}.{{{','.join(IMAGE_EXTENSIONS)}}}")
    # A plain extension (jpg) wins over a compound one (seg.png: a mask beside the image), then the order above.
    image_exts.sort(key=lambda e: ("." in e, IMAGE_EXTENSIONS.index(e.rsplit(".", 1)[-1])))
    return Sample(key, source, fields[image_exts[0]], caption, url)


def _caption_and_url(txt: bytes | None, meta: bytes | None, where: str) -> tuple[str | None, str | None]:
    """Return (caption, url) from a .txt and a .json member; the .txt caption wins over the json one."""
    caption = url = None
    if meta is not None:
        try:
            doc = json.loads(meta)
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("%s: ignoring unparsable .json metadata (%s)", where, e)
            doc = None
        if isinstance(doc, dict):
            url = doc.get("url") if isinstance(doc.get("url"), str) else None
            caption = doc.get("caption") if isinstance(doc.get("caption"), str) else None
    if txt is not None:
        caption = _text(txt)
    return caption, url


def _text(data: bytes) -> str:
    """Return ``data`` as text: UTF-8, with U+FFFD for bytes that are not (Latin-1 captions are common)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace")


# --- parquet


def _iter_parquet(shard: InputShard, storage_options: dict | None, image_column: str | None) -> Iterator[Sample]:
    """Yield the rows of a Parquet shard as samples, one row group in memory at a time.

    Rows without image bytes are error samples; a row group that cannot be read raises ShardReadError after the
    rows before it were yielded.
    """
    fs, path = filesystem(shard.uri, storage_options)
    stem = posixpath.basename(path)
    stem = stem[: -len(".parquet")] if stem.lower().endswith(".parquet") else stem
    row = 0
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError as e:
        raise ShardReadError(f"{shard.uri}: input shard disappeared: {e}") from e
    with f:
        try:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            biggest = max((pf.metadata.row_group(i).total_byte_size for i in range(pf.num_row_groups)), default=0)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ShardReadError(f"{shard.uri} is not a readable Parquet file: {e}") from e
        image = _image_column(schema, image_column, shard.uri)
        if biggest > PARQUET_ROW_GROUP_WARN_BYTES:
            log.warning("%s: a row group holds %.0f MB; reading it takes ~%.0f MB of memory. Write Parquet inputs "
                        "with smaller row groups (e.g. pyarrow write_table(..., row_group_size=1000))",
                        shard.uri, biggest / 1e6, 2 * biggest / 1e6)
        caption_col = next((c for c in CAPTION_COLUMNS if c in schema.names), None)
        optional = [c for c in ("key", caption_col, "url", "status", "error_message") if c and c in schema.names]
        columns = [image, *[c for c in optional if c != image]]
        try:
            # One row group per call: a batch that spans row groups would hold several of them at once.
            batches = (b for g in range(pf.num_row_groups)
                       for b in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[g], columns=columns,
                                                use_threads=False))
            for batch in batches:
                images, paths = _image_cells(batch.column(image))
                extra = {c: batch.column(c).to_pylist() for c in optional if c != image}
                for i in range(batch.num_rows):
                    cells = {c: values[i] for c, values in extra.items()}
                    key = cells.get("key")
                    error = None if images[i] is not None else _missing_image(image, row, paths[i], cells)
                    yield Sample(key=f"{stem}/{row}" if key is None else str(key), source=shard.uri,
                                 data=images[i], caption=_as_text(cells.get(caption_col)),
                                 url=_as_text(cells.get("url")), error=error)
                    row += 1
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ShardReadError(
                f"{shard.uri}: Parquet data unreadable after {row} rows ({type(e).__name__}: {e}); "
                "the file is truncated or corrupt (re-create or re-upload it), or the storage failed"
            ) from e


def _image_cells(col: pa.Array) -> tuple[list[bytes | None], list[str | None]]:
    """Return (image bytes, source paths) of one batch of an image column (binary, or an HF {bytes, path} struct)."""
    if not pa.types.is_struct(col.type):
        return col.to_pylist(), [None] * len(col)
    names = [f.name for f in col.type]
    paths = col.field("path").to_pylist() if "path" in names else [None] * len(col)
    return col.field("bytes").to_pylist(), paths


def _missing_image(column: str, row: int, path: str | None, cells: dict) -> str:
    """Return the error message of a row without image bytes (img2dataset's status explains failed downloads)."""
    error = f"no image bytes in column {column!r} at row {row}"
    if path:
        error += f" (only a path, {path!r}: image files referenced by path are not read)"
    status = cells.get("status")
    if status not in (None, "success"):
        detail = cells.get("error_message")
        error += f" (img2dataset status {status!r}" + (f": {detail})" if detail else ")")
    return error


def _image_column(schema: pa.Schema, wanted: str | None, uri: str) -> str:
    """Return the name of the image-bytes column of ``schema``; raise ShardReadError naming the columns found."""
    def usable(name: str) -> bool:
        t = schema.field(name).type
        if pa.types.is_struct(t):
            return any(f.name == "bytes" and _is_binary(f.type) for f in t)
        return _is_binary(t)

    found = ", ".join(f"{f.name} ({f.type})" for f in schema)
    if wanted is not None:
        if wanted not in schema.names:
            raise ShardReadError(f"{uri} has no column {wanted!r} (--image-column); columns found: {found}")
        if not usable(wanted):
            raise ShardReadError(
                f"{uri}: column {wanted!r} holds {schema.field(wanted).type}, not image bytes (binary, or a struct "
                f"with a binary 'bytes' field); columns found: {found}"
            )
        return wanted
    for name in IMAGE_COLUMNS:
        if name in schema.names and usable(name):
            return name
    raise ShardReadError(
        f"{uri} has no image-bytes column: looked for a binary column named {', '.join(IMAGE_COLUMNS)} (or a "
        f"struct with a 'bytes' field); columns found: {found}. Name the right one with --image-column NAME"
    )


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t) \
        or getattr(pa.types, "is_binary_view", lambda _: False)(t)


def _as_text(v) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return _text(v)
    return str(v)


# --- folder


def _iter_folder(shard: InputShard, storage_options: dict | None) -> Iterator[Sample]:
    """Yield the image files below a folder shard in sorted relative-path order, one file read at a time."""
    fs, root = filesystem(shard.uri, storage_options)
    fs.invalidate_cache()
    try:
        listing = fs.find(root, detail=True)
    except FileNotFoundError as e:
        raise ShardReadError(f"{shard.uri}: input folder disappeared: {e}") from e
    if not listing:
        raise ShardReadError(f"{shard.uri}: input folder is empty or disappeared")
    images, sidecars = _folder_files(root, listing)
    for rel in sorted(images):
        stem = rel.rsplit(".", 1)[0]
        try:
            data = fs.cat_file(_join(root, rel))
            txt = fs.cat_file(_join(root, stem + ".txt")) if stem + ".txt" in sidecars else None
            meta = fs.cat_file(_join(root, stem + ".json")) if stem + ".json" in sidecars else None
        except OSError as e:  # one unreadable file (permissions, vanished) is this sample's problem only
            yield Sample(rel, shard.uri, None, None, None, error=f"cannot read {rel}: {type(e).__name__}: {e}")
            continue
        caption, url = _caption_and_url(txt, meta, f"{shard.uri}/{rel}")
        yield Sample(rel, shard.uri, data, caption, url)
