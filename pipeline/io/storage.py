"""Filesystem access over fsspec URLs, and atomic writes: nothing partial is ever visible under its final name.

Object-store faults, in layers (measured against a fault-injecting proxy in front of moto, tests/test_faults_s3.py):

- botocore retries each request up to 5 times (legacy mode: 503/SlowDown, 5xx, dropped connections), and s3fs
  wraps each call in 5 more tries for SlowDown, connection and truncated-payload errors: 24 consecutive 503s on a
  PUT or GET are survived with no help from here. Two gaps remain: a 503 on a HEAD (``exists``/``info``) has no
  body, so s3fs cannot see the SlowDown code and gives up after botocore's 5 tries; and a GET whose body is cut
  mid-transfer is tried only s3fs's 5 times.
- This module therefore adds one outer layer, only around whole-object operations (``atomic_write_bytes``,
  ``read_parquet``, ``read_json``, ``exists``) and only for errors that are transient and escaped the layers
  below: ``STORE_ATTEMPTS`` tries with a growing pause. Whole-object reads and PUTs are idempotent, so a retry
  can never duplicate anything. Local files are never retried.
- Permanent failures (missing bucket, access denied, bad credentials, a full or read-only disk) are never
  retried: they raise ``StorageError`` at once, naming the URL, the cause and the fix. ``check_writable`` probes
  an output location before any work starts, so such a job fails in about a second, with nothing written.
- Inside shard tasks, Ray's task retries are a further layer (see pipeline/embed/execution.py).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import posixpath
import random
import struct
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)

T = TypeVar("T")

# Tries of a whole-object operation on an object store when the client's own retries (above) gave up on a
# transient error. The pause before try n+1 is STORE_BACKOFF_S * 4**(n-1), +-50% jitter: 0.5, 2, 8 s.
STORE_ATTEMPTS = 4
STORE_BACKOFF_S = 0.5

# errno values that no retry can fix: the fix is the user's (space, permissions, a writable mount).
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# errno values s3fs gives throttling (SlowDown, ServiceUnavailable: EBUSY), server errors (InternalError:
# EREMOTEIO) and timeouts.
_TRANSIENT_ERRNOS = {errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNABORTED, errno.EPIPE}


class StorageError(OSError):
    """A read or write that cannot succeed as things stand; the message names the URL, the cause and the fix.

    ``permanent`` is True for problems only the user can fix (missing bucket, access denied, no space left),
    which are raised at once; False when a transient error kept recurring after every retry. ``errno`` is the
    underlying one where there is one, so ``except OSError`` callers keep working.
    """

    def __init__(self, message: str, permanent: bool, code: int | None = None):
        super().__init__(code if code is not None else errno.EIO, message)
        self.permanent = permanent

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):  # pickled across Ray tasks: rebuild from our own arguments, not OSError's (errno, text)
        return (type(self), (self.strerror, self.permanent, self.errno))


class CorruptFileError(ValueError):
    """A file that exists but cannot be parsed: truncated, overwritten, or not the format its name says.

    ``url`` names the file, ``problem`` what is wrong with it and ``fix`` what the user can do; the message says
    all three on one line. A ValueError, so callers that refuse bad input with exit 2 keep doing so; the jobs
    name it explicitly. Readers that know what the file is for (pipeline.io.shards for a run directory) replace
    the generic fix with the real way out (``with_fix``).
    """

    GENERIC_FIX = "restore it, or write it again with the command that made it"

    def __init__(self, url: str, problem: str, fix: str | None = None):
        self.url, self.problem, self.fix = url, problem, fix or self.GENERIC_FIX
        super().__init__(f"{url} is unreadable ({problem}): {self.fix}")

    def with_fix(self, fix: str) -> "CorruptFileError":
        """Return the same error with ``fix`` as its way out."""
        return CorruptFileError(self.url, self.problem, fix)

    def __reduce__(self):  # pickled across Ray tasks: rebuild from our own arguments
        return (type(self), (self.url, self.problem, self.fix))


class MissingBucketError(StorageError, FileNotFoundError):
    """The bucket in the URL does not exist (still a FileNotFoundError, as s3fs raises it)."""


class StorageAccessError(StorageError, PermissionError):
    """Access denied or credentials refused (still a PermissionError)."""


class StorageFullError(StorageError):
    """No space left on the device or quota reached."""


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for ``url``; credentials come from storage_options or the environment."""
    return url_to_fs(url, **(storage_options or {}))


def fresh_filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``filesystem(url)`` with any cached listing of ``url``'s folder dropped.

    s3fs caches directory listings per filesystem instance and answers ``info``/``open`` of a path from its
    folder's cached listing: a file another process wrote after that listing (a shard task's part file, a
    concurrent run's manifest) reads as missing. Reads of run-directory files must see the store as it is now.
    """
    fs, path = filesystem(url, storage_options)
    if not is_local(fs):
        fs.invalidate_cache(posixpath.dirname(path.rstrip("/")))
    return fs, path


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
    PUT (an object becomes visible only when its upload completes), so no temporary object is left behind;
    transient store errors are retried (see the module docstring). Raises StorageError for what cannot work.
    """
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        directory = os.path.dirname(path) or "."
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            os.makedirs(directory, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, OSError) and _classify(e, local=True) == "permanent":
                raise _storage_error("write", url, e, "permanent", 1) from e
            raise
    else:
        with_retries("write", url, lambda: fs.pipe_file(path, data))


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """Return the bytes at a local path or fsspec URL (a checkpoint, exit heads, a feature cache)."""
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "rb") as f:
        return f.read()


def safetensors_metadata(data: bytes) -> dict:
    """Return the ``__metadata__`` of a safetensors blob (header: u64 little-endian length, then JSON), read
    without torch; raise ValueError when ``data`` is too short to be one."""
    if len(data) < 8:
        raise ValueError("not a safetensors file (shorter than its header)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("not a safetensors file (header length beyond the end)")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def read_bound_safetensors(path: str, fmt: str, kind: str, article: str, train_hint: str, backbone: str,
                           mismatch: type[ValueError], mismatch_hint: str) -> tuple[bytes, dict]:
    """Return (bytes, metadata) of a heads file at ``path`` whose metadata says format ``fmt`` and ``backbone``.

    Exit heads and confidence heads are bound to the tower they were trained on; both refuse a file of another
    kind (ValueError: "``path`` is not ``article`` ``kind`` ...", then ``train_hint``) and one trained for another
    backbone (``mismatch``, then ``mismatch_hint``) the same way.
    """
    data = read_bytes(path)
    try:
        meta = safetensors_metadata(data)
    except ValueError as e:
        raise ValueError(f"{path} is not {article} {kind} safetensors file: {e}") from e
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not an ICAR {kind} file (metadata format={meta.get('format')!r}); {train_hint}")
    if meta.get("backbone") != backbone:
        raise mismatch(f"{kind.replace('-', ' ')} {path} were trained for backbone {meta.get('backbone')} but the "
                       f"model loaded is {backbone}; {mismatch_hint}")
    return data, meta


def write_parquet(table: pa.Table, url: str, storage_options: dict | None = None) -> None:
    """Write ``table`` as Parquet to ``url`` atomically (zstd, readable by pyarrow/DuckDB/pandas as is)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(url, buf.getvalue(), storage_options)


def read_parquet(url: str, storage_options: dict | None = None, columns: list[str] | None = None) -> pa.Table:
    """Return the Parquet table at ``url``; raise CorruptFileError naming it when it cannot be parsed."""
    fs, path = fresh_filesystem(url, storage_options)

    def read() -> pa.Table:
        with fs.open(path, "rb") as f:
            try:
                return pq.read_table(f, columns=columns)
            except pa.ArrowException as e:  # pyarrow names a file object '<Buffer>': say which file it was
                raise CorruptFileError(url, parquet_problem(e)) from e

    return read() if is_local(fs) else with_retries("read", url, read)


def open_parquet(url: str, storage_options: dict | None = None):
    """Return (open file object, ParquetFile) for ``url``, the caller closes the file; raise CorruptFileError
    naming it when its footer cannot be parsed (a truncated file loses its footer first)."""
    fs, path = fresh_filesystem(url, storage_options)
    f = fs.open(path, "rb")
    try:
        return f, pq.ParquetFile(f)
    except pa.ArrowException as e:
        f.close()
        raise CorruptFileError(url, parquet_problem(e)) from e
    except BaseException:
        f.close()
        raise


def parquet_problem(e: BaseException) -> str:
    """Return what pyarrow found wrong with a Parquet file, without its '<Buffer>' preamble."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text.replace("Could not open Parquet input source '<Buffer>': ", "")
    if "magic bytes not found" in text or "file size is 0" in text:
        return f"not a complete Parquet file, truncated or overwritten: {text}"
    return f"not a valid Parquet file: {text}"


def write_json(obj: Any, url: str, storage_options: dict | None = None) -> None:
    """Write ``obj`` as indented JSON to ``url`` atomically."""
    atomic_write_bytes(url, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), storage_options)


def read_json(url: str, storage_options: dict | None = None) -> Any:
    """Return the JSON document at ``url``; raise CorruptFileError naming it when it is not valid JSON."""
    fs, path = fresh_filesystem(url, storage_options)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    data = read() if is_local(fs) else with_retries("read", url, read)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if not data.strip():
            problem = "empty file"
        elif isinstance(e, json.JSONDecodeError) and e.pos >= len(data.rstrip()) - 1:
            problem = f"truncated JSON: it ends at byte {len(data)} in the middle of a document"
        else:
            problem = f"not valid JSON: {e}"[:300]
        raise CorruptFileError(url, problem) from None


def exists(url: str, storage_options: dict | None = None) -> bool:
    """Return True when ``url`` exists."""
    fs, path = fresh_filesystem(url, storage_options)
    if is_local(fs):
        return fs.exists(path)
    # s3fs's exists() turns every error into False; info() lets throttling and access denied be seen.
    def probe() -> bool:
        try:
            fs.info(path)
        except FileNotFoundError:
            return False
        return True

    return with_retries("check", url, probe)


def makedirs(url: str, storage_options: dict | None = None) -> None:
    """Create the directory ``url`` (a no-op on object stores, which have no directories)."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        os.makedirs(path, exist_ok=True)


def remove(url: str, storage_options: dict | None = None) -> None:
    """Delete the file at ``url`` if it exists (an object store may list a deleted key for a moment)."""
    fs, path = fresh_filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path)


def check_writable(url: str, storage_options: dict | None = None) -> None:
    """Write and delete a small probe under directory ``url``; raise StorageError at once if that fails.

    Run before any work, so that a missing bucket, missing permissions or a read-only or full disk fail the
    job in about a second with nothing written, instead of after the cluster and the models have started.
    """
    makedirs(url, storage_options)
    probe = join(url, f".icar-write-check-{uuid.uuid4().hex}")
    atomic_write_bytes(probe, b"icar write check\n", storage_options)
    fs, path = filesystem(probe, storage_options)
    try:
        fs.rm(path)
    except OSError as e:  # writing works, which is what matters; say what was left behind
        log.warning("could not delete the write probe %s (%s: %s); it is safe to delete", probe,
                    type(e).__name__, e)


def with_retries(op: str, url: str, fn: Callable[[], T]) -> T:
    """Return ``fn()``, trying again on transient object-store errors; raise StorageError for permanent ones.

    ``op`` (read, write, check) and ``url`` only name the operation in messages. A missing object's
    FileNotFoundError and errors that are not about storage pass through unchanged.
    """
    started = time.monotonic()
    for attempt in range(1, STORE_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as e:
            kind = _classify(e, local=False)
            if kind is None:
                raise
            if kind == "permanent" or attempt == STORE_ATTEMPTS:
                raise _storage_error(op, url, e, kind, attempt, time.monotonic() - started) from e
            pause = STORE_BACKOFF_S * 4 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.warning("%s %s: %s after the client's own retries; try %d of %d in %.1fs", op, url,
                        _describe(e), attempt + 1, STORE_ATTEMPTS, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _error_code(e: BaseException) -> tuple[str | None, int | None]:
    """Return (S3 error code, HTTP status) from a botocore ClientError in ``e`` or its causes."""
    seen = 0
    while e is not None and seen < 8:
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return (response.get("Error", {}).get("Code"),
                    response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        e = e.__cause__ or e.__context__
        seen += 1
    return None, None


def _missing_bucket(e: BaseException) -> bool:
    code, _ = _error_code(e)
    return code == "NoSuchBucket" or "specified bucket does not exist" in str(e).lower()


def _classify(e: BaseException, local: bool) -> str | None:
    """Return "permanent", "transient" or None (not a storage problem we know how to judge) for ``e``."""
    if isinstance(e, StorageError):
        return "permanent" if e.permanent else "transient"
    if isinstance(e, FileNotFoundError):
        return "permanent" if _missing_bucket(e) else None
    if isinstance(e, PermissionError):
        return "permanent"
    if isinstance(e, OSError) and e.errno in _PERMANENT_ERRNOS:
        return "permanent"
    if local:
        return None
    code, status = _error_code(e)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                "InvalidBucketName", "NoSuchBucket", "AccountProblem"):
        return "permanent"
    if code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                "RequestTimeTooSkewed") or (status is not None and (status >= 500 or status == 429)):
        return "transient"
    if isinstance(e, (ConnectionError, TimeoutError)) or (isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS):
        return "transient"
    # Client-library exceptions (aiohttp's ClientError, botocore's HTTPClientError) by module, without
    # importing either here: local-only installs must not need them.
    module = type(e).__module__ or ""
    if module.startswith(("aiohttp", "botocore", "urllib3", "http.client")) and not code:
        return "transient"
    return None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _storage_error(op: str, url: str, e: BaseException, kind: str | None, attempts: int,
                   seconds: float = 0.0) -> StorageError:
    """Return the StorageError that tells the user what failed, why, and what to do."""
    code, _ = _error_code(e)
    eno = getattr(e, "errno", None)
    cls = StorageError
    if kind == "transient":
        return StorageError(
            f"cannot {op} {url}: {_describe(e)}, still failing after {attempts} tries over {seconds:.0f}s on top of "
            "the S3 client's own retries: the store is throttling or unreachable. Re-run the same command later; "
            "committed work is kept and the run resumes", permanent=False, code=eno)
    if _missing_bucket(e):
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        reason = f"bucket {bucket!r} does not exist: create it, or fix the URL (and the endpoint, if not AWS)"
        cls = MissingBucketError
    elif isinstance(e, PermissionError) or code in ("AccessDenied", "AllAccessDisabled", "AccountProblem"):
        reason = ("access denied: check the credentials this process and the Ray workers use, and the bucket "
                  "policy or file permissions (they must allow reading and writing here)")
        cls = StorageAccessError
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        reason = "the credentials were refused: check the access key and secret given to this process and the workers"
        cls = StorageAccessError
    elif eno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason = ("no space left (disk full or quota reached): free space or choose another --output, then re-run "
                  "the same command; committed shards are kept and the run resumes")
        cls = StorageFullError
    elif eno == errno.EROFS:
        reason = "the filesystem is read-only: choose a writable --output"
    else:
        reason = "cannot be done as things stand"
    return cls(f"cannot {op} {url}: {reason} ({_describe(e)})", permanent=True, code=eno)
