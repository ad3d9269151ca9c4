"""A lock per output root, so that two runs of a scheduled job never write the same root at once.

The lock is one small JSON object (who holds it: job, run id, host, pid, start and heartbeat times) at a
URL such as ``ROOT/reindex.lock`` (`icar reindex`) or ``OUTPUT/icar.lock`` (`icar embed` and `icar index`, see
``output_lock``). Taking it is an atomic create; the holder refreshes it every
``heartbeat_s`` with a compare-and-swap; anyone may take over a lock that was not refreshed for
``stale_after_s`` (or whose holder is a dead process on this host), again with a compare-and-swap, so
two runs that both find the same stale lock cannot both win.

How each store makes that atomic:

- local files (and NFS with close-to-open semantics): ``open(O_CREAT | O_EXCL)`` creates; compare-and-swap
  and delete run under a short-lived side lock (``LOCK.break``, itself O_EXCL) and replace the file with
  ``os.replace``; the token is the SHA-256 of the file's bytes.
- S3: conditional requests. Create is ``PutObject`` with ``If-None-Match: *``; compare-and-swap is
  ``PutObject`` with ``If-Match: <ETag>``; release is ``DeleteObject`` with ``If-Match: <ETag>``; the token is
  the ETag. AWS S3 supports all three on general purpose buckets (conditional writes since 2024, conditional
  deletes since 2025); moto >= 5 implements them. An S3-compatible store that ignores these headers makes
  the lock advisory only: two runs could then both believe they hold it.
- any other fsspec store: best effort (check, write, read back), logged as a warning at every acquire.

Staleness is judged by the lock's last-modified time (the object store's clock on S3), so clocks of the
two competing hosts need not agree; a holder whose heartbeat cannot be written for most of
``stale_after_s`` reports the lock as lost (``check()`` raises LockLost), and the job stops before
publishing anything.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from pipeline.io import storage

log = logging.getLogger(__name__)

BREAKER_STALE_S = 60.0  # a local side lock older than this was left by a crashed process
OUTPUT_LOCK = "icar.lock"  # the lock file inside an `icar embed` run directory or `icar index` index directory


class LockHeld(RuntimeError):
    """Another run holds the lock; ``holder`` is its JSON content (job, run_id, host, pid, started, heartbeat)."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class LockLost(RuntimeError):
    """This run's lock was taken over or could not be refreshed: it must stop writing."""


def utc_now() -> str:
    """Return the current UTC time as ISO-8601 with seconds."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def pid_alive(pid: int) -> bool:
    """Return True when process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# ------------------------------------------------------------------------------------------- backends


class _LocalBackend:
    """O_EXCL create; compare-and-swap and delete under an O_EXCL side lock; token = SHA-256 of the bytes."""

    atomic = True

    def __init__(self, path: str):
        self.path = path
        self.breaker = path + ".break"

    def create(self, data: bytes) -> str:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return hashlib.sha256(data).hexdigest()

    def read(self) -> tuple[bytes, str, float] | None:
        """Return (bytes, token, age in seconds) or None when there is no lock."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest(), age

    def _side_lock(self) -> bool:
        for _ in range(2):
            try:
                os.close(os.open(self.breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return True
            except FileExistsError:
                try:
                    if time.time() - os.stat(self.breaker).st_mtime > BREAKER_STALE_S:
                        os.remove(self.breaker)  # left by a process that died inside a swap
                        continue
                except FileNotFoundError:
                    continue
                return False
        return False

    def _locked(self, fn):
        deadline = time.monotonic() + 10.0
        while not self._side_lock():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.breaker} stayed taken for 10s: remove it if no run holds {self.path}")
            time.sleep(0.05)
        try:
            return fn()
        finally:
            try:
                os.remove(self.breaker)
            except FileNotFoundError:
                pass

    def replace_if(self, token: str, data: bytes) -> str | None:
        """Replace the lock with ``data`` if its token is still ``token``; return the new token, else None."""

        def swap():
            current = self.read()
            if current is None or current[1] != token:
                return None
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return hashlib.sha256(data).hexdigest()

        return self._locked(swap)

    def delete_if(self, token: str) -> bool:
        """Delete the lock if its token is still ``token``; return True when deleted."""

        def delete():
            current = self.read()
            if current is None or current[1] != token:
                return False
            os.remove(self.path)
            return True

        return self._locked(delete)


def _precondition_failed(e: Exception) -> bool:
    text = str(e).lower()
    return "precondition" in text or "pre-condition" in text or "412" in text


class _S3Backend:
    """S3 conditional requests: If-None-Match create, If-Match swap and delete; token = ETag."""

    atomic = True

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)

    def create(self, data: bytes) -> str:
        try:
            out = self.fs.pipe_file(self.path, data, mode="create")
        except FileExistsError:
            raise
        except OSError as e:
            if _precondition_failed(e):
                raise FileExistsError(self.path) from None
            raise
        return (out or {}).get("ETag") or self._etag()

    def _etag(self) -> str | None:
        self.fs.invalidate_cache(self.path)
        try:
            return self.fs.info(self.path).get("ETag")
        except FileNotFoundError:
            return None

    def read(self) -> tuple[bytes, str, float] | None:
        for _ in range(5):
            self.fs.invalidate_cache(self.path)
            try:
                before = self.fs.info(self.path)
                data = self.fs.cat_file(self.path)
                after = self.fs.info(self.path)
            except FileNotFoundError:
                return None
            if before.get("ETag") == after.get("ETag"):  # content and token belong together
                modified = after.get("LastModified")
                age = (dt.datetime.now(dt.timezone.utc) - modified).total_seconds() if modified else 0.0
                return data, after.get("ETag"), age
        raise RuntimeError(f"{self.path} changed on every read: another process is rewriting it constantly")

    def replace_if(self, token: str, data: bytes) -> str | None:
        try:
            out = self.fs.pipe_file(self.path, data, IfMatch=token)
        except (OSError, FileExistsError, FileNotFoundError) as e:
            if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                return None
            raise
        return (out or {}).get("ETag") or self._etag()

    def delete_if(self, token: str) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
        except (OSError, FileNotFoundError) as e:
            if isinstance(e, FileNotFoundError) or _precondition_failed(e):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return True


class _BestEffortBackend:
    """Any other fsspec store: no atomic create, so two runs starting within a round trip could both win."""

    atomic = False

    def __init__(self, fs, path: str):
        self.fs = fs
        self.path = path

    def create(self, data: bytes) -> str:
        self.fs.invalidate_cache(self.path)
        if self.fs.exists(self.path):
            raise FileExistsError(self.path)
        self.fs.pipe_file(self.path, data)
        got = self.read()
        if got is None or got[0] != data:
            raise FileExistsError(self.path)
        return got[1]

    def read(self) -> tuple[bytes, str, float] | None:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
            info = self.fs.info(self.path)
        except FileNotFoundError:
            return None
        modified = info.get("LastModified") or info.get("mtime") or info.get("updated")
        age = 0.0
        if isinstance(modified, dt.datetime):
            age = (dt.datetime.now(dt.timezone.utc) - modified.astimezone(dt.timezone.utc)).total_seconds()
        return data, hashlib.sha256(data).hexdigest(), age

    def replace_if(self, token: str, data: bytes) -> str | None:
        current = self.read()
        if current is None or current[1] != token:
            return None
        self.fs.pipe_file(self.path, data)
        return hashlib.sha256(data).hexdigest()

    def delete_if(self, token: str) -> bool:
        current = self.read()
        if current is None or current[1] != token:
            return False
        self.fs.rm(self.path)
        return True


def _backend(url: str, storage_options: dict | None):
    fs, path = storage.filesystem(url, storage_options)
    if storage.is_local(fs):
        return _LocalBackend(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("s3", "s3a"):
        return _S3Backend(fs, path)
    return _BestEffortBackend(fs, path)


# ------------------------------------------------------------------------------------------- the lock


class RootLock:
    """The lock of one output root; use as a context manager, or acquire()/release()."""

    def __init__(self, url: str, job: str, stale_after_s: float = 1800.0, heartbeat_s: float = 60.0,
                 storage_options: dict | None = None, details: dict | None = None):
        self.url = url
        self.job = job
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s)
        self.backend = _backend(url, storage_options)
        self.run_id = uuid.uuid4().hex[:12]
        self.details = dict(details or {})
        self.started = utc_now()
        self.token: str | None = None
        self._stop = threading.Event()
        self._lost: str | None = None
        self._last_ok = time.monotonic()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    # -------------------------------------------------------------------------------- content

    def _content(self) -> bytes:
        doc = {"job": self.job, "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
               "started": self.started, "heartbeat": utc_now(), "stale_after_s": self.stale_after_s,
               **self.details}
        return (json.dumps(doc, indent=1) + "\n").encode()

    def _stale(self, holder: dict, age: float) -> str | None:
        """Return why a lock with content ``holder`` and ``age`` seconds since its last write is stale, or None."""
        if age > self.stale_after_s:
            return f"not refreshed for {age:.0f}s (stale after {self.stale_after_s:.0f}s)"
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() \
                and not pid_alive(pid):
            return f"its process {pid} on this host ({holder['host']}) is gone"
        return None

    def describe_holder(self, holder: dict, age: float) -> str:
        """Return one line naming who holds the lock."""
        if not holder:
            return f"an unreadable lock written {age:.0f}s ago"
        return (f"job {holder.get('job')!r} run {holder.get('run_id')} on host {holder.get('host')} pid "
                f"{holder.get('pid')}, started {holder.get('started')}, last heartbeat {age:.0f}s ago")

    # -------------------------------------------------------------------------------- acquire / release

    def acquire(self, break_lock: bool = False) -> None:
        """Take the lock or raise LockHeld naming the holder; a stale lock (or any, with break_lock) is taken over."""
        if not self.backend.atomic:
            log.warning("%s: this store has no atomic create; the lock is best effort (two runs starting within "
                        "a round trip could both proceed): schedule with concurrencyPolicy: Forbid", self.url)
        for _ in range(5):
            data = self._content()
            try:
                self.token = self.backend.create(data)
                break
            except FileExistsError:
                pass
            current = self.backend.read()
            if current is None:
                continue  # released meanwhile: try to create again
            raw, token, age = current
            try:
                holder = json.loads(raw.decode() or "{}")
            except (ValueError, UnicodeDecodeError):
                holder = {}
            why = self._stale(holder, age) or ("--break-lock given" if break_lock else None)
            if why is None:
                raise LockHeld(
                    f"{self.url} is held by {self.describe_holder(holder, age)}: another run is writing this "
                    f"output. Wait for it to finish; its lock is taken over automatically once the holder's process "
                    f"on this host is gone or it goes {self.stale_after_s:.0f}s without a heartbeat (or run again "
                    f"with --break-lock once you are sure the holder is dead)", holder)
            log.warning("taking over the lock %s held by %s: %s", self.url, self.describe_holder(holder, age), why)
            new = self.backend.replace_if(token, data)
            if new is not None:
                self.token = new
                break
            # Someone else changed the lock between our read and our swap: look again.
        else:
            raise LockHeld(f"{self.url}: could not take the lock after 5 attempts (other runs keep changing it)")
        self._last_ok = time.monotonic()
        log.info("lock %s taken (run %s)", self.url, self.run_id)
        self._thread = threading.Thread(target=self._heartbeat, name="icar-lock-heartbeat", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._mutex:
                if self._lost:
                    return
                try:
                    new = self.backend.replace_if(self.token, self._content())
                except Exception as e:  # a transient store error: retry on the next beat; check() judges
                    log.warning("could not refresh the lock %s: %s", self.url, e)
                    continue
                if new is None:
                    self._lost = "the lock was taken over by another run (this run's heartbeat was late)"
                    log.error("lock %s lost: %s", self.url, self._lost)
                    return
                self.token = new
                self._last_ok = time.monotonic()

    def check(self) -> None:
        """Raise LockLost when this run no longer safely holds the lock."""
        if self.token is None:
            raise LockLost(f"{self.url}: the lock is not held")
        if self._lost:
            raise LockLost(f"{self.url}: {self._lost}")
        silent = time.monotonic() - self._last_ok
        if silent > 0.75 * self.stale_after_s:
            raise LockLost(f"{self.url}: the heartbeat could not be written for {silent:.0f}s; another run may "
                           f"take the lock over at {self.stale_after_s:.0f}s")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._mutex:
            if self.token is None:
                return
            try:
                if not self.backend.delete_if(self.token):
                    log.warning("lock %s was not this run's any more when released: left as it is", self.url)
            finally:
                self.token = None
        log.info("lock %s released", self.url)

    def __enter__(self) -> "RootLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(output: str, job: str, stale_after_s: float = 1800.0, heartbeat_s: float = 60.0,
                storage_options: dict | None = None) -> RootLock:
    """Return the (not yet acquired) lock of the output directory that `icar embed` or `icar index` writes.

    It lives inside the output as ``OUTPUT_LOCK``: a run directory and an index directory are both written in
    place (never built elsewhere and swapped in), so the file is never replaced along with its directory. Its
    name is not hidden, so a run's orphan removal (which deletes hidden ``.NAME.tmp-*`` leftovers) never touches
    it or the ``icar.lock.tmp-*`` file of a heartbeat in progress, and the readers of a run (index, report,
    audit) only list ``shards/`` and ``errors/``.
    """
    return RootLock(storage.join(output, OUTPUT_LOCK), job, stale_after_s, heartbeat_s, storage_options,
                    details={"output": output})
