"""Input readers: fsspec URLs -> input shards -> a stream of samples (key, encoded image bytes, caption, url).

Three layouts (DESIGN.md, data contracts), one input shard each:

- WebDataset ``.tar`` (also ``.tar.gz``/``.tgz``) as img2dataset writes it: ``KEY.jpg|jpeg|png|webp|gif|bmp|tif``,
  optional ``KEY.txt`` caption and ``KEY.json`` metadata (``url``, ``caption``, ``width``...). The key follows
  WebDataset: the member path up to the first dot of its file name (``a.b/000123.jpg`` -> ``a.b/000123``).
- Parquet with an image-bytes column (``jpg``/``image``/``bytes``/``img``..., a Hugging Face ``{bytes, path}``
  struct, or ``image_column``), optional ``caption``/``text``/``txt`` and ``url``; key from ``key`` or
  ``<file stem>/<row index>``.
- A folder of image files, read recursively; its sorted listing is cut into shards of ``folder_shard_size`` files
  (``URI#0000000-0000999``: the listing's positions, so a resumed run finds the same shards), key = path relative
  to the input root without the image's extension (``sub/cat.jpg`` -> ``sub/cat``, as a tar member's key; for
  ``imgs/*`` the root is ``imgs``, so subfolders' keys never collide); an optional ``sub/cat.txt`` next to it is
  the caption, ``sub/cat.json`` may give a url. Two images that differ only in their extension (``a.jpg``,
  ``a.png``) would share a key: the one a tar sample would pick (``IMAGE_EXTENSIONS`` order) is read, the other
  is an error sample naming both. On a local disk a file reached through a symbolic link that leaves the input
  root is not read (an error sample names the link) unless ``follow_symlinks``.

One rule for every reader (``folder_key``, ``clean_caption``): a key is the sample's name without its extension
(tar: up to the first dot of the file name, WebDataset's rule; folder: up to the image's extension, the stem its
``.txt`` pairs by; Parquet: the ``key`` column or ``<file stem>/<row>``), and a caption (``.txt`` file or member,
``caption`` in ``.json``, a Parquet caption column) loses its surrounding whitespace, the ``.txt`` file's trailing
newline included; a caption that is empty then is no caption (None).

Readers stream: a tar is read member by member from one sequential file handle, Parquet one row group at a time
(Arrow's unit of decoding), a folder one file at a time; memory does not grow with the shard. A sample above
``max_sample_bytes`` (from the tar header or the listing, before reading) is an error sample, never read.
Keys are data, never used as paths. A key made from a file or member name is always valid text (``name_key``):
``%`` becomes ``%25`` and each byte that is not UTF-8 ``%XX``, so ``urllib.parse.unquote_to_bytes(key)`` gives
back the name's exact bytes.

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
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.storage import filesystem, is_local, unstrip

log = logging.getLogger(__name__)

# Input-reading defaults, shared by the readers and every job that lists inputs (embed,
# reindex), so the same folder gives the same shards whoever lists it.
# A sample's encoded bytes above this are refused unread (tar member, folder file, Parquet cell): the largest
# real images (a 100 MP JPEG ~50 MB, a 16-bit 8K PNG ~200 MB) stay below it, and a bomb no longer costs its size
# in memory before decoding refuses it (decoding refuses anything above max_pixels anyway).
MAX_SAMPLE_BYTES = 256 << 20
# Image files per input shard of a folder (img2dataset's unit of work: a resumable, parallel, committed piece).
FOLDER_SHARD_SIZE = 1000
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


class FolderFile(NamedTuple):
    """One entry of a folder shard: an image file with its sidecars, or a link that is not followed."""

    rel: str  # path relative to the input root, as listed (a local non-UTF-8 name keeps its surrogate escapes)
    size: int | None  # bytes, from the listing
    txt: bool  # a caption STEM.txt sits beside it
    json: bool  # a STEM.json (url, caption) sits beside it
    refused: str | None = None  # why it is not read (a symlink leaving the input root); None when it is read


@dataclass(frozen=True)
class InputShard:
    uri: str  # full URL (s3://bucket/key) or absolute local path of this input shard; folder: FOLDER#FIRST-LAST
    format: str  # "tar" | "parquet" | "folder"
    size: int | None  # bytes (for a folder shard: sum of its image and sidecar files)
    mtime: str | None  # ISO-8601 UTC last modification when known (folder: the newest file)
    etag: str | None  # object-store ETag when known; folder: "listing-<sha256>" of its file list (changes detector)
    root: str | None = None  # folder shards: the input root (URL) the files' paths and keys are relative to
    files: tuple[FolderFile, ...] = field(default=(), repr=False)  # folder shards: this shard's files, sorted


@dataclass
class Sample:
    key: str  # sample key (tar: WebDataset key; folder: relative path minus extension; parquet: key column/stem/row)
    source: str  # InputShard.uri
    data: bytes | None  # encoded image bytes; None when the sample is broken at read level
    caption: str | None  # caption / alt text, stripped (clean_caption); non-UTF-8 bytes decoded as U+FFFD
    url: str | None  # original URL when known
    error: str | None = None  # read-level problem for this sample, set exactly when data is None


class InputError(ValueError):
    """An input URL is bad: nothing matches it, it does not exist, or its format is unknown."""


class ShardReadError(RuntimeError):
    """A whole input shard cannot be read (not a tar, truncated, corrupt Parquet, no image column)."""


# ----------------------------------------------------------------------------------------------- expansion


def expand_inputs(urls: list[str], storage_options: dict | None = None, folder_shard_size: int = FOLDER_SHARD_SIZE,
                  follow_symlinks: bool = False) -> list[InputShard]:
    """Return the input shards named by ``urls`` (paths, globs, s3:// URLs, directories), sorted and deduplicated.

    - a ``.tar``/``.tar.gz``/``.tgz`` or ``.parquet`` file is one shard;
    - a glob gives every shard it matches (directories it matches are expanded as below; other files are
      skipped with a warning);
    - a directory holding tar/Parquet files anywhere below it gives those files; a directory holding only image
      files (recursively) gives folder shards of ``folder_shard_size`` files of its sorted listing each, keys
      relative to the input root (the directory, or a glob's folder before its first wildcard).
    ``follow_symlinks`` lists (and later reads) local files reached through links that leave the input root;
    without it they are listed as refused, never read. Raises InputError naming the URL when it matches nothing
    usable.
    """
    if isinstance(urls, str):
        urls = [urls]
    if not urls:
        raise InputError("no input given: pass one or more paths, globs or URLs (e.g. s3://bucket/shards/*.tar)")
    if folder_shard_size < 1:
        raise InputError(f"--folder-shard-size must be at least 1 file, got {folder_shard_size}")
    shards: dict[str, InputShard] = {}
    for url in urls:
        for shard in _expand_one(url, storage_options, folder_shard_size, follow_symlinks):
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


def _expand_one(url: str, storage_options: dict | None, chunk: int, follow: bool) -> list[InputShard]:
    """Return the shards of one input URL."""
    fs, path = filesystem(url, storage_options)
    fs.invalidate_cache()  # listings are cached per filesystem instance; inputs may have changed since
    if any(c in path for c in "*?["):
        # Folder keys are relative to the glob's fixed part, so imgs/2020/a.jpg and imgs/2021/a.jpg matched by
        # imgs/* are 2020/a.jpg and 2021/a.jpg, not both a.jpg.
        root = re.split(r"[*?\[]", path, maxsplit=1)[0].rpartition("/")[0] or ("/" if is_local(fs) else None)
        try:
            matches = fs.glob(path, detail=True)
        except OSError as e:
            raise InputError(
                f"cannot list {url}: {type(e).__name__}: {e} (check credentials / --storage-options)") from e
        shards, skipped = [], []
        for p, info in sorted(matches.items()):
            if info.get("type") == "directory":
                shards += _expand_directory(fs, p, url, root or p, chunk, follow, strict=False)
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
        return _expand_directory(fs, path, url, path, chunk, follow, strict=True)
    shard = _file_shard(fs, path, info)
    if shard is None:
        raise InputError(
            f"unknown input format for {url}: expected a .tar/.tar.gz/.tgz WebDataset shard, a .parquet file, "
            "or a directory of images (a single image file is not a shard: pass its folder)"
        )
    return [shard]


def _expand_directory(fs: fsspec.AbstractFileSystem, path: str, url: str, root: str, chunk: int, follow: bool,
                      strict: bool) -> list[InputShard]:
    """Return the tar/Parquet shards below directory ``path``, or its image files as folder shards."""
    listing = _walk_local(path, root, follow) if is_local(fs) else fs.find(path, detail=True)
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
        return _folder_shards(fs, path, root, listing, chunk)
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


def _folder_shards(fs: fsspec.AbstractFileSystem, path: str, root: str, listing: dict,
                   chunk: int) -> list[InputShard]:
    """Return the folder shards of directory ``path``: its sorted image files, ``chunk`` at a time.

    A shard is named by its positions in the sorted listing (``PATH#0001000-0001999``), so the same listing gives
    the same URIs, and a resumed run skips what was committed. Files added or removed shift the files of the
    shards after them: their fingerprints (a digest of names, sizes and mtimes or ETags) change, which is how a
    changed input is seen (rundir.assign_parts).
    """
    images, sidecars = _folder_files(root, listing)
    kept = _kept_per_key(images, listing, root)
    entries = []
    for rel in sorted(images):
        info = listing[_join(root, rel)]
        if info.get("outside"):
            entries.append(FolderFile(rel, None, False, False, refused="symlink outside the input"))
            continue
        if kept[folder_key(rel)] != rel:
            entries.append(FolderFile(rel, None, False, False, refused=(
                f"duplicate key {folder_key(rel)!r}: {name_key(rel)} and {name_key(kept[folder_key(rel)])} differ "
                f"only in their extension; {name_key(kept[folder_key(rel)])} was kept (rename one of them)")))
            continue
        stem = rel.rsplit(".", 1)[0]
        txt, meta = stem + ".txt", stem + ".json"
        for side in (txt, meta):  # a caption linked from outside would copy the target's bytes into the output
            if side in sidecars and listing[_join(root, side)].get("outside"):
                entries.append(FolderFile(side, None, False, False, refused="symlink outside the input"))
                sidecars.discard(side)
        entries.append(FolderFile(rel, info.get("size"), txt in sidecars, meta in sidecars))
    entries.sort(key=lambda f: f.rel)
    folder = name_key(unstrip(fs, path.rstrip("/")))  # a source URI is written as text: escaped like keys
    shards = []
    for start in range(0, len(entries), chunk):
        files = tuple(entries[start:start + chunk])
        digest = hashlib.sha256()
        mtimes, size = [], 0
        for f in files:
            stem = f.rel.rsplit(".", 1)[0]
            for rel, there in ((f.rel, f.refused is None), (stem + ".txt", f.txt), (stem + ".json", f.json)):
                info = listing[_join(root, rel)] if there else {}
                size += info.get("size") or 0
                mtime = _mtime(info)
                if mtime:
                    mtimes.append(mtime)
                if there or rel == f.rel:
                    digest.update(f"{name_key(rel)}\t{info.get('size')}\t{_etag(info) or mtime}\n".encode())
        shards.append(InputShard(
            uri=f"{folder}#{start:07d}-{start + chunk - 1:07d}", format="folder", size=size,
            mtime=max(mtimes) if mtimes else None, etag="listing-" + digest.hexdigest()[:32],
            root=unstrip(fs, root.rstrip("/") or "/"), files=files))
    return shards


def _kept_per_key(images: set[str], listing: dict, root: str) -> dict[str, str]:
    """Return {key: the image file read for it}: where images differ only in their extension (``a.jpg``,
    ``a.png``), the one whose extension comes first in IMAGE_EXTENSIONS (a tar sample's choice), then by name.

    Links refused as leaving the input root are chosen only when nothing else has that key.
    """
    kept: dict[str, str] = {}
    for rel in sorted(images, key=lambda r: (bool(listing[_join(root, r)].get("outside")),
                                             IMAGE_EXTENSIONS.index(r.rsplit(".", 1)[-1].lower()), r)):
        kept.setdefault(folder_key(rel), rel)
    return kept


def folder_key(rel: str) -> str:
    """Return the key of a folder's image file: its path relative to the input root without the extension, escaped
    by ``name_key`` (``sub/cat.jpg`` -> ``sub/cat``, the key a tar member ``sub/cat.jpg`` has too)."""
    return name_key(rel.rsplit(".", 1)[0])


def clean_caption(text: str | None) -> str | None:
    """Return ``text`` without surrounding whitespace (a ``.txt`` file's trailing newline), None when nothing is left.

    Every reader passes its captions through here (tar and folder ``.txt``, ``.json`` ``caption``, a Parquet
    caption column), so one image has one caption whichever layout it came in.
    """
    if text is None:
        return None
    text = text.strip()
    return text or None


def _walk_local(path: str, root: str, follow: bool) -> dict[str, dict]:
    """Return {path: info} of the files below local directory ``path``, like ``fs.find(detail=True)``.

    fsspec's find lists a symbolic link as "other" and reads through it. Here a link is resolved: one that stays
    inside the input ``root`` is listed as its target is (a file, or a folder walked once: a link back up the
    tree is not walked again), one that leaves it is listed with ``outside: True`` and never opened, unless
    ``follow``. A link to a folder outside is skipped with a warning (listing it would read outside the input).
    """
    real_root = os.path.realpath(root)
    out: dict[str, dict] = {}
    if not follow and not _inside(os.path.realpath(path), real_root):  # a folder a glob matched is a link
        log.warning("%s: not listed: a symlink to a folder outside the input %s (pass --follow-symlinks to read "
                    "it)", name_key(path), name_key(root))
        return out
    stack = [(path.rstrip("/") or "/", frozenset([os.path.realpath(path)]))]
    while stack:
        folder, above = stack.pop()
        with os.scandir(folder) as it:
            entries = list(it)
        for e in entries:
            p = os.path.join(folder, e.name)
            outside = False
            if e.is_symlink():
                outside = not _inside(os.path.realpath(p), real_root)
                if outside and os.path.isdir(p) and not follow:
                    log.warning("%s: not listed: a symlink to a folder outside the input %s (pass "
                                "--follow-symlinks to read it)", name_key(p), name_key(root))
                    continue
                outside = outside and not follow
            try:
                st = os.stat(p)  # the target's size and mtime (a link's own are meaningless)
            except OSError:  # a dangling link, or a file gone meanwhile: reading it will say so
                st = None
            if st is not None and e.is_dir() and not outside:
                real = os.path.realpath(p)
                if real not in above:
                    stack.append((p, above | {real}))
                continue
            out[p] = {"name": p, "type": "file", "size": st.st_size if st else None,
                      "mtime": st.st_mtime if st else None, "outside": outside}
    return out


def _inside(real: str, real_root: str) -> bool:
    """Return True when resolved path ``real`` is ``real_root`` or below it."""
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def name_key(name: str) -> str:
    """Return ``name`` (a file or tar member name) as a key that is valid UTF-8 text, losslessly.

    A name that is valid UTF-8 and holds no ``%`` is kept as is. Otherwise ``%`` becomes ``%25`` and each byte
    that is not part of valid UTF-8 becomes ``%XX`` (upper-case hex), so ``urllib.parse.unquote_to_bytes(key)``
    gives back the name's exact bytes. Python hands such bytes over as surrogate escapes (os.fsdecode, tarfile),
    which Arrow, JSON and logging refuse: one such name would fail its whole shard, or the whole listing.
    """
    if "%" not in name:
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte: keep its (invalid) UTF-8 bytes
        raw = name.encode("utf-8", "surrogatepass")
    out = []
    for ch in raw.decode("utf-8", "surrogateescape"):
        if ch == "%":
            out.append("%25")
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"%{ord(ch) - 0xDC00:02X}")
        else:
            out.append(ch)
    return "".join(out)


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


def iter_samples(shard: InputShard, storage_options: dict | None = None, image_column: str | None = None,
                 max_sample_bytes: int = MAX_SAMPLE_BYTES, follow_symlinks: bool = False) -> Iterator[Sample]:
    """Yield the samples of ``shard`` one at a time, streaming (see the module docstring for the layouts).

    Per-sample problems come out as samples with ``error`` set; a shard-level problem raises ShardReadError
    after every sample read before it has been yielded. ``image_column`` forces the Parquet image column. A
    sample over ``max_sample_bytes`` is an error sample, not read when its size is known beforehand (tar header,
    folder listing). ``follow_symlinks`` reads folder files through links that leave the input root.
    """
    if shard.format == "tar":
        return _iter_tar(shard, storage_options, max_sample_bytes)
    if shard.format == "parquet":
        return _iter_parquet(shard, storage_options, image_column, max_sample_bytes)
    if shard.format == "folder":
        return _iter_folder(shard, storage_options, max_sample_bytes, follow_symlinks)
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


def _too_big(what: str, size: int, limit: int) -> str:
    """Return the error message of a sample over the size limit."""
    return (f"{what} is {size:,} bytes, over the {limit:,}-byte limit: not read (raise --max-sample-bytes if "
            "such images are real)")


def _iter_tar(shard: InputShard, storage_options: dict | None, max_bytes: int) -> Iterator[Sample]:
    """Yield the samples of a WebDataset tar shard, streaming members from one sequential read.

    Members of a key must be adjacent (WebDataset layout); a key seen again later, or a member repeated within
    its key (``a.jpg`` twice), starts a sample of its own that becomes an error sample: the first one is kept.
    Keys and messages carry member names through ``name_key``. A member over ``max_bytes`` (from its header) is
    skipped unread and makes its key an error sample.
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
            # Names are decoded the same way on every host (not by the locale); bytes that are not UTF-8 arrive as
            # surrogate escapes and become %XX in keys (name_key).
            tf = tarfile.open(fileobj=f, mode="r|*", tarinfo=_EndAwareTarInfo, encoding="utf-8",
                              errors="surrogateescape")
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
            raise ShardReadError(f"{shard.uri} is not a readable tar archive: {e}") from e
        seen: set[str] = set()
        key: str | None = None
        fields: dict[str, bytes] = {}
        other: list[str] = []
        refused: list[str] = []
        try:
            for member in tf:
                tf.members = []  # tarfile keeps every TarInfo in stream mode; we never need them again
                member_name = name_key(member.name)
                parts = _split_key(member_name)
                if parts is None or member.isdir():
                    continue
                ext = parts[1]
                if parts[0] != key or ext in fields:  # a repeated member is a repeated key: never overwritten
                    if key is not None:
                        yield _tar_sample(shard.uri, key, fields, other, seen, refused)
                        yielded += 1
                    key, fields, other, refused = parts[0], {}, [], []
                if not member.isfile():
                    other.append(f"{member_name} (not a regular file)")
                    continue
                if ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS or ext in ("txt", "json"):
                    if member.size > max_bytes:  # tarfile skips its data without holding it when we move on
                        refused.append(_too_big(f"member {member_name!r}", member.size, max_bytes))
                        continue
                    fields[ext] = tf.extractfile(member).read()
                else:
                    other.append(member_name)
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
            yield _tar_sample(shard.uri, key, fields, other, seen, refused)


def _tar_sample(source: str, key: str, fields: dict[str, bytes], other: list[str], seen: set[str],
                refused: list[str]) -> Sample:
    """Return the sample made of one key's members; an error sample when it has no image, a repeated key or a
    member over the size limit."""
    caption, url = _caption_and_url(fields.get("txt"), fields.get("json"), f"{source}:{key}")
    if key in seen:  # worded as execution.process_shard reports a repeated key of any reader
        return Sample(key, source, None, caption, url,
                      error=f"duplicate key {key!r} in {source}; the first one was kept (the key appears again "
                            "further on in the tar: members of a key must be adjacent and keys unique)")
    seen.add(key)
    if refused:
        return Sample(key, source, None, caption, url, error="; ".join(refused))
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
    """Return (caption, url) from a .txt and a .json member; the .txt caption wins over the json one unless blank."""
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
        caption = clean_caption(_text(txt)) or caption
    return clean_caption(caption), url


def _text(data: bytes) -> str:
    """Return ``data`` as text: UTF-8, with U+FFFD for bytes that are not (Latin-1 captions are common)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace")


# --- parquet


def _iter_parquet(shard: InputShard, storage_options: dict | None, image_column: str | None,
                  max_bytes: int) -> Iterator[Sample]:
    """Yield the rows of a Parquet shard as samples, one row group in memory at a time.

    Rows without image bytes, or with more than ``max_bytes`` (already in memory: refused for consistency with
    the other readers), are error samples; a row group that cannot be read raises ShardReadError after the rows
    before it were yielded.
    """
    fs, path = filesystem(shard.uri, storage_options)
    stem = posixpath.basename(path)
    stem = name_key(stem[: -len(".parquet")] if stem.lower().endswith(".parquet") else stem)
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
                    data, error = images[i], None
                    if data is None:
                        error = _missing_image(image, row, paths[i], cells)
                    elif len(data) > max_bytes:
                        data, error = None, _too_big(f"column {image!r} at row {row}", len(data), max_bytes)
                    yield Sample(key=f"{stem}/{row}" if key is None else str(key), source=shard.uri,
                                 data=data, caption=clean_caption(_as_text(cells.get(caption_col))),
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


def _iter_folder(shard: InputShard, storage_options: dict | None, max_bytes: int,
                 follow: bool) -> Iterator[Sample]:
    """Yield the image files of a folder shard in sorted relative-path order, one file read at a time.

    A file listed as refused (a link leaving the input root), over ``max_bytes`` by its listed size, or leaving
    the root by the time it is read (a link put there since the listing) is an error sample, its bytes unread.
    """
    fs, root = filesystem(shard.root, storage_options)
    fs.invalidate_cache()
    if not fs.isdir(root):
        raise ShardReadError(f"{shard.uri}: input folder {name_key(shard.root)} disappeared")
    real_root = os.path.realpath(root) if is_local(fs) and not follow else None
    for f in shard.files:
        key, name = folder_key(f.rel), name_key(f.rel)  # messages name the file, extension included
        if f.refused is not None:
            yield Sample(key, shard.uri, None, None, None,
                         error=f.refused if f.refused.startswith("duplicate key") else
                         f"{name}: {f.refused} {name_key(shard.root)}: not read (pass --follow-symlinks to "
                         "read files through such links)")
            continue
        if f.size is not None and f.size > max_bytes:
            yield Sample(key, shard.uri, None, None, None, error=_too_big(name, f.size, max_bytes))
            continue
        stem = f.rel.rsplit(".", 1)[0]
        paths = [_join(root, rel) for rel in (f.rel, stem + ".txt" if f.txt else None,
                                                stem + ".json" if f.json else None) if rel is not None]
        if real_root is not None and (bad := [p for p in paths if not _inside(os.path.realpath(p), real_root)]):
            yield Sample(key, shard.uri, None, None, None,
                         error=f"{name_key(os.path.relpath(bad[0], root))}: symlink outside the input "
                               f"{name_key(shard.root)} (made since the listing): not read (pass --follow-symlinks "
                               "to read files through such links)")
            continue
        try:
            data = fs.cat_file(paths[0])
            txt = fs.cat_file(_join(root, stem + ".txt")) if f.txt else None
            meta = fs.cat_file(_join(root, stem + ".json")) if f.json else None
        except OSError as e:  # one unreadable file (permissions, vanished) is this sample's problem only
            yield Sample(key, shard.uri, None, None, None,
                         error=f"cannot read {name}: {type(e).__name__}: {name_key(str(e))}")
            continue
        if len(data) > max_bytes:  # the listing gave no size (or the file grew since)
            yield Sample(key, shard.uri, None, None, None, error=_too_big(name, len(data), max_bytes))
            continue
        caption, url = _caption_and_url(txt, meta, f"{shard.uri}/{name}")
        yield Sample(key, shard.uri, data, caption, url)
