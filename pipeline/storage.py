"""Filesystem access over fsspec URLs, and atomic writes: nothing partial is ever visible under its final name."""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for ``url``; credentials come from storage_options or the environment."""
    return url_to_fs(url, **(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Return True for the local filesystem, where rename is atomic."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(base: str, *parts: str) -> str:
    """Return ``base`` joined with ``parts`` using '/' (works for local paths and URLs alike)."""
    return posixpath.join(base.rstrip("/") if base not in ("/", "") else base, *parts)


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Return a full URL for a path that ``fs`` returned (fsspec strips the protocol from listings)."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def atomic_write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing or the whole file.

    Local: write a temporary sibling, fsync, then rename over the final name. Object stores: one whole
    PUT (an object becomes visible only when its upload completes), so no temporary object is left behind.
    """
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def write_parquet(table: pa.Table, url: str, storage_options: dict | None = None) -> None:
    """Write ``table`` as Parquet to ``url`` atomically (zstd, readable by pyarrow/DuckDB/pandas as is)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(url, buf.getvalue(), storage_options)


def read_parquet(url: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    """Return the Parquet table at ``url``."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def write_json(obj: Any, url: str, storage_options: dict | None = None) -> None:
    """Write ``obj`` as indented JSON to ``url`` atomically."""
    atomic_write_bytes(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    """Return the JSON document at ``url``."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Return True when ``url`` exists."""
    fs, path = filesystem(url, storage_options)
    return fs.exists(path)


def makedirs(url: str, storage_options: dict | None = None) -> None:
    """Create the directory ``url`` (a no-op on object stores, which have no directories)."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        os.makedirs(path, exist_ok=True)
