"""Progress of an embed run in images: the inputs' sample counts, read from their own metadata, and the line people see.

An input shard is the unit of work, but a folder of 10,000 photos is ten shards and a single tar may hold a
day's crawl, so shards are no measure of progress. The totals come from what each format says of itself
without decoding anything: a folder shard's listing, a Parquet file's footer, a local tar's headers (read by
seeking past the members' data). A remote tar's headers are spread through its whole body, so its count stays
unknown and the bar shows images and images/s without a total. The counting runs on a thread beside the
run's start-up (Ray, the model actors), never in front of it.
"""

from __future__ import annotations

import logging
import sys
import tarfile
import threading
import time

from pipeline.io import storage

log = logging.getLogger(__name__)


def count_samples(shard, storage_options: dict | None = None) -> int | None:
    """Return the number of samples of an input shard from its own metadata, or None when that would mean reading
    it whole (a remote or compressed tar) or it cannot be read (the shard task reports why)."""
    try:
        if shard.format == "folder":
            return len(shard.files)
        if shard.format == "parquet":
            import pyarrow.parquet as pq  # lazy: the driver pays pyarrow only when Parquet inputs are counted

            fs, path = storage.filesystem(shard.uri, storage_options)
            with fs.open(path, "rb") as f:
                return int(pq.ParquetFile(f).metadata.num_rows)
        if shard.format == "tar" and shard.uri.endswith(".tar"):
            fs, path = storage.filesystem(shard.uri, storage_options)
            if storage.is_local(fs):
                return _count_tar_keys(path)
    except Exception as e:  # only a progress figure: the shard task reads the shard and reports what is wrong
        log.debug("cannot count the samples of %s: %s: %s", shard.uri, type(e).__name__, e)
    return None


def _count_tar_keys(path: str) -> int:
    """Return the number of WebDataset samples of a local tar: runs of members sharing a key, as the reader
    groups them (the key is the path up to the first dot of the file name)."""
    count, last = 0, None
    with tarfile.open(path, mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        for member in tf:  # random access: tarfile seeks past each member's data to the next header
            tf.members = []
            name = member.name[2:] if member.name.startswith("./") else member.name
            directory, _, base = name.rpartition("/")
            if not member.isfile() or not base or base.startswith(".") or "." not in base:
                continue
            key = f"{directory}/{base.partition('.')[0]}"
            if key != last:
                count, last = count + 1, key
    return count


class SampleTotals:
    """The sample count of a list of input shards, counted on a background thread.

    ``total`` is None until every shard's count is known (and stays None when one cannot be known).
    """

    def __init__(self, shards: list, storage_options: dict | None = None):
        self._shards = list(shards)
        self._storage_options = storage_options
        self._total: int | None = None
        self._done = threading.Event()
        # A daemon: a driver that stops early (Ctrl-C, a refusal) never waits for a listing of remote footers.
        self._thread = threading.Thread(target=self._count, name="icar-count-samples", daemon=True)
        self._thread.start()

    def _count(self) -> None:
        total = 0
        try:
            for shard in self._shards:
                n = count_samples(shard, self._storage_options)
                if n is None:
                    return
                total += n
            self._total = total
        finally:
            self._done.set()

    @property
    def total(self) -> int | None:
        """Return the samples of all shards, or None while counting or when some shard's count is unknown."""
        return self._total if self._done.is_set() else None

    def wait(self, timeout: float | None = None) -> int | None:
        """Return ``total`` once counting has finished (or ``timeout`` seconds have passed)."""
        self._done.wait(timeout)
        return self.total


def format_eta(seconds: float) -> str:
    """Return a duration as H:MM:SS or M:SS for people."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of a run in samples (images embedded + samples failed) on stderr.

    A terminal gets a tqdm bar (done/total, images/s, ETA); a file or a pipe (a scheduler's log) gets one plain
    log line every ``interval_s`` seconds instead of carriage-return redraws, and nothing at all when disabled.
    """

    def __init__(self, totals: SampleTotals | None, enabled: bool = True, interval_s: float = 30.0, stream=None):
        self.totals = totals
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.t0 = time.monotonic()
        self.done = 0
        self.errors = 0
        self._last_line = self.t0
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm  # lazy: only a terminal draws a bar

            self.bar = tqdm(total=None, unit="img", desc="embed", file=self.stream, dynamic_ncols=True)

    def _total(self) -> int | None:
        return self.totals.total if self.totals is not None else None

    def update(self, done: int, errors: int = 0) -> None:
        """Show ``done`` samples handled so far (``errors`` of them failed)."""
        self.done, self.errors = max(self.done, done), errors
        if not self.enabled:
            return
        total = self._total()
        if self.bar is not None:
            if total is not None and self.bar.total != total:
                self.bar.total = max(total, self.done)
            self.bar.set_postfix_str(f"{errors} errors" if errors else "", refresh=False)
            self.bar.update(self.done - self.bar.n)  # by increments: tqdm's rate and ETA follow them
        elif time.monotonic() - self._last_line >= self.interval_s:
            self._last_line = time.monotonic()
            log.info("%s", self.line(total))

    def line(self, total: int | None) -> str:
        """Return the plain progress line: done/total (percent), images/s, ETA."""
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        rate = self.done / elapsed
        text = f"embed: {self.done:,}"
        if total:
            text += f"/{total:,} images ({100 * self.done / total:.0f}%)"
        else:
            text += " images"
        text += f", {rate:.1f} images/s"
        if total and rate > 0 and total > self.done:
            text += f", ETA {format_eta((total - self.done) / rate)}"
        if self.errors:
            text += f", {self.errors} errors"
        return text

    def close(self, done: int, errors: int = 0) -> None:
        """End with the run's final figures (the summary's), so the last line shown matches the summary."""
        self.done, self.errors = done, errors  # the final count wins: polled counts may lag or count retries twice
        if not self.enabled:
            return
        if self.bar is not None:
            total = self._total()
            self.bar.total = total if total is not None and total >= done else done
            self.bar.set_postfix_str(f"{errors} errors" if errors else "", refresh=False)
            self.bar.update(done - self.bar.n)  # may go back: polled counts include a retried shard's images twice
            self.bar.close()
        else:
            log.info("%s", self.line(self._total()))


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
